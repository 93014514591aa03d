"""Triton records of the kernel report: every kernel variant compiled for sm_90 without a GPU.

``compile_kernel`` lowers a ``@triton.jit`` function to a cubin for ``GPUTarget("cuda", 90, 32)``
(run without TRITON_INTERPRET); ``records()`` compiles the report's variants and reads each one's
SASS with :mod:`sadam.kernel_report.sass`. Compiled kernels land in Triton's own cache, so a second
run takes seconds.
"""
import os
from typing import Dict, List

from .sass import analyze

BACKEND = "triton"
DTYPES = {0: "fp32", 1: "fp16", 2: "bf16"}
SIZES = {0: 4, 1: 2, 2: 2}
# One k per register footprint (k only moves statistics columns outside the loop; the loop depends
# on k rounded up to a power of two); SADAM_REPORT_ALL_K=1 (``--all-k``) compiles every k.
PROBE_COUNTS = (1, 2, 3, 4, 8, 16, 32)


def _triton():
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("the kernel report compiles for sm_90; run it without TRITON_INTERPRET")
    import triton
    from triton.backends import backends
    if "nvidia" not in backends:
        raise RuntimeError("triton has no NVIDIA backend")
    return triton


def compile_kernel(fn, signature: Dict[str, str], constexprs: Dict[str, object], num_warps=4):
    """Lower ``fn`` to an sm_90 cubin; ``signature`` maps runtime arguments to Triton types
    ("*fp32", "i64", ...), ``constexprs`` the compile-time ones (None included) to values."""
    triton = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [n for n in fn.arg_names if n not in sig]
    if missing:
        raise TypeError(f"{fn.__name__}: no type for {missing}")
    sig = {name: sig[name] for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{fn.__name__}: no cubin")
    return compiled


def step_kernel(p, s, *, do_update, emit_probe, k, g=None, damped=True,
                amsgrad=False, maximize=False, tensors_hyper=False, scaler=False):
    """Compile the multi-tensor pass for (param, grad, state) kinds and flags; returns
    (compiled, meta) with meta = the launch configuration the backend would use."""
    _triton()
    from ..triton_kernels import _tables, update
    g = p if g is None else g
    config = _tables.launch_config(k if emit_probe else 0)
    signature = dict(chunk_tensor="*i32", addresses="*i64", layout="*i64", stats="*fp32",
                     stats_stride="i32", eps="fp32", window="i32")
    constexprs = dict(P_KIND=p, G_KIND=g, S_KIND=s, DO_UPDATE=do_update, EMIT_PROBE=emit_probe,
                      DAMPED=damped, AMSGRAD=amsgrad, MAXIMIZE=maximize, K=k,
                      K_PAD=config.k_pad, BLOCK=config.block, ITERS=config.iters)
    for name in ("lr", "weight_decay", "beta1", "beta2"):
        if tensors_hyper:  # a float64 device scalar
            signature[name] = "*fp64"
            constexprs[name + "_lo"] = None
        else:  # a number as two fp32 halves
            signature[name] = signature[name + "_lo"] = "fp32"
    signature["damping"] = "*fp32" if tensors_hyper else "fp32"
    if emit_probe:
        signature["partials"] = "*fp32"
    else:
        constexprs["partials"] = None
    if scaler:
        signature.update(grad_scale="*fp32", found_inf="*fp32")
    else:
        constexprs.update(grad_scale=None, found_inf=None)
    return compile_kernel(update.multi_tensor_step_kernel, signature, constexprs,
                          config.num_warps), config


def _record(kernel, p, s, probes, lag, compiled, moved, read):
    """One report record from a compiled kernel: ``moved`` bytes per parameter in total,
    ``read`` of them loaded (elements per loop trip are derived from the loads)."""
    stats = analyze(compiled.asm["cubin"], compiled.metadata.name,
                    dynamic_shared_bytes=compiled.metadata.shared)
    loop = stats.loop
    return dict(backend=BACKEND, kernel=kernel, param_dtype=DTYPES.get(p), state_dtype=DTYPES.get(s),
                probes=probes, lag=lag, registers=stats.registers, spills=stats.spills,
                shared_bytes=stats.shared_bytes,
                barriers_in_loop=loop.barriers if loop else None,
                access_bits=loop.access_bits if loop else None,
                bytes_per_param=moved,
                sass_per_element=round(loop.per_element(read), 3) if loop and read else None)


def update_bytes(p, s, amsgrad=False):
    """(moved, read) bytes per parameter of the update: p, g, m, v (vmax) in; p, m, v (vmax) out."""
    states = 3 if amsgrad else 2
    read = SIZES[p] + SIZES[p] + states * SIZES[s]
    return read + SIZES[p] + states * SIZES[s], read


def update_record(p, s, k, lag):
    """lag 1: the update with the fused probe sums; lag 0: the update after the probe pass
    (damped, no sums); k = 0: probe="off" (undamped, no sums)."""
    compiled, _ = step_kernel(p, s, do_update=True, emit_probe=(k > 0 and lag == 1), k=k,
                              damped=k > 0)
    return _record("update", p, s, k, lag if k else None, compiled, *update_bytes(p, s))


def probe_record(p, k):
    """The lag-0 probe pass: reads g once, writes k partial sums per chunk."""
    compiled, _ = step_kernel(p, 0, do_update=False, emit_probe=True, k=k, damped=False)
    return _record("probe", p, None, k, 0, compiled, SIZES[p], SIZES[p])


def records(probe_counts=None) -> List[dict]:
    if probe_counts is None:
        probe_counts = (range(1, 33) if os.environ.get("SADAM_REPORT_ALL_K") == "1"
                        else PROBE_COUNTS)
    out = []
    for k in probe_counts:
        out.append(update_record(0, 0, k, 1))
    out.append(update_record(2, 0, 8, 1))
    out.append(update_record(2, 2, 8, 1))
    out.append(update_record(0, 0, 8, 0))
    out.append(update_record(0, 0, 0, None))
    for k in probe_counts:
        out.append(probe_record(0, k))
    out.append(probe_record(2, 8))
    return out
