"""Where the CPU kernel's time goes: ns per parameter element of its passes, interleaved medians.

    .venv/bin/python bench/cpu_breakdown.py [--numel 124000000] [--threads 1] [--rounds 15]

Rows (same tensors, the passes interleaved round by round so load changes hit all alike):
  fused AdamW         torch's fused AdamW step (the anchor: 28 bytes moved per element)
  probe off           SAdam's update alone (same 28 bytes)
  lag 1               the update with the probe fused into the same pass
  lag 0               the probe pass, then the update
  probe pass          read g, hash, 8 masked sums (4 bytes per element)
  probe pass in L2    the same on a 256K-element gradient that stays in L2: the arithmetic alone
  read g              torch's sum of g: the memory floor of the probe pass
Each for the capability torch picks, and with --capability for another one (DEFAULT, AVX2).
"""
import argparse
import statistics
import time

import torch

from sadam import SAdam, _ops
from sadam import _layout as L


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def probe_pass(grads, probes=8):
    """The lag-0 probe pass over `grads` (sadam::native_directional, one scope)."""
    stats = L.new_stats(1, probes, "cpu")
    n = len(grads)
    return lambda: _ops.directional(grads, stats, None, [0] * n, list(range(n)), [0] * n,
                                    probes, 0, 0, False)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=124_000_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--capability", default="", help="DEFAULT, AVX2 or AVX512 (default: torch's)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = _ops.load()
    ext.set_cpu_capability(args.capability)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(args.numel, generator=gen) * 0.02)]
    params[0].grad = torch.randn(args.numel, generator=gen) * 1e-3
    small = [torch.randn(1 << 18, generator=gen)]
    repeats = max(1, args.numel // small[0].numel())

    def sadam(**kw):
        return SAdam(params, lr=1e-4, weight_decay=0.01, backend="cpu", **kw).step

    passes = {
        "fused AdamW": torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True).step,
        "probe off": sadam(probe="off"),
        "lag 1": sadam(probe_lag=1),
        "lag 0": sadam(probe_lag=0),
        "probe pass": probe_pass([params[0].grad]),
        "probe pass in L2": (lambda f: lambda: [f() for _ in range(repeats)])(probe_pass(small)),
        "read g": lambda: params[0].grad.sum(),
    }
    for fn in passes.values():  # state allocation outside the timing
        fn(), fn()
    times = {name: [] for name in passes}
    for _ in range(args.rounds):
        for name, fn in passes.items():
            times[name].append(seconds(fn))
    per_element = {n: statistics.median(t) / args.numel * 1e9 for n, t in times.items()}
    anchor = per_element["fused AdamW"]
    print(f"capability {ext.cpu_capability()}, {args.threads} thread(s), {args.numel:,} fp32 "
          f"elements, median of {args.rounds} interleaved rounds")
    print(f"| pass | ns / element | x fused AdamW |\n|---|---|---|")
    for name, ns in per_element.items():
        print(f"| {name} | {ns:.3f} | {ns / anchor:.2f} |")


if __name__ == "__main__":
    main()
