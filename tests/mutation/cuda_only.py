"""Judge on a GPU the mutants that docs/mutation-survivors.md lists as "CUDA only".

Those mutants differ only on CUDA tensors, so the tests that kill them skip on a machine without a
GPU. ``export`` (where ``make mutation`` ran, with mutmut) writes each one as a patch of its
source file with the tests its line names, into ``tests/mutation/cuda_only.json``; ``check`` (on a
GPU, under that machine's own python3: no mutmut, no network) applies each patch to a private copy
of the package and runs those tests there:

    python tests/mutation/cuda_only.py export
    python3 tests/mutation/cuda_only.py check [--workers N] [--out FILE]   # make gpu-mutants

``check`` first runs every named test on the unmutated copy; a test that does not pass there judges
nothing. A mutant is then "killed" (a test failed, or it ran past the timeout), "survived" (every
test passed: its line in the doc is wrong) or "not run" (a test skipped, or the unmutated run did
not pass). The verdicts go to ``bench/results/<GPU>-cuda-mutants.json``; the exit status is 0 only
when every mutant was killed.
"""
import argparse
import difflib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import doc_lines  # noqa: E402
from survivors_doc import changed_lines, natural  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import device_slug, junit_cases  # noqa: E402

DOC = ROOT / "docs" / "mutation-survivors.md"
ENTRIES = ROOT / "tests" / "mutation" / "cuda_only.json"
SECTION = "CUDA only"
TEST_ID = re.compile(r"tests/test_\w+\.py::\w+(?:\[[^\]\s]+\])?")
SAME_AS = re.compile(r"^as `([^`]+)`")
# what a private copy needs to run the tests: the package, the tests, the files tests read
COPIED = ("sadam", "tests", "bench", "pyproject.toml", "README.md")
PER_MUTANT_TIMEOUT_S = 300
PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir=."]


# ------------------------------------------------------------------------------ the doc's lines
def cuda_only_lines():
    """{mutant: reason} of the doc's "## CUDA only" section."""
    _, lines = doc_lines(DOC.read_text())
    return {name: reason for name, (section, reason) in lines.items() if section == SECTION}


def named_tests(name, reasons):
    """The test ids a CUDA-only line names; "as `_N`" (or a full mutant name) takes that line's."""
    tests, seen = [], set()
    while name in reasons and name not in seen:
        seen.add(name)
        tests += TEST_ID.findall(reasons[name])
        if not (match := SAME_AS.match(reasons[name])):
            break
        other = match.group(1)
        name = other if not other.startswith("_") \
            else name.rsplit("__mutmut_", 1)[0] + "__mutmut" + other
    return list(dict.fromkeys(tests))


# ----------------------------------------------------------------------------------- patches
def make_patch(path, original, mutated):
    """A unified diff (3 lines of context) of one file, as `apply_patch` reads it."""
    return "".join(difflib.unified_diff(original.splitlines(keepends=True),
                                        mutated.splitlines(keepends=True), path, path))


def _hunks(patch):
    """[(line the hunk starts at, old lines, new lines)] of a one-file unified diff."""
    hunks = []
    for line in patch.splitlines(keepends=True):
        if line.startswith(("---", "+++")) and not hunks:
            continue
        if line.startswith("@@"):
            start = int(re.match(r"@@ -(\d+)", line).group(1))
            hunks.append((max(start - 1, 0), [], []))
        elif line.startswith("\\"):  # "\ No newline at end of file"
            continue
        else:
            kind, text = line[0], line[1:]
            if kind in " -":
                hunks[-1][1].append(text)
            if kind in " +":
                hunks[-1][2].append(text)
    return hunks


def apply_patch(text, patch):
    """`text` with the patch applied. Each hunk's old lines must occur exactly (anywhere: code
    above may have moved them); where they occur more than once, at the line the hunk names.
    Raises ValueError when the patch no longer fits the text."""
    lines = text.splitlines(keepends=True)
    for start, old, new in reversed(_hunks(patch)):  # bottom up: earlier line numbers hold
        at = [i for i in range(len(lines) - len(old) + 1) if lines[i:i + len(old)] == old]
        if len(at) > 1 and start in at:
            at = [start]
        if len(at) != 1:
            raise ValueError(f"a hunk at line {start + 1} matches the file {len(at)} times")
        lines[at[0]:at[0] + len(old)] = new
    return "".join(lines)


def patch_path(patch):
    return re.match(r"--- (\S+)", patch).group(1)


# ------------------------------------------------------------------------------------ export
def mutated_source(name):
    """(path, original text, text with the mutant in place of its function), from mutants/.

    Not `mutmut apply`: it replaces the first method of that name in the file (a mutant of
    ``SpikeTrigger.__init__`` lands on ``FlagMirror.__init__``); here the class is found first."""
    import libcst as cst
    from mutmut.mutation.diff_apply import (find_mutant, read_functions_from_index,
                                            read_mutant_function, read_mutants_module)
    from mutmut.utils.format_utils import orig_function_and_class_names_from_key
    path = str(find_mutant(name).path)
    function, class_name = orig_function_and_class_names_from_key(name)
    original_text = (ROOT / path).read_text()
    module = cst.parse_module(original_text)
    scope = module.body
    if class_name:
        scope = [c for c in module.body if isinstance(c, cst.ClassDef)
                 and c.name.value == class_name][0].body.body
    original = [f for f in scope if isinstance(f, cst.FunctionDef)
                and f.name.value == function][0]
    pair = read_functions_from_index(name, path)
    mutant = pair[1] if pair else read_mutant_function(read_mutants_module(path), name)
    mutant = mutant.with_changes(name=cst.Name(function), leading_lines=original.leading_lines)
    return path, original_text, module.deep_replace(original, mutant).code


def export(out=ENTRIES):
    """Write each CUDA-only mutant as a patch of its file, checked against `mutmut show`."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    reasons = cuda_only_lines()
    entries = []
    for name in sorted(reasons, key=natural):
        tests = named_tests(name, reasons)
        if not tests:
            raise SystemExit(f"{name}: its line in {DOC.name} names no test")
        path, original, mutated = mutated_source(name)
        patch = make_patch(path, original, mutated)
        if changed_lines(patch) != changed_lines(get_diff_for_mutant(name, path=path)):
            raise SystemExit(f"{name}: the patch differs from `mutmut show {name}`")
        entries.append({"mutant": name, "tests": tests, "patch": patch})
    out.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(entries)} CUDA-only mutants written to {out.relative_to(ROOT)}")


# ------------------------------------------------------------------------------------- check
def private_copy(where):
    """A copy of the checkout that imports its own sadam (and sadam.triton_kernels)."""
    where.mkdir(parents=True)
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, where / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "results", "triton_kernels"))
        elif source.exists():
            shutil.copy(source, where / name)
    shutil.copytree(ROOT / "triton_kernels", where / "sadam" / "triton_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return where


def run_tests(copy, tests, timeout):
    """(outcome per junit test case, 'timeout' or None, output tail) of pytest over `tests`."""
    junit = copy / "junit.xml"
    junit.unlink(missing_ok=True)
    # no bytecode: a mutant can have its original's size and mtime second, and a stale .pyc
    # would run the original instead
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(copy))
    try:
        proc = subprocess.run([sys.executable, *PYTEST, f"--junitxml={junit}", *tests], cwd=copy,
                              env=env, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        return {}, "timeout", ""
    cases = {}
    if junit.exists():
        for classname, name, found in junit_cases(junit):
            cases[f"{(classname or '').replace('.', '/')}.py::{name}"] = case_outcome(found)
    if not cases:
        cases = {" ".join(tests): f"error: pytest exited {proc.returncode} with no test run"}
    return cases, None, tail


def case_outcome(found):
    """A failure or an error outranks a skip: a case skipped in its call and failing in its
    teardown has both, and a mutant that breaks the teardown is caught."""
    for tag in ("failure", "error"):
        if tag in found:
            return tag
    return f"skipped: {found['skipped']}" if "skipped" in found else "passed"


def cases_of(test_id, cases):
    """The junit cases a test id stands for (an id without parameters: every parametrisation)."""
    return {case: outcome for case, outcome in cases.items()
            if case == test_id or case.startswith(test_id + "[")}


def judge(entry, copy, baseline, timeout):
    """The verdict of one mutant, run in `copy` (restored afterwards)."""
    tests = entry["tests"]
    not_passing = {case: outcome for test in tests
                   for case, outcome in (cases_of(test, baseline) or {test: "not found"}).items()
                   if outcome != "passed"}
    if not_passing:
        return {"verdict": "not run", "why": "unmutated: " + "; ".join(
            f"{case} {outcome}" for case, outcome in sorted(not_passing.items()))[:600]}
    target = copy / patch_path(entry["patch"])
    original = target.read_text()
    start = time.monotonic()
    try:
        target.write_text(apply_patch(original, entry["patch"]))
        cases, timed_out, tail = run_tests(copy, tests, timeout)
    finally:
        target.write_text(original)
    seconds = round(time.monotonic() - start, 1)
    if timed_out:
        return {"verdict": "killed", "why": f"timeout after {timeout} s", "seconds": seconds}
    failed = sorted(case for case, outcome in cases.items()
                    if outcome == "failure" or outcome.startswith("error"))
    skipped = sorted(case for case, outcome in cases.items() if outcome.startswith("skipped"))
    if failed:
        return {"verdict": "killed", "why": "failed: " + ", ".join(failed), "seconds": seconds}
    if skipped:
        return {"verdict": "not run", "why": "skipped: " + ", ".join(skipped),
                "seconds": seconds, "output_tail": tail}
    return {"verdict": "survived", "why": f"{len(cases)} tests passed", "seconds": seconds}


def check(entries_path, out, workers, timeout, only):
    import torch
    entries = json.loads(Path(entries_path).read_text())
    if only:
        entries = [e for e in entries if e["mutant"] in only]
    for entry in entries:  # a stale patch judges nothing: refuse before running anything
        try:
            apply_patch((ROOT / patch_path(entry["patch"])).read_text(), entry["patch"])
        except ValueError as exc:
            raise SystemExit(f"{entry['mutant']}: {exc}; rerun `make mutation` and `export`")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        copies = [private_copy(Path(tmp) / f"copy{i}") for i in range(max(workers, 1))]
        probe = subprocess.run([sys.executable, "-c", "import sadam; print(sadam.__file__)"],
                               cwd=copies[0], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(copies[0])))
        if not probe.stdout.startswith(str(copies[0])):
            raise SystemExit(f"the copy imports another sadam: {probe.stdout}{probe.stderr}")
        all_tests = sorted({test for entry in entries for test in entry["tests"]})
        baseline, timed_out, tail = run_tests(copies[0], all_tests, timeout * 2)
        if timed_out:
            raise SystemExit("the unmutated tests ran past their timeout")
        print(f"unmutated: {sum(o == 'passed' for o in baseline.values())} of "
              f"{len(baseline)} test cases passed", flush=True)
        free = list(copies)
        verdicts = {}

        def one(entry):
            copy = free.pop()
            try:
                verdicts[entry["mutant"]] = judge(entry, copy, baseline, timeout)
            finally:
                free.append(copy)
            print(f"{verdicts[entry['mutant']]['verdict']:9} {entry['mutant']}", flush=True)

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            list(pool.map(one, entries))
    counts = {v: sum(r["verdict"] == v for r in verdicts.values())
              for v in ("killed", "survived", "not run")}
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "entries": str(Path(entries_path).resolve().relative_to(ROOT))
        if Path(entries_path).resolve().is_relative_to(ROOT) else str(entries_path),
        "wall_s": round(time.monotonic() - started, 1), "counts": counts,
        "unmutated": baseline, "mutants": verdicts}
    out = Path(out or ROOT / "bench" / "results" / f"{device_slug()}-cuda-mutants.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"{counts} in {report['wall_s']} s -> {out}")
    return 0 if counts["killed"] == len(verdicts) and verdicts else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("export", help="write tests/mutation/cuda_only.json (needs mutmut, mutants/)")
    run = sub.add_parser("check", help="judge the mutants on this machine's GPU")
    run.add_argument("--entries", default=str(ENTRIES))
    run.add_argument("--out", help="results file (default bench/results/<GPU>-cuda-mutants.json)")
    run.add_argument("--workers", type=int, default=min(4, max((os.cpu_count() or 2) // 4, 1)))
    run.add_argument("--timeout", type=int, default=PER_MUTANT_TIMEOUT_S)
    run.add_argument("--only", nargs="*", help="judge only these mutants")
    args = parser.parse_args(argv)
    if args.command == "export":
        export()
        return 0
    return check(args.entries, args.out, args.workers, args.timeout, args.only)


if __name__ == "__main__":
    sys.exit(main())
