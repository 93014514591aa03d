"""PSS demo: a small transformer on sklearn digits at a learning rate where AdamW blows up.

Trains the same model with AdamW and SAdam, each with and without PSS, over several seeds; writes
loss and top-singular-value plots, the fraction of steps where PSS fired and its time overhead.

    python -m sadam.pss_demo                  # defaults below, ~2-4 minutes on 2 CPU cores
    python -m sadam.pss_demo --lr 0.1 --seeds 3 --steps 200 --out pss_demo_out
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .optimizer import SAdam
from .pss import PSS

CONFIGS = [("AdamW", False), ("AdamW+PSS", True), ("SAdam", False), ("SAdam+PSS", True)]


class DigitTransformer(nn.Module):
    """Each 8x8 digit as 8 tokens of 8 pixels; pre-LN encoder, mean-pooled, linear head."""

    def __init__(self, d=64, layers=2, heads=4):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(8, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.view(-1, 8, 8)) + self.pos).mean(1))


def load_data(seed=0):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:297], perm[297:]
    return (X[train], y[train]), (X[test], y[test])


def top_sigma(model):
    """Largest sigma_1 over the model's weight matrices (exact, for the plot)."""
    with torch.no_grad():
        return max(float(torch.linalg.matrix_norm(p.reshape(p.shape[0], -1), ord=2))
                   for p in model.parameters() if p.ndim >= 2)


def reset_momentum(opt):
    """Zero the first moments (an ablation: PSS itself leaves the optimizer state alone)."""
    for state in opt.state.values():
        if "exp_avg" in state:
            state["exp_avg"].zero_()


def train(opt_name, use_pss, seed, args, data, progress):
    (Xtr, ytr), (Xte, yte) = data
    torch.manual_seed(seed)
    model = DigitTransformer()
    opt_cls = SAdam if opt_name == "SAdam" else torch.optim.AdamW
    opt = opt_cls(model.parameters(), lr=args.lr, weight_decay=0.0)
    pss = (PSS(model, tau=args.tau, warmup=args.warmup, smooth=args.smooth,
               strength=args.strength, every=args.every) if use_pss else None)
    # linear learning-rate warm-up (as transformers are trained): the instability then appears
    # mid-run, after the trigger's own warm-up, instead of at the first step
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / args.lr_warmup) if args.lr_warmup else 1.0)
    batches = torch.Generator().manual_seed(1000 + seed)
    losses, sigmas, fired, gammas, pss_time, total_time = [], [], [], [], 0.0, 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(Xtr), (args.batch,), generator=batches)
        loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        if pss is not None:
            pss.observe()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        sched.step()
        if pss is not None and pss.step() is not None:
            fired.append(step)
            if args.reset_momentum:
                reset_momentum(opt)
        t4 = time.perf_counter()
        pss_time += (t2 - t1) + (t4 - t3)
        total_time += t4 - t0
        losses.append(float(loss.detach()))
        if opt_name == "SAdam":  # the damping SAdam applied (its step is AdamW's times gamma)
            gammas.append(float(opt.damping_factors()[0]))
        if step % args.sigma_every == 0 or step == 1:
            sigmas.append((step, top_sigma(model)))
        progress.update(1)
    with torch.no_grad():
        acc = float((model(Xte).argmax(1) == yte).float().mean())
    return dict(optimizer=opt_name, pss=use_pss, seed=seed, losses=losses, sigmas=sigmas,
                fired=fired, mean_gamma=sum(gammas) / len(gammas) if gammas else None,
                test_acc=acc if math.isfinite(losses[-1]) else 0.0,
                pss_seconds=pss_time, total_seconds=total_time)


def failed(losses):
    """Diverged: a NaN/inf loss or a loss above the starting loss after the first step."""
    return any(not math.isfinite(x) or x > losses[0] for x in losses[1:])


def summarize(runs, args):
    rows = []
    for name, use_pss in CONFIGS:
        sel = [r for r in runs if r["optimizer"] == name.split("+")[0] and r["pss"] == use_pss]
        final = [sum(r["losses"][-20:]) / len(r["losses"][-20:]) for r in sel]
        rows.append(dict(
            config=name, seeds=len(sel),
            diverged=sum(failed(r["losses"]) for r in sel),
            peak_loss=[max(r["losses"]) for r in sel], final_loss=final,
            test_acc=[r["test_acc"] for r in sel],
            mean_gamma=[r["mean_gamma"] for r in sel],
            fired_fraction=sum(len(r["fired"]) for r in sel) / (len(sel) * args.steps),
            first_fired=[r["fired"][:3] for r in sel],
            # time in observe()+step() over the rest of the training step
            pss_overhead=(sum(r["pss_seconds"] for r in sel)
                          / sum(r["total_seconds"] - r["pss_seconds"] for r in sel))))
    return rows


def plot(runs, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"AdamW": "tab:red", "AdamW+PSS": "tab:blue", "SAdam": "tab:orange",
              "SAdam+PSS": "tab:green"}
    fig, (ax_loss, ax_sig) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        name = r["optimizer"] + ("+PSS" if r["pss"] else "")
        label = name if r["seed"] == 0 else None
        steps = range(1, len(r["losses"]) + 1)
        ax_loss.plot(steps, r["losses"], color=colors[name], lw=0.8, alpha=0.8, label=label)
        s_steps, s_vals = zip(*r["sigmas"])
        ax_sig.plot(s_steps, s_vals, color=colors[name], lw=0.8, alpha=0.8, label=label)
        for t in r["fired"]:
            ax_sig.axvline(t, color=colors[name], lw=0.5, alpha=0.3, ls=":")
    pss_desc = f"PSS {args.smooth}" + (f" strength {args.strength}" if args.strength != 1 else "")
    pss_desc += f", every {args.every}" if args.every else ""
    pss_desc += ", momentum reset on firing" if args.reset_momentum else ""
    ax_loss.set(yscale="log", xlabel="step", ylabel="train loss (minibatch)",
                title=f"digits transformer, lr={args.lr}, {args.seeds} seeds; {pss_desc}")
    ax_sig.set(yscale="log", xlabel="step", ylabel="max sigma_1 over weight matrices",
               title="top singular value (dotted: PSS fired)")
    ax_loss.legend()
    ax_sig.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr-warmup", type=int, default=50)
    ap.add_argument("--tau", type=float, default=2.5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smooth", default="log", choices=["log", "sqrt", "clip"])
    ap.add_argument("--strength", type=float, default=1.0,
                    help="0 keeps the trigger (and --reset-momentum) but changes no weight")
    ap.add_argument("--every", type=int, default=None, help="also smooth every N steps")
    ap.add_argument("--reset-momentum", action="store_true",
                    help="ablation: zero the optimizer's first moments whenever PSS fires")
    ap.add_argument("--sigma-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="pss_demo_out")
    args = ap.parse_args(argv)
    from tqdm import tqdm
    torch.set_num_threads(args.threads)
    data = load_data()
    os.makedirs(args.out, exist_ok=True)
    runs = []
    with tqdm(total=len(CONFIGS) * args.seeds * args.steps, desc="pss demo") as progress:
        for seed in range(args.seeds):
            for name, use_pss in CONFIGS:
                progress.set_postfix_str(f"{name} seed {seed}")
                runs.append(train(name.split("+")[0], use_pss, seed, args, data, progress))
    rows = summarize(runs, args)
    plot(runs, os.path.join(args.out, "pss_demo.png"), args)
    with open(os.path.join(args.out, "pss_demo.json"), "w") as f:
        json.dump(dict(args=vars(args), summary=rows, runs=runs), f)
    for row in rows:
        print(f"{row['config']:10s} diverged {row['diverged']}/{row['seeds']}  "
              f"peak loss {' '.join(f'{x:.3g}' for x in row['peak_loss'])}  "
              f"final loss {' '.join(f'{x:.3f}' for x in row['final_loss'])}  "
              f"test acc {' '.join(f'{x:.3f}' for x in row['test_acc'])}  "
              + (f"mean gamma {' '.join(f'{x:.3f}' for x in row['mean_gamma'])}  "
                 if row["config"].startswith("SAdam") else "")
              + (f"PSS fired on {100 * row['fired_fraction']:.2f}% of steps, time overhead "
                 f"{100 * row['pss_overhead']:.2f}%" if "PSS" in row["config"] else ""))
    return rows


if __name__ == "__main__":
    main()
