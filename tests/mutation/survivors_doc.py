"""Rewrite docs/mutation-survivors.md from the last mutation run, keeping the reasons it has.

Run from the repository root after ``make mutation``. Each mutant that is still alive (mutmut says
"survived" or "no tests" and ``rank_tests.py`` did not see it killed) keeps its line and section
from the current doc, and so does one the run did not reach (a subset of the modules, a stopped
run); one the doc does not know yet goes under "Not resolved" as not classified,
for a person to kill with a test or explain. Mutants that are now killed drop out, except the ones
the multi-process tests killed, which are listed with the test that did it. A line under "Killed
by tests added after the measured run" whose mutant mutmut now reports killed drops out as well.

A reason is kept by the mutant's name, and mutmut numbers a function's mutants in order: an edit
of the function renumbers every mutant after it, so a kept reason could land on another mutation.
``tests/mutation/survivor_mutations.json`` records, for each line under "Equivalent" and "CUDA
only", the reason and the lines its mutant changes; a line whose reason is unchanged but whose
mutant now changes other lines goes to "Not resolved", to be rechecked. A person who rewrites or
moves a reason takes it on anew: its mutation is recorded again.
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import DOC, RANK_VERDICTS, doc_lines, module_of, mutant_results  # noqa: E402

MUTATIONS = Path("tests/mutation/survivor_mutations.json")
CHECKED = ("Equivalent", "CUDA only")  # the sections score.py accepts, checked against MUTATIONS
# Sections a person writes; the generated ones are rebuilt from the run.
KEPT = ("Equivalent", "CUDA only", "Killed by tests added after the measured run", "Not resolved")
RANKS_KILLED = "Killed by the multi-process tests"
NO_TESTS = "No test in the test process"
INTROS = {
    RANKS_KILLED: "mutmut's per-function selection cannot see calls made in rank subprocesses; "
    "`tests/mutation/rank_tests.py` reran these mutants through the multi-process tests and "
    "recorded the kill in `mutants/rank-tests.json`, which the score counts.",
    "Killed by tests added after the measured run": "mutmut still reports these alive: the test "
    "named on each line was added after mutmut last ran the mutant. Each kill was checked by "
    "running that test with the mutant active (`MUTANT_UNDER_TEST=NAME` from `mutants/`, with the "
    "unmutated control passing); the next `make mutation` counts them as killed.",
    NO_TESTS: "No test in the test process calls these functions: DeepSpeed ZeRO code runs only in "
    "the ranks of `tests/test_deepspeed_zero.py`. `rank_tests.py` judges them through it (about "
    "30 s a launch on two cores); these have no verdict from it yet.",
}


def natural(name):
    function, number = name.rsplit("__mutmut_", 1)
    return function, int(number)


def changed_lines(patch):
    """The removed and added lines of a diff, without indentation: what a mutation changed."""
    return [line[0] + line[1:].strip() for line in patch.splitlines()
            if line[:1] in "-+" and not line.startswith(("---", "+++"))]


def current_mutation(name):
    """The lines mutant ``name`` changes in today's source (mutants/), or None if unknown."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    try:
        return changed_lines(get_diff_for_mutant(name))
    except Exception:  # noqa: BLE001 - a name mutmut no longer generates
        return None


def moved(reason, recorded, mutation):
    """Whether a kept ``reason`` was written for another mutation than the mutant's today's:
    the same reason recorded for different changed lines. A reworded reason is a person's."""
    return (recorded is not None and mutation is not None and recorded["reason"] == reason
            and recorded["mutation"] != mutation)


def keep(name, section, reason, recorded, mutation_of, sections, mutations):
    """Put a kept line in its section, or under "Not resolved" when its mutant has moved."""
    if section not in CHECKED:
        sections[section].append(f"- `{name}`: {reason}")
        return
    mutation = mutation_of(name)
    if moved(reason, recorded.get(name), mutation):
        sections["Not resolved"].append(
            f"- `{name}`: recheck: the reason below was written for the mutation "
            f"`{' / '.join(recorded[name]['mutation'])}`, and this mutant is now "
            f"`{' / '.join(mutation)}` (an edit renumbered the function's mutants); it read: "
            f"{section}: {reason}")
        return
    sections[section].append(f"- `{name}`: {reason}")
    mutations[name] = {"reason": reason, "mutation": mutation if mutation is not None
                       else recorded.get(name, {}).get("mutation")}


def main():
    preamble, lines = doc_lines(DOC.read_text())
    known = {name: line for name, line in lines.items() if line[0] in KEPT}
    ranks = json.loads(RANK_VERDICTS.read_text()) if RANK_VERDICTS.exists() else {}
    recorded = json.loads(MUTATIONS.read_text()) if MUTATIONS.exists() else {}
    mutations = {}
    sections = {name: [] for name in (*KEPT, RANKS_KILLED)}
    no_tests = Counter()
    for name, status in sorted(mutant_results(), key=lambda item: natural(item[0])):
        if status == "not checked" and name in lines:
            # not run this time (MUTATION_MODULES, a stopped run): its line stays as written
            section, reason = lines[name]
            if section in sections:
                keep(name, section, reason, recorded, current_mutation, sections, mutations)
            continue
        if status not in ("survived", "no tests"):
            continue
        verdict = ranks.get(name, {})
        if verdict.get("verdict") == "killed":
            sections[RANKS_KILLED].append(f"- `{name}`: killed by {' '.join(verdict['tests'])}")
        elif name in known:
            section, reason = known[name]
            keep(name, section, reason, recorded, current_mutation, sections, mutations)
        elif status == "no tests":
            no_tests[natural(name)[0]] += 1
        else:
            sections["Not resolved"].append(f"- `{name}`: not classified yet")
    parts = [preamble]
    for section in (*KEPT[:2], RANKS_KILLED, *KEPT[2:]):
        intro = INTROS.get(section)
        parts.append(f"## {section}\n" + (f"\n{intro}\n" if intro else "")
                     + "\n" + "\n".join(sections[section] or ["None."]))
    parts.append(f"## {NO_TESTS}\n\n{INTROS[NO_TESTS]}\n\n" + "\n".join(
        f"- `{function}`: {count} mutants" for function, count in sorted(no_tests.items()))
        if no_tests else f"## {NO_TESTS}\n\nNone.")
    DOC.write_text("\n\n".join(parts) + "\n")
    MUTATIONS.write_text(json.dumps(dict(sorted(mutations.items(), key=lambda kv: natural(kv[0]))),
                                    indent=1, ensure_ascii=False) + "\n")
    print_counts(sections, no_tests)


def print_counts(sections, no_tests):
    """Per module, how many of its live mutants each section holds (a markdown table)."""
    order = (RANKS_KILLED, *KEPT[2:3], *KEPT[:2], KEPT[3])
    counts = {section: Counter(module_of(re.match(r"- `([^`]+)`", line).group(1))
                               for line in sections[section]) for section in order}
    counts[NO_TESTS] = Counter()
    for function, count in no_tests.items():
        counts[NO_TESTS][module_of(function)] += count
    modules = sorted(set().union(*counts.values()))
    print("| module | " + " | ".join(s.lower() for s in counts) + " |")
    print("| --- |" + " --- |" * len(counts))
    for module in modules:
        print(f"| `{module}` | " + " | ".join(str(c[module]) for c in counts.values()) + " |")
    print("| all | " + " | ".join(str(sum(c.values())) for c in counts.values()) + " |")


if __name__ == "__main__":
    main()
