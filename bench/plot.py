"""Chart of pytest-benchmark results: step time relative to torch's fused AdamW, per size.

    python bench/plot.py bench/results/<machine>.json [more.json ...]    # writes <machine>.png
    python bench/plot.py --machine-name    # the name `make bench` gives the files

Convention for every benchmark in bench/ (read from ``benchmark.extra_info``):

    extra_info["params"]                number of parameter elements one step updates (x axis)
    extra_info["ratio_vs_fused_adamw"]  this benchmark's time divided by torch's fused AdamW time
                                        for the same parameters, measured in the same run
                                        (values < 1: faster than fused AdamW)
    extra_info["series"]                optional line label; default: the benchmark's group, else
                                        its name without the [parametrization]

Benchmarks without ``params`` and ``ratio_vs_fused_adamw`` are listed and left out of the chart.
"""
import argparse
import json
import os
import platform
import re
import sys
from collections import defaultdict


def machine_name() -> str:
    """A file-name-safe name for this machine: the GPU if torch sees one, else the CPU model."""
    name = None
    try:
        import torch
        if torch.cuda.is_available():
            name = f"{torch.cuda.get_device_name(0)}-x{torch.cuda.device_count()}"
    except ImportError:
        pass
    if name is None:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1] for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        name = f"{name.strip()}-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def series(results):
    """{label: sorted [(params, ratio)]} and the names of benchmarks without the convention."""
    lines, skipped = defaultdict(list), []
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        if "params" not in info or "ratio_vs_fused_adamw" not in info:
            skipped.append(bench["fullname"])
            continue
        label = info.get("series") or bench.get("group") or bench["name"].split("[")[0]
        lines[label].append((int(info["params"]), float(info["ratio_vs_fused_adamw"])))
    return {k: sorted(v) for k, v in sorted(lines.items())}, skipped


def plot(json_path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        results = json.load(f)
    lines, skipped = series(results)
    for name in skipped:
        print(f"{json_path}: {name} has no params / ratio_vs_fused_adamw in extra_info; "
              "left out of the chart", file=sys.stderr)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in lines.items():
        ax.plot([p for p, _ in points], [r for _, r in points], marker="o", label=label)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="torch fused AdamW")
    ax.set_xscale("log")
    ax.set_xlabel("parameter elements per step")
    ax.set_ylabel("time / fused AdamW time")
    machine = os.path.splitext(os.path.basename(json_path))[0]
    ax.set_title(f"{machine} ({results.get('datetime', '')[:10]})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(json_path)[0] + ".png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="*", help="pytest-benchmark JSON files")
    p.add_argument("--machine-name", action="store_true", help="print this machine's name")
    args = p.parse_args(argv)
    if args.machine_name:
        print(machine_name())
        return 0
    if not args.json:
        p.error("give at least one pytest-benchmark JSON file")
    for path in args.json:
        print(f"chart: {plot(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
