"""One rank of a batch: a multi-process test worker's scenarios, mutant after mutant, in one launch.

``rank_tests.py`` starts this script as every rank (``python rank_batch.py OUT`` with the
rendezvous variables of ``tests/_launch.py``) to judge many mutants without paying a launch
(interpreter, torch, DeepSpeed, process groups) for each (see ``serve``). ``OUT/plan.json``
says:

* ``worker``: the worker script (``tests/zero_worker.py``, ...) with ``setup()``,
  ``scenarios(rank, out)`` and ``save(out, ranks)``;
* ``mutants``: ``[{"name": ..., "scenarios": [...] or None for all}]``; a mutant is switched on by setting
  ``MUTANT_UNDER_TEST``, which mutmut's trampolines read at every call; with
  ``"coverage": true``, the rank records per scenario which mutated functions it calls;
* ``mutants_root``: the ``mutants/`` folder whose copy of the package runs;
* ``preload``: modules to import once, before the launches fork;
* ``start``: the index of the first mutant to run (a relaunch goes on after a failed one).

The first mutant is the unmutated code ("") over every scenario: its records stand in for the
scenarios a mutant does not run, which do not call the mutated function and so cannot differ.
Each rank keeps its own records of every mutant in ``OUT/m<index>/records-rank<r>.pt``; rank 0
writes ``OUT/progress`` (the index of the mutant running) and, per mutant, what the worker's
``main`` would have written, into ``OUT/m<index>/``, then ``OUT/m<index>/done``. A
scenario that raises ends the batch (the other rank may be waiting in a collective): the rank
exits with status 3, and ``rank_tests.py`` counts that mutant as killed and relaunches after it.
"""
import importlib.util
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ORIGINAL = "__mutmut_orig"
FAILED_EXIT = 3


def load_worker(path):
    sys.path.insert(0, str(Path(path).parent))
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class CalledFunctions:
    """The mutated functions called while active, by mutmut's name (``sadam.pss.xǁPSSǁ_write``):
    mutmut keeps each original as ``<name>__mutmut_orig`` in the copy under ``mutants/``."""

    def __init__(self, root):
        self.root, self.names = Path(root).resolve(), set()

    def _trace(self, frame, event, arg):
        name = frame.f_code.co_name
        if event == "call" and name.endswith(ORIGINAL):
            module = Path(frame.f_code.co_filename).resolve().relative_to(self.root)
            self.names.add(".".join(module.with_suffix("").parts) + "." + name[:-len(ORIGINAL)])
        return None  # no line events: only calls are wanted

    def __enter__(self):
        sys.settrace(self._trace)
        threading.settrace(self._trace)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        threading.settrace(None)


def run_mutant(worker, rank, out, mutant, root):
    os.environ["MUTANT_UNDER_TEST"] = mutant["name"]
    runs = worker.scenarios(rank, str(out))
    results, called = {}, {}
    for name in list(runs) if mutant["scenarios"] is None else mutant["scenarios"]:
        if mutant.get("coverage"):
            with CalledFunctions(root) as functions:
                results[name] = runs[name]()
            called[name] = sorted(functions.names)
        else:
            results[name] = runs[name]()
    return results, called


def run(out):
    """Run the plan from its ``start``: this is one launch of the ranks."""
    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    worker = load_worker(plan["worker"])
    rank = worker.setup()
    world = dist.get_world_size()
    control = None
    if plan["start"] > 0:
        control = torch.load(out / "m0" / f"records-rank{rank}.pt", weights_only=False)
    for index in range(plan["start"], len(plan["mutants"])):
        mutant, here = plan["mutants"][index], out / f"m{index}"
        here.mkdir(exist_ok=True)
        if rank == 0:
            (out / "progress").write_text(str(index))
        dist.barrier()
        try:
            results, called = run_mutant(worker, rank, here, mutant, plan["mutants_root"])
        except BaseException:  # noqa: BLE001 - any failure of the mutated code kills it
            (here / f"failed-rank{rank}").write_text(traceback.format_exc())
            sys.stdout.flush()
            os._exit(FAILED_EXIT)
        torch.save(results, here / f"records-rank{rank}.pt")
        control = control if control is not None else results
        gathered, coverage = [None] * world, [None] * world
        dist.all_gather_object(gathered, {**control, **results})
        dist.all_gather_object(coverage, called)
        if rank == 0:
            worker.save(str(here), gathered)
            union = {name: sorted(set().union(*(c.get(name, []) for c in coverage)))
                     for name in results}
            (here / "called.json").write_text(json.dumps(union))
            (here / "done").write_text("")
    os.environ["MUTANT_UNDER_TEST"] = ""
    dist.barrier()
    dist.destroy_process_group()


def serve(out):
    """Import the worker and its heavy modules once, then fork a fresh launch for each
    ``OUT/go-<n>`` that ``rank_tests.py`` writes, until ``OUT/stop``: a relaunch after a killed
    mutant then costs a fork, not an interpreter, torch and DeepSpeed. The parent runs nothing
    on them (no process group, no tensor), so each child starts as a new process would. The
    child's pid goes to ``OUT/pid-<n>-rank<r>``, its exit status to ``OUT/exit-<n>-rank<r>``."""
    out, rank = Path(out), os.environ["RANK"]
    plan = json.loads((out / "plan.json").read_text())
    load_worker(plan["worker"])
    for name in plan.get("preload", []):
        importlib.import_module(name)
    launch, parent = 0, os.getppid()
    while not (out / "stop").exists() and os.getppid() == parent:
        if not (out / f"go-{launch}").exists():
            time.sleep(0.05)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                run(out)
            except BaseException:  # noqa: BLE001 - the harness's own failure: say it, exit 1
                traceback.print_exc()
                sys.stdout.flush()
                os._exit(1)
            sys.stdout.flush()
            os._exit(0)
        (out / f"pid-{launch}-rank{rank}").write_text(str(pid))
        _, status = os.waitpid(pid, 0)
        (out / f"exit-{launch}-rank{rank}").write_text(str(os.waitstatus_to_exitcode(status)))
        launch += 1


if __name__ == "__main__":
    serve(sys.argv[1])
