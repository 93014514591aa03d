"""Judge, through the multi-process tests, the mutants that mutmut could not judge.

mutmut runs for each mutant the tests that call its function in the test process. The
distributed tests run SAdam, PSS and the ZeRO glue in rank subprocesses, which that selection
cannot see: a mutant that only they kill is reported "survived" or "no tests". This script
reruns each such mutant through the multi-process tests that exercise its module (the ranks
inherit ``MUTANT_UNDER_TEST`` and import the mutated copy under ``mutants/``) and records the
verdicts in ``mutants/rank-tests.json``, which ``score.py`` reads beside mutmut's results.

A test file whose worker offers ``setup()``, ``scenarios(rank, out)`` and ``save(out, ranks)``
(``BATCHED``) is judged in batches: one launch of ``rank_batch.py`` runs the unmutated code
over every scenario, recording which mutated functions each scenario calls, then every mutant
over just the scenarios that call its function (the unmutated records stand in for the rest,
which cannot differ); ``judge.py`` then runs the test file against each mutant's records. Before
any verdict counts, the batch checks that the unmutated code rerun over a subset of the
scenarios, in reverse order, gives the same records bit for bit (the scenarios do not depend
on each other), that mutmut's forced failure fails in the ranks and in the test process, and
that the unmutated records pass.

Run from the repository root after ``mutmut run``:
``python tests/mutation/rank_tests.py [MODULE or FUNCTION ...]``, a function named as mutmut
names it (``sadam.pss_trigger.x_grad_norm``).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

MUTANTS = Path("mutants")
VERDICTS = MUTANTS / "rank-tests.json"
NOT_KILLED = {0: "survived", 5: "no tests", 33: "no tests"}
PER_MUTANT_TIMEOUT_S = 600
# multi-process test files judged in batches, with the worker their ranks run
BATCHED = {"tests/test_deepspeed_zero.py": "tests/zero_worker.py"}
BATCH_EXIT_FAILED = 3  # rank_batch.py: a scenario raised
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
    if any(name in function for name in ("load_state_dict", "_step_group", "_stats_anchor",
                                         "_num_scopes")):
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


def function_of(mutant: str) -> str:
    return mutant.rsplit("__mutmut_", 1)[0]


def judge_env():
    """The test process imports the mutated copy under mutants/."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(MUTANTS.resolve()), os.environ.get("PYTHONPATH", "")]))


class Batch:
    """The ranks of one worker, running the mutants of a plan from where the last launch
    stopped; every mutant ends done (records written), failed (a scenario raised) or timed out.
    The rank processes are started once (``rank_batch.serve``) and fork a launch each."""

    def __init__(self, test_file, worker):
        self.test_file, self.worker = test_file, worker
        self.out = (MUTANTS / "rank-batch" / Path(worker).stem).resolve()
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.mutants, self.outcome, self.launches, self.servers = [], {}, 0, None
        # the mutated copy first: start_ranks puts the package this process imports first on
        # the ranks' path
        sys.path[:0] = [str(MUTANTS.resolve()), str((MUTANTS / "tests").resolve())]

    def here(self, index):
        return self.out / f"m{index}"

    def run(self, mutants, per_mutant_timeout_s):
        """Run ``mutants`` (appended to the plan) to the end: relaunch after a failed one."""
        start = len(self.mutants)
        self.mutants += mutants
        self.started, self.reported_from = time.monotonic(), start
        while start < len(self.mutants):
            start = self._launch(start, per_mutant_timeout_s)

    def close(self):
        if self.servers is None:
            return
        (self.out / "stop").write_text("")
        for proc in self.servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.servers = None

    def _write_plan(self, start):
        plan = dict(worker=str((MUTANTS / self.worker).resolve()), mutants=self.mutants,
                    start=start, mutants_root=str(MUTANTS.resolve()), preload=["deepspeed"])
        (self.out / "plan.json").write_text(json.dumps(plan))

    def _start_servers(self):
        from _launch import start_ranks
        worker = __import__(Path(self.worker).stem)
        env = worker.launch_env() if hasattr(worker, "launch_env") else {}
        self.world = worker.WORLD
        self.servers, self.logs = start_ranks(Path("tests/mutation/rank_batch.py").resolve(),
                                              self.out, self.world, **env)

    def _exits(self, n):
        files = [self.out / f"exit-{n}-rank{r}" for r in range(self.world)]
        return [int(f.read_text()) if f.exists() else None for f in files]

    def _kill_launch(self, n):
        """End launch n's children (their servers then report their exit statuses)."""
        for r in range(self.world):
            pid_file = self.out / f"pid-{n}-rank{r}"
            deadline = time.monotonic() + 30
            while not pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), 9)
                except ProcessLookupError:
                    pass
        while None in self._exits(n):
            if any(p.poll() is not None for p in self.servers):
                sys.exit(f"a rank server of {self.worker} ended; logs: {self.logs[0]}")
            time.sleep(0.05)

    def _launch(self, start, per_mutant_timeout_s):
        self._write_plan(start)
        (self.out / "store").unlink(missing_ok=True)
        if self.servers is None:
            self._start_servers()
        n = self.launches
        self.launches += 1
        (self.out / f"go-{n}").write_text("")
        running, since = start, time.monotonic()
        while None in self._exits(n):
            if any(p.poll() is not None for p in self.servers):
                sys.exit(f"a rank server of {self.worker} ended; logs: {self.logs[0]}")
            if any(code not in (None, 0) for code in self._exits(n)):
                self._kill_launch(n)  # one rank failed: the other may wait in a collective
                break
            now_running = self._first_not_done(start)
            if now_running != running:
                running, since = now_running, time.monotonic()
                self._report(running)
            elif time.monotonic() - since > per_mutant_timeout_s:
                self.outcome[running] = "timeout"
                self._kill_launch(n)
                break
            time.sleep(0.05)
        codes = self._exits(n)
        end = self._first_not_done(start)
        for index in range(start, end):
            self.outcome[index] = "done"
        if end == len(self.mutants):
            return end
        if end not in self.outcome:
            self.outcome[end] = "failed" if BATCH_EXIT_FAILED in codes else f"ranks exit {codes}"
            if not any((self.here(end) / f"failed-rank{r}").exists() for r in range(self.world)):
                print(f"  ranks stopped at {self.mutants[end]['name'] or 'the unmutated code'} "
                      f"(exit {codes}); logs: {self.logs[0]}", flush=True)
        return end + 1

    def _report(self, running):
        """A progress line per mutant the ranks finish, with the time left at this pace."""
        done = running - self.reported_from
        left = (time.monotonic() - self.started) / max(1, done) * (len(self.mutants) - running)
        print(f"  ranks: {running}/{len(self.mutants)} runs, {left / 60:.0f} min left",
              flush=True)

    def _first_not_done(self, start):
        index = start
        while index < len(self.mutants) and (self.here(index) / "done").exists():
            index += 1
        return index

    def records(self, index, rank):
        return torch.load(self.here(index) / f"records-rank{rank}.pt", weights_only=False)


def bits(t):
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def same(a, b):
    """Bit-for-bit equality of two records (nested dicts, lists and tensors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(bits(a), bits(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def judge(batch, jobs):
    """pytest's exit status of the batch's test file for each (mutant, index) job."""
    jobs_file, verdicts_file = batch.out / "jobs.json", batch.out / "verdicts.json"
    jobs_file.write_text(json.dumps([{"name": name, "ran_in": str(batch.here(index))}
                                     for name, index in jobs]))
    verdicts_file.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(Path("tests/mutation/judge.py").resolve()),
                    str(jobs_file), str(verdicts_file), batch.test_file], cwd=MUTANTS,
                   env=judge_env(), check=True)
    return json.loads(verdicts_file.read_text())


def run_batch(test_file, worker, mutants, done):
    """Judge ``mutants`` through ``test_file`` in batches (see the module's docstring)."""
    batch = Batch(test_file, worker)
    try:
        judge_batch(batch, test_file, worker, mutants, done)
    finally:
        batch.close()


def judge_batch(batch, test_file, worker, mutants, done):
    started = time.monotonic()
    batch.run([{"name": "", "scenarios": None, "coverage": True}], PER_MUTANT_TIMEOUT_S)
    if batch.outcome[0] != "done":
        sys.exit(f"{test_file}: the unmutated code did not run through the ranks "
                 f"({batch.outcome[0]}); see {batch.out}")
    control_s = time.monotonic() - started
    called = json.loads((batch.here(0) / "called.json").read_text())
    order = list(called)
    subset = order[::2][::-1]
    timeout_s = max(120.0, 3 * control_s)
    batch.run([{"name": "", "scenarios": subset}, {"name": "fail", "scenarios": order}],
              timeout_s)
    for rank in range(2):
        control, again = batch.records(0, rank), batch.records(1, rank)
        if not all(same(again[name], control[name]) for name in subset):
            sys.exit(f"{worker}: the scenarios rerun alone differ from the full run: their "
                     "records cannot stand in for each other")
    if batch.outcome[2] != "failed":
        sys.exit(f"{worker}: mutmut's forced failure did not fail in the ranks "
                 f"({batch.outcome[2]}): they do not run the mutated copy")
    plan = [{"name": m, "scenarios": [s for s in order if function_of(m) in called[s]]}
            for m in mutants]
    print(f"{test_file}: {len(plan)} mutants in batches; a mutant runs "
          f"{sum(len(m['scenarios']) for m in plan) / max(1, len(plan)):.1f} of "
          f"{len(order)} scenarios on average", flush=True)
    first = len(batch.mutants)
    batch.run(plan, timeout_s)
    batch.close()  # the test process needs the cores
    jobs = [("", 0), ("fail", 0)] + [(m["name"], first + i) for i, m in enumerate(plan)
                                     if batch.outcome[first + i] == "done"]
    exits = judge(batch, jobs)
    if exits.pop("") != 0 or exits.pop("fail") in (0, 5):
        sys.exit(f"{test_file}: the unmutated records do not pass, or the forced failure "
                 f"does not fail, in the test process; see the judge-*.log files in {batch.out}/m0")
    for i, m in enumerate(plan):
        outcome = batch.outcome[first + i]
        code = exits.get(m["name"], outcome)
        done[m["name"]] = {"tests": [test_file], "exit": code, "ranks": outcome,
                           "verdict": "survived" if code in (0, 5) else "killed"}
        print(f"{done[m['name']]['verdict']}: {m['name']} ({outcome}, exit {code})", flush=True)
    VERDICTS.write_text(json.dumps(done, indent=1, sort_keys=True))


def main(modules):
    if not MUTANTS.is_dir():
        sys.exit("no mutants/ here: run `mutmut run` first, from the repository root")
    # the tests themselves are not mutated: the ranks and the test process run these
    shutil.copytree("tests", MUTANTS / "tests", dirs_exist_ok=True)
    done = json.loads(VERDICTS.read_text()) if VERDICTS.exists() else {}
    todo = [(m, rank_tests_for(m)) for m, code in mutmut_verdicts().items()
            if code in NOT_KILLED and m not in done
            and (not modules or any(m.startswith((x + ".", x + "__mutmut_")) for x in modules))]
    todo = [(m, files) for m, files in todo if files]
    for test_file, worker in BATCHED.items():
        batched = [m for m, files in todo if test_file in files]
        if batched:
            run_batch(test_file, worker, batched, done)
    # what is left: each mutant in its own launch of the test files that the batches did not run
    todo = [(m, [f for f in files if f not in BATCHED]) for m, files in todo
            if done.get(m, {}).get("verdict") != "killed"]
    todo = [(m, files) for m, files in todo if files]
    for files in sorted({tuple(f) for _, f in todo}):
        check_setup(list(files))
    start = time.monotonic()
    for i, (mutant, files) in enumerate(todo, 1):
        code = run_tests(files, mutant)
        tests = sorted(set(done.get(mutant, {}).get("tests", [])) | set(files))
        done[mutant] = {"tests": tests, "exit": code,
                        "verdict": "killed" if code not in (0, 5) else "survived"}
        VERDICTS.write_text(json.dumps(done, indent=1, sort_keys=True))
        eta = (time.monotonic() - start) / i * (len(todo) - i)
        print(f"[{i}/{len(todo)}, {eta / 60:.0f} min left] {done[mutant]['verdict']}: {mutant}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
