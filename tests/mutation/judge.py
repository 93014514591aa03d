"""Run a multi-process test file against ranks that already ran, one mutant after another.

``rank_tests.py`` runs this from ``mutants/`` (so that ``import sadam`` is the mutated copy) as
``python judge.py JOBS.json VERDICTS.json TEST_FILE...``, JOBS.json holding
``[{"name": mutant, "ran_in": folder}]``. For each job a child forked from this process runs
pytest on the test files with ``MUTANT_UNDER_TEST`` set and ``SADAM_RANKS_RAN_IN`` pointing at
what the ranks wrote for that mutant (``tests/_launch.py`` takes it instead of launching). The
parent imports torch, the package and the test files' dependencies once, and runs nothing on
them, so each child starts from the same clean state as a fresh process would, without paying
for the imports. VERDICTS.json gets ``{mutant: pytest's exit status, or "timeout"}``.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch  # noqa: F401 - imported once here, for every child

CHILD_TIMEOUT_S = 600
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "--rootdir=.", "-m", "not slow"]


def preload():
    """Import the heavy modules the tests import (pytest imports the tests themselves)."""
    import sadam  # noqa: F401
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass


def run_child(job, test_files, log):
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ["MUTANT_UNDER_TEST"] = job["name"]
        os.environ["SADAM_RANKS_RAN_IN"] = job["ran_in"]
        os._exit(int(pytest.main([*test_files, *PYTEST])))
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def main(jobs_file, verdicts_file, *test_files):
    jobs = json.loads(Path(jobs_file).read_text())
    preload()
    verdicts = {}
    for i, job in enumerate(jobs, 1):
        log = Path(job["ran_in"]) / f"judge-{job['name'] or 'unmutated'}.log"
        verdicts[job["name"]] = run_child(job, test_files, log)
        print(f"  test process: [{i}/{len(jobs)}] exit {verdicts[job['name']]}: "
              f"{job['name'] or 'unmutated'}", flush=True)
        Path(verdicts_file).write_text(json.dumps(verdicts, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
