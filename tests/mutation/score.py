"""Per-module mutation score of the last ``mutmut run`` (run from the repository root).

Prints killed / total per module and every mutant that was not killed, then fails (exit 1) if a
surviving mutant is not explained in docs/mutation-survivors.md: a line ``- `<mutant name>`: ...``
under its "## Equivalent" heading (no test can tell it from the original) or its "## CUDA only"
heading (it differs only on CUDA tensors; the line names the GPU test that kills it, which skips
here). A timeout counts as killed (the mutant made the tests hang: caught). A mutant that mutmut
reports "survived" or "no tests" but ``rank_tests.py`` saw killed by the multi-process tests
counts as killed (its column says how many).
"""
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

DOC = Path("docs/mutation-survivors.md")
EXPLAINED = ("Equivalent", "CUDA only")
RANK_VERDICTS = Path("mutants/rank-tests.json")
KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def mutant_results():
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            yield name, status


def doc_lines(text):
    """(preamble, {mutant: (section, reason)}) of docs/mutation-survivors.md's text: the lines
    ``- `<mutant name>`: <reason>`` under each "## <section>" heading."""
    preamble, lines, section = [], {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif section is None:
            preamble.append(line)
        elif match := re.match(r"- `([^`]+__mutmut_\d+)`: (.*)", line):
            lines[match.group(1)] = (section, match.group(2))
    return "\n".join(preamble).rstrip("\n"), lines


def explained_in_doc():
    """{mutant: heading} of the lines under the doc's "## Equivalent" and "## CUDA only"."""
    _, lines = doc_lines(DOC.read_text()) if DOC.exists() else (None, {})
    return {name: section for name, (section, _) in lines.items() if section in EXPLAINED}


def module_of(mutant: str) -> str:
    """sadam.backends.reference.x_update__mutmut_3 -> sadam.backends.reference"""
    return mutant.split(".x")[0] if ".x" in mutant else mutant.rsplit(".", 1)[0]


def main(argv):
    listed = explained_in_doc()
    rank_verdicts = json.loads(RANK_VERDICTS.read_text()) if RANK_VERDICTS.exists() else {}
    modules = defaultdict(lambda: [0, 0])
    by_ranks = defaultdict(int)
    unexplained, equivalent, not_run = [], [], []
    for name, status in mutant_results():
        if status in ("survived", "no tests") and \
                rank_verdicts.get(name, {}).get("verdict") == "killed":
            status = "killed"
            by_ranks[module_of(name)] += 1
        module = module_of(name)
        if argv and not any(module == m or module.startswith(m + ".") for m in argv):
            continue
        modules[module][1] += 1
        if status in KILLED:
            modules[module][0] += 1
        elif status == "not checked":
            not_run.append(name)
        elif name in listed:
            equivalent.append((name, status))
        else:
            unexplained.append((name, status))
    print("| module | killed / total | of which by the multi-process tests | equivalent "
          "| CUDA only | not killed, unexplained | not checked |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for module in sorted(modules):
        killed, total = modules[module]
        why = [listed[n] for n, _ in equivalent if module_of(n) == module]
        bad = sum(1 for n, _ in unexplained if module_of(n) == module)
        unchecked = sum(1 for n in not_run if module_of(n) == module)
        print(f"| {module} | {killed} / {total} | {by_ranks[module]} | "
              f"{why.count('Equivalent')} | {why.count('CUDA only')} | {bad} | {unchecked} |")
    for name, status in unexplained:
        print(f"NOT EXPLAINED {status}: {name}   (python -m mutmut show {name})")
    if not_run:
        print(f"{len(not_run)} mutants not checked yet (run `make mutation` to the end)")
    return 1 if unexplained or not_run else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
