"""Compile every Triton kernel variant for an sm_90 GPU without one (run without TRITON_INTERPRET).

The interpreter accepts things the GPU compiler rejects (types, pointer casts, shapes), so the
kernels are also lowered all the way to a cubin here. Prints one line per variant; exit status 0
when all compiled.
"""
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sadam.triton_kernels import _hash, _tables, finalize, probe, update  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(fn, signature, constexprs, num_warps=4):
    """Lower ``fn`` to a cubin; ``signature`` maps runtime args to types, constexprs to values."""
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    sig = {name: sig[name] for name in fn.arg_names}  # argument order
    src = ASTSource(fn, sig, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
    return compiled


def step_variant(p, s, *, aligned=True, do_update, emit_probe, k, amsgrad, maximize, tensors_hyper, scaler):
    hyper = "*fp32" if tensors_hyper else "fp32"
    k_pad = max(2, triton.next_power_of_2(k))
    block, iters, num_warps = _tables.block_size(k_pad)
    signature = dict(chunk_tensor="*i32", addresses="*i64", layout="*i64", stats="*fp32",
                     stats_stride="i32", lr=hyper, beta1=hyper, beta2="fp32", eps="fp32",
                     beta2_comp="fp32", beta2_log2="fp32",
                     weight_decay=hyper, damping=hyper, window="i32")
    constexprs = dict(P_KIND=p, G_KIND=p, S_KIND=s, DO_UPDATE=do_update, EMIT_PROBE=emit_probe,
                      DAMPED=True, AMSGRAD=amsgrad, MAXIMIZE=maximize, K=k,
                      K_PAD=k_pad, BLOCK=block, ITERS=iters, ALIGNED=aligned)
    if tensors_hyper:  # a device-scalar beta1: complement and log taken in the kernel
        constexprs.update(beta1_comp=None, beta1_log2=None)
    else:
        signature.update(beta1_comp="fp32", beta1_log2="fp32")
    if emit_probe:
        signature["partials"] = "*fp32"
    else:
        constexprs["partials"] = None
    if scaler:
        signature.update(grad_scale="*fp32", found_inf="*fp32")
    else:
        constexprs.update(grad_scale=None, found_inf=None)
    return compile_variant(update.multi_tensor_step_kernel, signature, constexprs, num_warps)


VARIANTS = {
    "update fp32 lag1 amsgrad maximize scaler tensor-lr": lambda: step_variant(
        0, 0, do_update=True, emit_probe=True, k=8, amsgrad=True, maximize=True,
        tensors_hyper=True, scaler=True),
    "update bf16 params+states k=32": lambda: step_variant(
        2, 2, do_update=True, emit_probe=True, k=32, amsgrad=False, maximize=False,
        tensors_hyper=False, scaler=False),
    "update fp16 no probe": lambda: step_variant(
        1, 0, aligned=False, do_update=True, emit_probe=False, k=4, amsgrad=False, maximize=False,
        tensors_hyper=False, scaler=True),
    "probe pass bf16 k=1": lambda: step_variant(
        2, 0, do_update=False, emit_probe=True, k=1, amsgrad=False, maximize=True,
        tensors_hyper=False, scaler=True),
    "reduce k=8": lambda: compile_variant(
        probe.reduce_partials_kernel,
        dict(partials="*fp32", row_start="*i32", row_chunks="*i32", d="*fp32"),
        dict(K=8, K_PAD=8, RBLOCK=_tables.reduce_block(8)), num_warps=8),
    **{f"finalize lag={lag}": (lambda lag=lag: compile_variant(
        finalize.finalize_kernel,
        dict(stats="*fp32", stats_stride="i32", d="*fp32", rows="*i32", damping="*fp32",
             found_inf="*fp32", probe_beta="fp32", probe_beta_comp="fp32", window="i32"),
        dict(LAG=lag, K=8, K_PAD=8), num_warps=1)) for lag in (0, 1)},
    "hash": lambda: compile_variant(
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
