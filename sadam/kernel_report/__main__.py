"""``python -m sadam.kernel_report [--json PATH] [--backend NAME]``: the sm_90 kernel report.

Collects ``records()`` from every backend module present (``sadam.kernel_report.triton``,
``sadam.kernel_report.cuda``); a backend that cannot report here (module missing, toolchain or
build absent) is skipped with its reason printed, so the report still covers the others.
"""
import argparse
import importlib
import json
import os
import sys

from . import BACKENDS, KEYS

COLUMNS = (("backend", 7), ("kernel", 9), ("param_dtype", 5), ("state_dtype", 5), ("probes", 6),
           ("lag", 4), ("registers", 5), ("spills", 6), ("shared_bytes", 7),
           ("barriers_in_loop", 5), ("access_bits", 6), ("bytes_per_param", 6),
           ("sass_per_element", 7))
HEADERS = {"param_dtype": "param", "state_dtype": "state", "registers": "regs",
           "shared_bytes": "shared", "barriers_in_loop": "bars", "access_bits": "bits",
           "bytes_per_param": "B/par", "sass_per_element": "SASS/el"}


def collect(backends=BACKENDS, out=sys.stdout):
    """Records of every backend that can report; prints why a backend is skipped."""
    records = []
    for name in backends:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
            found = module.records()
        except Exception as exc:  # an optional backend: report the others
            print(f"skipped {name}: {type(exc).__name__}: {exc}", file=out)
            continue
        for record in found:
            if tuple(record) != KEYS:
                raise ValueError(f"{name} record keys {tuple(record)} != {KEYS}")
        records.extend(found)
    return records


def table(records) -> str:
    def cell(value):
        return "-" if value is None else str(value)
    lines = [" ".join(HEADERS.get(k, k).rjust(w) for k, w in COLUMNS)]
    for r in records:
        lines.append(" ".join(cell(r[k]).rjust(w) for k, w in COLUMNS))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sadam.kernel_report",
                                     description="sm_90 compiled-code report of the GPU kernels")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="only this backend (repeatable; default: all present)")
    parser.add_argument("--all-k", action="store_true",
                        help="every probe count 1..32 (default: one k per register footprint)")
    args = parser.parse_args(argv)
    if args.all_k:
        os.environ["SADAM_REPORT_ALL_K"] = "1"
    records = collect(args.backend or BACKENDS)
    print(table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
