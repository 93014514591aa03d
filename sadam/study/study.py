"""The study's plan: tune every optimizer's learning rate on validation, rerun the picked rate
over seeds, then run the AdamW controls at ``lr * mean(gamma)``. Runs already in the result file
are skipped, so the study resumes where it stopped."""
import concurrent.futures as cf
import multiprocessing
from dataclasses import dataclass

from tqdm import tqdm

from . import optimizers, tasks
from .runner import RunSpec, run
from .store import ResultStore


@dataclass(frozen=True)
class StudyConfig:
    tasks: tuple
    optimizers: tuple
    controls: tuple
    grid: tuple
    seeds: int
    out: str
    steps: int = 0  # 0 = each task's own length (quick or full)
    quick: bool = False
    jobs: int = 1

    def steps_for(self, task_name: str) -> int:
        if self.steps:
            return self.steps
        task = tasks.get(task_name)
        return task.quick_steps if self.quick else task.steps

    @property
    def active_controls(self):
        return tuple(c for c in self.controls if optimizers.CONTROLS[c] in self.optimizers)

    def total_runs(self) -> int:
        per_task = (len(self.optimizers) * (len(self.grid) + self.seeds - 1)
                    + len(self.active_controls) * self.seeds)
        return len(self.tasks) * per_task


def _score(record):
    """Validation ranking: accuracy first, lower loss breaks ties; a diverged run ranks last."""
    loss = record["val_loss"]
    return (record["val_acc"], -loss if loss == loss else float("-inf"))


def picked_lr(store, cfg, task, optimizer):
    """The grid value with the best validation score for seed 0 (None before any grid run)."""
    steps = cfg.steps_for(task)
    runs = [(store.get(RunSpec(task, optimizer, lr, 0, steps).key), lr) for lr in cfg.grid]
    scored = [(_score(record), lr) for record, lr in runs if record is not None]
    return max(scored)[1] if scored else None


def mean_gamma(records):
    """Average damping factor over steps, scopes and runs."""
    values = [sum(g) / len(g) for r in records for g in r["gamma"] if g]
    return sum(values) / len(values)


def control_lr(store, cfg, task, control):
    source = optimizers.CONTROLS[control]
    lr = picked_lr(store, cfg, task, source)
    steps = cfg.steps_for(task)
    if lr is None:
        return None
    runs = [store.get(RunSpec(task, source, lr, s, steps).key) for s in range(cfg.seeds)]
    runs = [r for r in runs if r is not None]
    return float(f"{lr * mean_gamma(runs):.4g}") if runs else None


def known_plan(store, cfg):
    """Keys of the planned runs that the results so far determine (for the progress count)."""
    keys = []
    for t in cfg.tasks:
        steps = cfg.steps_for(t)
        keys += [RunSpec(t, o, lr, 0, steps).key for o in cfg.optimizers for lr in cfg.grid]
        for o in cfg.optimizers:
            lr = picked_lr(store, cfg, t, o)
            if lr is not None:
                keys += [RunSpec(t, o, lr, s, steps).key for s in range(1, cfg.seeds)]
        for c in cfg.active_controls:
            lr = control_lr(store, cfg, t, c)
            if lr is not None:
                keys += [RunSpec(t, c, lr, s, steps).key for s in range(cfg.seeds)]
    return keys


class Runner:
    """Runs specs not yet in the store, in this process or in a pool, recording each at once."""

    def __init__(self, store, jobs, bar):
        self.store, self.bar = store, bar
        self.pool = None
        if jobs > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a process running torch
            self.pool = cf.ProcessPoolExecutor(jobs, mp_context=context)

    def run_all(self, specs):
        pending = {}
        for spec in specs:
            if spec.key not in self.store:
                pending.setdefault(spec.key, spec)
        if self.pool is None:
            for spec in pending.values():
                self._record(run(spec))
            return
        futures = [self.pool.submit(run, spec) for spec in pending.values()]
        for future in cf.as_completed(futures):
            self._record(future.result())

    def _record(self, record):
        self.store.append(record)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{record['task']} {record['optimizer']} lr={record['lr']:.3g} "
                                 f"seed={record['seed']} val={record['val_acc']:.3f}")

    def close(self, cancel=False):
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def run_study(cfg: StudyConfig) -> ResultStore:
    """Run (or resume) the whole plan; returns the store with every record."""
    store = ResultStore(f"{cfg.out}/study.jsonl")
    total = cfg.total_runs()
    done = sum(1 for key in known_plan(store, cfg) if key in store)
    bar = tqdm(total=total, initial=min(done, total), unit="run", desc="study", dynamic_ncols=True)
    runner = Runner(store, cfg.jobs, bar)
    cancel = True
    try:
        for t in cfg.tasks:  # task by task, so an early stop leaves whole tasks done
            steps = cfg.steps_for(t)
            runner.run_all([RunSpec(t, o, lr, 0, steps) for o in cfg.optimizers
                            for lr in cfg.grid])
            runner.run_all([RunSpec(t, o, picked_lr(store, cfg, t, o), s, steps)
                            for o in cfg.optimizers for s in range(1, cfg.seeds)])
            runner.run_all([RunSpec(t, c, control_lr(store, cfg, t, c), s, steps)
                            for c in cfg.active_controls for s in range(cfg.seeds)])
        cancel = False
    finally:
        runner.close(cancel=cancel)
        bar.close()
    return store


def quick_config(out: str, **overrides) -> StudyConfig:
    settings = dict(tasks=tasks.QUICK_TASKS, optimizers=optimizers.QUICK_OPTIMIZERS,
                    controls=("adamw_ctl_grad",), grid=optimizers.QUICK_LR_GRID, seeds=3,
                    out=out, quick=True)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return StudyConfig(**settings)


def full_config(out: str, **overrides) -> StudyConfig:
    settings = dict(tasks=tasks.FULL_TASKS, optimizers=tuple(optimizers.OPTIMIZERS),
                    controls=tuple(optimizers.CONTROLS), grid=optimizers.LR_GRID, seeds=5,
                    out=out)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return StudyConfig(**settings)
