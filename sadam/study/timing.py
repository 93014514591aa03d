"""Wall time per training step of each optimizer, measured side by side.

Optimizers take turns in short chunks (round robin) inside one process, so a busy machine slows
all of them alike; the median over chunks is reported. This is the number to compare, rather than
the per-run times of the study, whose runs may share the machine with other work.
"""
import statistics
import time

from . import tasks
from .report import machine
from .runner import prepare


def time_task(task_name, names, lr=1e-3, chunks=8, chunk_steps=10, warmup=5):
    """{optimizer: median ms per step (forward, backward, probes and update)}."""
    setups = {name: prepare(task_name, name, lr, 0) for name in names}
    batch_size = tasks.get(task_name).batch_size
    streams = {name: tasks.batches(len(s.data.train.y), batch_size, 0)
               for name, s in setups.items()}

    def steps(name, n):
        setup = setups[name]
        for _ in range(n):
            idx = next(streams[name])
            setup.opt.step(setup.closure(setup.data.train.x[idx], setup.data.train.y[idx]))

    for name in names:
        steps(name, warmup)
    samples = {name: [] for name in names}
    for _ in range(chunks):
        for name in names:
            start = time.perf_counter()
            steps(name, chunk_steps)
            samples[name].append(1e3 * (time.perf_counter() - start) / chunk_steps)
    return {name: statistics.median(v) for name, v in samples.items()}


def markdown(results) -> str:
    """results: {task: {optimizer: ms}} -> a table with the ratio to AdamW."""
    lines = [f"Machine: {machine()}", "",
             "| task | optimizer | ms/step (median) | x AdamW |", "|---|---|---|---|"]
    for task, times in results.items():
        base = times.get("adamw")
        for name, ms in times.items():
            ratio = f"{ms / base:.2f}" if base else "n/a"
            lines.append(f"| {task} | {name} | {ms:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"
