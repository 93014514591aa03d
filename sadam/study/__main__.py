"""``python -m sadam.study``: S-Adam vs AdamW and the other baselines on non-smooth training.

    python -m sadam.study --quick            # the demo: 2-bit QAT digits CNN, 3 seeds, minutes
    python -m sadam.study                    # the full study (results/study.jsonl, resumable)
"""
import argparse
import os
import sys

from tqdm import tqdm

from . import optimizers, tasks
from .store import ResultStore
from .study import full_config, quick_config, run_study


def _csv(cast=str):
    return lambda text: tuple(cast(v) for v in text.split(",") if v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sadam.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the small demo plan (one task, S-Adam vs AdamW, 3 seeds)")
    p.add_argument("--tasks", type=_csv(), help=f"comma list of {', '.join(tasks.TASKS)}")
    p.add_argument("--optimizers", type=_csv(),
                   help=f"comma list of {', '.join(optimizers.OPTIMIZERS)}")
    p.add_argument("--controls", type=_csv(),
                   help=f"comma list of {', '.join(optimizers.CONTROLS)} (AdamW at lr * mean "
                        "gamma of an S-Adam variant); empty string for none")
    p.add_argument("--grid", type=_csv(float), help="learning-rate grid, comma separated")
    p.add_argument("--seeds", type=int, help="seeds per optimizer at the picked lr")
    p.add_argument("--steps", type=int, help="training steps of every run (overrides the tasks')")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs in parallel, one process and one thread each (default: up to 2)")
    p.add_argument("--out", help="result folder (default results/ or results/quick/)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--timing", action="store_true",
                   help="only measure time per step of each optimizer on each task, side by side")
    p.add_argument("--report-only", action="store_true",
                   help="only summarize the runs already in the result file (no training)")
    args = p.parse_args(argv)
    for name in args.tasks or ():
        if name not in tasks.TASKS:
            p.error(f"--tasks: unknown {name!r}; choose from {list(tasks.TASKS)}")
    for name in args.optimizers or ():
        if name not in optimizers.OPTIMIZERS:
            p.error(f"--optimizers: unknown {name!r}; choose from {list(optimizers.OPTIMIZERS)}")
    for name in args.controls or ():
        if name not in optimizers.CONTROLS:
            p.error(f"--controls: unknown {name!r}; choose from {list(optimizers.CONTROLS)}")
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be at least 1")
    return args


def _timing(cfg, out):
    import json

    from .timing import markdown, time_task
    results = {task: time_task(task, cfg.optimizers) for task in tqdm(cfg.tasks, desc="timing")}
    text = markdown(results)
    with open(f"{out}/timing.md", "w") as f:
        f.write(text)
    with open(f"{out}/timing.json", "w") as f:
        json.dump(results, f, indent=1)
    print(text)
    print(f"timing table: {out}/timing.md")
    return 0


def main(argv=None):
    args = parse_args(argv)
    out = args.out or ("results/quick" if args.quick else "results")
    make = quick_config if args.quick else full_config
    cfg = make(out, tasks=args.tasks, optimizers=args.optimizers, controls=args.controls,
               grid=args.grid, seeds=args.seeds, steps=args.steps, jobs=args.jobs)
    os.makedirs(out, exist_ok=True)
    if args.timing:
        return _timing(cfg, out)
    try:
        store = ResultStore(f"{out}/study.jsonl") if args.report_only else run_study(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are saved in {out}/study.jsonl; "
              "run the same command again to continue", file=sys.stderr)
        return 130
    from . import plots, report
    summary = report.summarize(store, cfg)
    print(report.write(summary, out))
    print(f"table: {out}/table.md (numbers also in {out}/summary.json)")
    if not args.no_plots:
        for path in plots.write_all(store, cfg, summary, out):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
