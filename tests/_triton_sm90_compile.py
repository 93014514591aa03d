"""Compile every Triton kernel variant for an sm_90 GPU without one (run without TRITON_INTERPRET).

The interpreter accepts things the GPU compiler rejects (types, pointer casts, shapes), so the
kernels are also lowered all the way to a cubin here. Prints one line per variant; exit status 0
when all compiled.
"""
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

from sadam.kernel_report.triton import compile_kernel, step_kernel  # noqa: E402
from sadam.triton_kernels import _hash, _tables, finalize, probe  # noqa: E402


def step_variant(p, s, **flags):
    return step_kernel(p, s, **flags)[0]


VARIANTS = {
    "update fp32 lag1 amsgrad maximize scaler tensor-lr": lambda: step_variant(
        0, 0, do_update=True, emit_probe=True, k=8, amsgrad=True, maximize=True,
        tensors_hyper=True, scaler=True),
    "update fp32 lag0 (damped, no sums) k=5": lambda: step_variant(
        0, 0, do_update=True, emit_probe=False, k=5, damped=True),
    "update bf16 params fp32 states, fp32 grads": lambda: step_variant(
        2, 0, g=0, do_update=True, emit_probe=True, k=8),
    "update bf16 params+states k=32": lambda: step_variant(
        2, 2, do_update=True, emit_probe=True, k=32),
    "update fp16 no probe": lambda: step_variant(
        1, 0, do_update=True, emit_probe=False, k=0, damped=False, scaler=True),
    "probe pass bf16 k=1": lambda: step_variant(
        2, 0, do_update=False, emit_probe=True, k=1, damped=False, maximize=True, scaler=True),
    "reduce k=8": lambda: compile_kernel(
        probe.reduce_partials_kernel,
        dict(partials="*fp32", row_start="*i32", row_chunks="*i32", d="*fp32"),
        dict(K=8, K_PAD=8, RBLOCK=_tables.reduce_block(8)), num_warps=8),
    **{f"finalize lag={lag}": (lambda lag=lag: compile_kernel(
        finalize.finalize_kernel,
        dict(stats="*fp32", stats_stride="i32", d="*fp32", rows="*i32", damping="*fp32",
             found_inf="*fp32", probe_beta="fp32", probe_beta_comp="fp32", window="i32"),
        dict(LAG=lag, K=8, K_PAD=8), num_warps=1)) for lag in (0, 1)},
    "hash": lambda: compile_kernel(
        _hash.probe_hash_kernel,
        dict(index_ptr="*i64", out_ptr="*i64", key_base="i64", epoch="i64", n="i32"),
        dict(BLOCK=1024)),
}


def main():
    failed = 0
    for name, build in VARIANTS.items():
        try:
            build()
            print(f"ok      {name}")
        except Exception as exc:  # report every variant, then fail
            failed += 1
            print(f"FAILED  {name}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
