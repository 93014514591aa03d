"""PNG figures of the study (matplotlib, Agg backend: no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .report import seed_runs  # noqa: E402

SADAM_PREFIX = "sadam_"


def _smooth(values, window):
    t = torch.tensor(values, dtype=torch.float64)
    if len(t) < window:
        return t.numpy()
    return torch.nn.functional.avg_pool1d(t[None, None], window, 1)[0, 0].numpy()


def _mean_trace(runs, field, reduce_scopes=True):
    traces = [[sum(v) / len(v) for v in r[field]] if reduce_scopes else r[field] for r in runs]
    n = min(len(t) for t in traces)
    return torch.tensor([t[:n] for t in traces], dtype=torch.float64).mean(0)


def accuracy_bars(summary, path):
    tasks = list(dict.fromkeys(r["task"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary["rows"] if r["task"] == task]
        means = [100 * r["test_mean"] for r in rows]
        stds = [100 * r["test_std"] for r in rows]
        colors = ["tab:red" if r["optimizer"].startswith(SADAM_PREFIX) else
                  "tab:gray" if "ctl" in r["optimizer"] else "tab:blue" for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(rows)), [r["optimizer"] for r in rows], rotation=60, ha="right",
                      fontsize=7)
        low = min(m - s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + s for m, s in zip(means, stds)) + 2))
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rho_gamma_traces(store, cfg, path):
    variants = [o for o in cfg.optimizers if o.startswith(SADAM_PREFIX)]
    if not variants:
        return False
    fig, axes = plt.subplots(len(cfg.tasks), 2, figsize=(9, 2.4 * len(cfg.tasks)), squeeze=False)
    for row, task in zip(axes, cfg.tasks):
        for name in variants:
            _, runs = seed_runs(store, cfg, task, name)
            if not runs:
                continue
            for ax, field in zip(row, ("rho", "gamma")):
                ax.plot(_smooth(_mean_trace(runs, field).tolist(), 15), label=name, lw=1)
                ax.set_title(f"{task}: {field} (mean over scopes and seeds, 15-step average)",
                             fontsize=8)
                ax.set_xlabel("step", fontsize=8)
        if row[0].lines:
            row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def rho_distributions(store, cfg, path):
    """Histogram of the per-step rho of every S-Adam variant (all seeds pooled), per task."""
    variants = [o for o in cfg.optimizers if o.startswith(SADAM_PREFIX)]
    if not variants:
        return False
    fig, axes = plt.subplots(1, len(cfg.tasks), figsize=(3.6 * len(cfg.tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], cfg.tasks):
        for name in variants:
            _, runs = seed_runs(store, cfg, task, name)
            values = [sum(v) / len(v) for r in runs for v in r["rho"][1:]]
            if values:
                ax.hist(values, bins=40, range=(0, 1), histtype="step", density=True, label=name)
        ax.set_title(f"{task}: rho per step", fontsize=8)
        ax.set_xlabel("rho", fontsize=8)
    if axes[0][0].patches:
        axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def rho_heatmap(store, cfg, path, variant="sadam_grad_tensor"):
    if variant not in cfg.optimizers:
        return False
    fig, axes = plt.subplots(len(cfg.tasks), 1, figsize=(9, 2.2 * len(cfg.tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], cfg.tasks):
        _, runs = seed_runs(store, cfg, task, variant)
        if not runs:
            continue
        matrix = _mean_trace(runs, "rho", reduce_scopes=False).T  # (params, steps)
        image = ax.imshow(matrix.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        ax.set_yticks(range(len(runs[0]["param_names"])), runs[0]["param_names"], fontsize=6)
        ax.set_title(f"{task}: rho per tensor ({variant}, mean over seeds)", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def oscillation_curves(store, cfg, path):
    qat = [t for t in cfg.tasks if store_has_flips(store, cfg, t)]
    if not qat:
        return False
    fig, axes = plt.subplots(1, len(qat), figsize=(4.5 * len(qat), 3.4), squeeze=False)
    for ax, task in zip(axes[0], qat):
        for name in list(cfg.optimizers) + list(cfg.active_controls):
            _, runs = seed_runs(store, cfg, task, name)
            if runs:
                curve = _smooth(_mean_trace(runs, "flips", reduce_scopes=False).tolist(), 20)
                ax.plot(100 * curve, label=name, lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{task}: weight flips per step", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("% of low-bit weights", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def store_has_flips(store, cfg, task):
    _, runs = seed_runs(store, cfg, task, cfg.optimizers[0])
    return bool(runs and runs[0]["flips"])


def write_all(store, cfg, summary, out_dir):
    """Writes every figure that the study's contents allow; returns their paths."""
    paths = []
    if not summary["rows"]:
        return paths
    accuracy_bars(summary, f"{out_dir}/accuracy.png")
    paths.append(f"{out_dir}/accuracy.png")
    for name, make in (("rho_gamma", rho_gamma_traces), ("rho_hist", rho_distributions),
                       ("rho_heatmap", rho_heatmap),
                       ("oscillation", oscillation_curves)):
        if make(store, cfg, f"{out_dir}/{name}.png"):
            paths.append(f"{out_dir}/{name}.png")
    return paths
