"""Judge, through the multi-process tests, the mutants that mutmut could not judge.

mutmut runs for each mutant the tests that call its function in the test process. The
distributed tests run SAdam, PSS and the ZeRO glue in rank subprocesses, which that selection
cannot see: a mutant that only they kill is reported "survived" or "no tests". This script
reruns each such mutant through the multi-process tests that exercise its module (the ranks
inherit ``MUTANT_UNDER_TEST`` and import the mutated copy under ``mutants/``) and records the
verdicts in ``mutants/rank-tests.json``, which ``score.py`` reads beside mutmut's results.

Run from the repository root after ``mutmut run``:
``python tests/mutation/rank_tests.py [MODULE or FUNCTION ...]``, a function named as mutmut
names it (``sadam.pss_trigger.x_grad_norm``).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

MUTANTS = Path("mutants")
VERDICTS = MUTANTS / "rank-tests.json"
NOT_KILLED = {0: "survived", 5: "no tests", 33: "no tests"}
PER_MUTANT_TIMEOUT_S = 600
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir=.", "-m", "not slow"]


def rank_tests_for(mutant: str):
    """The multi-process test files whose ranks run the mutated function (None: none do)."""
    function = mutant.split(".x", 1)[-1]
    if mutant.startswith("sadam.pss"):
        return ["tests/test_pss_distributed.py"]
    # the ZeRO glue and SAdam's ZeRO methods (_step_zero_group; not any_nonzero)
    if mutant.startswith("sadam.distributed.zero") or re.search(r"(?<![a-z])zero", function):
        return ["tests/test_deepspeed_zero.py"]
    # SAdam's methods that branch to ZeRO's code for a group DeepSpeed manages (and
    # load_state_dict, which ZeRO's checkpoint test reloads with its declared groups)
    if any(name in function for name in ("load_state_dict", "_step_group", "_stats_anchor")):
        return ["tests/test_distributed.py", "tests/test_deepspeed_zero.py"]
    if mutant.startswith(("sadam.loss_probe", "sadam._loss_directions")):
        return None  # the distributed tests use the gradient probe only
    return ["tests/test_distributed.py"]


def mutmut_verdicts():
    """{mutant: mutmut's exit code} from mutmut's per-file records."""
    verdicts = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        verdicts.update(json.loads(meta.read_text())["exit_code_by_key"])
    return verdicts


def run_tests(files, mutant):
    env = dict(os.environ, MUTANT_UNDER_TEST=mutant, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(MUTANTS.resolve()), os.environ.get("PYTHONPATH", "")]))
    try:
        return subprocess.run([sys.executable, *PYTEST, *files], cwd=MUTANTS, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=PER_MUTANT_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        return "timeout"


def check_setup(files):
    """The tests pass unmutated and fail when every mutated function raises (mutmut's "fail"
    mutant): otherwise a verdict would say nothing about the mutant."""
    clean, forced = run_tests(files, ""), run_tests(files, "fail")
    if clean != 0 or forced in (0, 5):
        sys.exit(f"{files}: unmutated run exit {clean}, forced failure exit {forced}: "
                 "the ranks do not run the mutated copy")


def main(modules):
    if not MUTANTS.is_dir():
        sys.exit("no mutants/ here: run `mutmut run` first, from the repository root")
    done = json.loads(VERDICTS.read_text()) if VERDICTS.exists() else {}
    todo = [(m, rank_tests_for(m)) for m, code in mutmut_verdicts().items()
            if code in NOT_KILLED and m not in done
            and (not modules or any(m.startswith((x + ".", x + "__mutmut_")) for x in modules))]
    todo = [(m, files) for m, files in todo if files]
    for files in sorted({tuple(f) for _, f in todo}):
        check_setup(list(files))
    start = time.monotonic()
    for i, (mutant, files) in enumerate(todo, 1):
        code = run_tests(files, mutant)
        done[mutant] = {"tests": files, "exit": code,
                        "verdict": "killed" if code not in (0, 5) else "survived"}
        VERDICTS.write_text(json.dumps(done, indent=1, sort_keys=True))
        eta = (time.monotonic() - start) / i * (len(todo) - i)
        print(f"[{i}/{len(todo)}, {eta / 60:.0f} min left] {done[mutant]['verdict']}: {mutant}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
