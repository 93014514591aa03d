"""Summaries of the study's records: accuracy, cost, rho / gamma distributions, oscillation."""
import json
import math
import platform
import statistics

import torch

from . import optimizers
from .runner import RunSpec
from .study import control_lr, picked_lr


def seed_runs(store, cfg, task, name):
    """The seed runs of optimizer or control ``name`` at its chosen lr, in seed order."""
    lr = control_lr(store, cfg, task, name) if name in optimizers.CONTROLS else \
        picked_lr(store, cfg, task, name)
    if lr is None:
        return None, []
    steps = cfg.steps_for(task)
    runs = [store.get(RunSpec(task, name, lr, s, steps).key) for s in range(cfg.seeds)]
    return lr, [r for r in runs if r is not None]


def _mean_std(values):
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _quantiles(values, qs=(0.1, 0.5, 0.9)):
    if not values:
        return [float("nan")] * len(qs)
    t = torch.tensor(values, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in qs]


def _corr(a, b):
    """Pearson correlation, nan when either side is constant."""
    if len(a) < 3:
        return float("nan")
    t = torch.tensor([a, b], dtype=torch.float64)
    if (t.std(dim=1) == 0).any():
        return float("nan")
    return float(torch.corrcoef(t)[0, 1])


def _scope_mean(trace):
    return [sum(v) / len(v) for v in trace]


def _residual(y, x):
    """y minus its least-squares fit on x (with intercept)."""
    design = torch.stack([torch.ones_like(x), x], 1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution
    return y - (design @ coef)[:, 0]


def _response(gamma_trace, events):
    """Partial correlation of gamma_{t+1} and events_t given gamma_t (second half of training)."""
    g = torch.tensor(_late(_scope_mean(gamma_trace)), dtype=torch.float64)
    e = torch.tensor(_late(events), dtype=torch.float64)[: len(g) - 1]
    now, following = g[: len(e)], g[1: len(e) + 1]
    return _corr(_residual(following, now).tolist(), _residual(e, now).tolist())


def _late(values):
    """The second half of a trace: oscillation is measured once training has settled."""
    return values[len(values) // 2:]


def summarize(store, cfg) -> dict:
    rows = []
    for task in cfg.tasks:
        adamw_ms = None
        for name in list(cfg.optimizers) + list(cfg.active_controls):
            lr, runs = seed_runs(store, cfg, task, name)
            if not runs:
                continue
            acc = [r["test_acc"] for r in runs]
            row = dict(task=task, optimizer=name, lr=lr, seeds=len(runs),
                       test_mean=_mean_std(acc)[0], test_std=_mean_std(acc)[1],
                       val_mean=statistics.fmean(r["val_acc"] for r in runs),
                       ms_per_step=statistics.fmean(r["ms_per_step"] for r in runs),
                       diverged=sum(r["diverged"] for r in runs))
            if runs[0]["flips"]:
                row["flips_late"] = statistics.fmean(statistics.fmean(_late(r["flips"]))
                                                     for r in runs)
                row["osc_late"] = statistics.fmean(statistics.fmean(_late(r["oscillations"]))
                                                   for r in runs)
            if runs[0]["gamma"] and runs[0]["gamma"][0] is not None:
                rho = [v for r in runs for v in _scope_mean(r["rho"])[1:]]
                gamma = [v for r in runs for v in _scope_mean(r["gamma"])[1:]]
                row["rho_q"] = _quantiles(rho)
                row["gamma_q"] = _quantiles(gamma)
                row["gamma_mean"] = statistics.fmean(gamma)
                # Does the damping respond to what step t did? gamma_{t+1} against the loss / flips
                # of step t, both with the part explained by gamma_t removed: a larger gamma_t makes
                # a larger step (more flips), and noisy gamma regresses to its mean, so a plain
                # correlation would measure those effects. Second half of training only.
                row["corr_gamma_loss"] = statistics.fmean(
                    _response(r["gamma"], r["loss"]) for r in runs)
                if runs[0]["flips"]:
                    row["corr_gamma_flips"] = statistics.fmean(
                        _response(r["gamma"], r["flips"]) for r in runs)
            if name == "adamw":
                adamw_ms = row["ms_per_step"]
            rows.append(row)
        for row in rows:
            if row["task"] == task and adamw_ms:
                row["time_vs_adamw"] = row["ms_per_step"] / adamw_ms
    backends = sorted({r["backend"] for r in store.records.values() if r.get("backend")})
    return dict(rows=rows, grid=grid_scores(store, cfg), machine=machine(),
                sadam_backends=backends,
                config=dict(tasks=cfg.tasks, optimizers=cfg.optimizers,
                            controls=cfg.active_controls, grid=cfg.grid, seeds=cfg.seeds,
                            steps={t: cfg.steps_for(t) for t in cfg.tasks}))


def grid_scores(store, cfg):
    """Validation accuracy of seed 0 at every grid learning rate: {task: {optimizer: [acc]}}."""
    scores = {}
    for task in cfg.tasks:
        for name in cfg.optimizers:
            runs = [store.get(RunSpec(task, name, lr, 0, cfg.steps_for(task)).key)
                    for lr in cfg.grid]
            scores.setdefault(task, {})[name] = [None if r is None else r["val_acc"]
                                                  for r in runs]
    return scores


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    import os
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def _fmt(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(summary) -> str:
    rows = summary["rows"]
    by_task = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    out = [f"Machine: {summary['machine']}; S-Adam backend: "
           f"{', '.join(summary['sadam_backends']) or 'n/a'}", ""]
    out += ["### Test accuracy (mean ± std over seeds, lr picked on validation)", "",
            "| task | optimizer | lr | test acc | val acc | seeds | ms/step | x AdamW time |",
            "|---|---|---|---|---|---|---|---|"]
    for task, task_rows in by_task.items():
        best = max(r["test_mean"] for r in task_rows)
        for r in task_rows:
            acc = f"{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f}"
            if r["test_mean"] == best:
                acc = f"**{acc}**"
            div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
            out.append(f"| {task} | {r['optimizer']} | {r['lr']:.3g} | {acc}{div} | "
                       f"{100 * r['val_mean']:.2f} | {r['seeds']} | {r['ms_per_step']:.2f} | "
                       f"{_fmt(r.get('time_vs_adamw'), '.2f')} |")
    grid = summary["config"]["grid"]
    out += ["", "### Learning-rate sensitivity: validation accuracy of seed 0 over the grid", "",
            "| task | optimizer | " + " | ".join(f"lr={lr:g}" for lr in grid) + " |",
            "|---|---|" + "---|" * len(grid)]
    for task, by_name in summary["grid"].items():
        for name, accs in by_name.items():
            cells = " | ".join("n/a" if a is None else f"{100 * a:.1f}" for a in accs)
            out.append(f"| {task} | {name} | {cells} |")
    probe_rows = [r for r in rows if "rho_q" in r]
    if probe_rows:
        out += ["", "### rho and gamma over training (10th / 50th / 90th percentile of steps; "
                "correlations over the second half of training)", "",
                "| task | optimizer | rho p10/p50/p90 | gamma p10/p50/p90 | mean gamma | "
                "corr(gamma_t+1, loss_t given gamma_t) | corr(gamma_t+1, flips_t given gamma_t) |",
                "|---|---|---|---|---|---|---|"]
        for r in probe_rows:
            rq = "/".join(_fmt(v, ".2f") for v in r["rho_q"])
            gq = "/".join(_fmt(v, ".2f") for v in r["gamma_q"])
            out.append(f"| {r['task']} | {r['optimizer']} | {rq} | {gq} | "
                       f"{_fmt(r['gamma_mean'])} | {_fmt(r['corr_gamma_loss'], '.2f')} | "
                       f"{_fmt(r.get('corr_gamma_flips'), '.2f')} |")
    qat_rows = [r for r in rows if "flips_late" in r]
    if qat_rows:
        out += ["", "### QAT weight flips in the second half of training (% of low-bit weights "
                "per step)", "",
                "| task | optimizer | flips | oscillations (reversals) |", "|---|---|---|---|"]
        for r in qat_rows:
            out.append(f"| {r['task']} | {r['optimizer']} | {100 * r['flips_late']:.3f} | "
                       f"{100 * r['osc_late']:.3f} |")
    return "\n".join(out) + "\n"


def write(summary, out_dir) -> str:
    text = markdown(summary)
    with open(f"{out_dir}/table.md", "w") as f:
        f.write(text)
    with open(f"{out_dir}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return text
