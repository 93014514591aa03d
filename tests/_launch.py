"""Start a worker script as N local ranks (rendezvous through a file), wait with a time limit."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

RAN_IN = "SADAM_RANKS_RAN_IN"


def start_ranks(worker, out, world, **env_extra):
    """Start ``python worker out`` as ranks 0..world-1 (RANK, WORLD_SIZE, LOCAL_RANK,
    STORE set); the processes and their log files. Each rank writes its output to
    ``out/rank<r>.log``: a pipe read after another rank's could fill up and stall the rank
    writing to it, and with it every rank waiting in a collective.

    The ranks import the same ``sadam`` as the calling process (its directory goes first on
    their path), so they run exactly the code under test, a mutated copy included."""
    import sadam
    package_root = str(Path(sadam.__file__).resolve().parent.parent)
    path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   STORE=str(out / "store"), OMP_NUM_THREADS="1", PYTHONPATH=path, **env_extra)
        logs.append(out / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(worker), str(out)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def launch_ranks(worker, out, world, timeout_s, **env_extra):
    """Run ``python worker out`` as ranks 0..world-1 (see ``start_ranks``) and fail with the
    log's tail of any rank that does not exit cleanly in time.

    Where ``SADAM_RANKS_RAN_IN`` names a folder, the ranks already ran for the mutant under
    test (``tests/mutation/rank_tests.py`` runs many mutants in one launch): what they wrote
    there is copied into ``out`` instead."""
    ran_in = os.environ.get(RAN_IN)
    if ran_in:
        shutil.copytree(ran_in, out, dirs_exist_ok=True)
        return
    procs, logs = start_ranks(worker, out, world, **env_extra)
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log.read_text()[-4000:]}"
