"""The fused Triton backend: a constant number of launches per param group and step.

``update`` is one multi-tensor launch per (param, grad, state) dtype bucket (plus one foreach add
for the step counts); with ``emit_probe`` that same pass writes per-chunk probe partials, which one
small kernel reduces into ``d`` in a fixed order. ``directional_derivatives`` is the same launch
with the update switched off, ``finalize`` one program per scope row. Nothing reads a device value
back to the host; hyperparameters are runtime arguments (numbers or device scalars), so changing
lr never recompiles.
"""
import contextlib
import dataclasses
import math
import os
import struct

import torch

from .step import GroupStep

name = "triton"


def available(device: torch.device):
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on"):
            return True, ""
        return False, ("Triton kernels need CUDA tensors (TRITON_INTERPRET=1 runs them in "
                       "Triton's interpreter on CPU tensors, slowly)")
    return False, f"Triton kernels do not run on {device.type} tensors"


def _kernels():
    """Imported on first use: the kernels are decorated in the mode (GPU or interpreter) of then."""
    from ..triton_kernels import _tables, finalize, probe, update
    return _tables, update, probe, finalize


def _device(step: GroupStep) -> torch.device:
    device = step.stats.device
    for name_, tensors in (("params", step.params), ("grads", step.grads),
                           ("exp_avgs", step.exp_avgs), ("exp_avg_sqs", step.exp_avg_sqs),
                           ("max_exp_avg_sqs", step.max_exp_avg_sqs), ("state_steps", step.steps)):
        for i, x in enumerate(tensors):
            if x.device != device:
                raise ValueError(f"the triton backend needs every tensor of a param group on one "
                                 f"device: {name_}[{i}] is on {x.device}, the probe statistics "
                                 f"on {device}")
    return device


def _on_host(x, device) -> bool:
    """A CPU tensor hyperparameter for device parameters: read it here (no device sync)."""
    return isinstance(x, torch.Tensor) and x.device.type == "cpu" and device.type != "cpu"


def _scalar(x, device):
    """A hyperparameter as a kernel argument: a float, or an fp32 device scalar (no host read)."""
    if isinstance(x, torch.Tensor) and not _on_host(x, device):
        return x.to(device=device, dtype=torch.float32)
    return float(x)


def _halves(x: float):
    """(hi, lo): a float64 number as two fp32 kernel arguments whose sum is its value to 48 bits,
    so the kernel's float64 coefficients start from the user's double, not its fp32 rounding."""
    x = float(x)
    if not math.isfinite(x) or abs(x) > 3e38:
        return x, 0.0
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _scalar64(name, x, device) -> dict:
    """Kernel arguments ``name`` and ``name_lo`` of a float64 hyperparameter: a float64 device
    scalar (no host read) or a number's two fp32 halves."""
    if isinstance(x, torch.Tensor) and not _on_host(x, device):
        return {name: x.to(device=device, dtype=torch.float64), name + "_lo": None}
    hi, lo = _halves(x)
    return {name: hi, name + "_lo": lo}


def _dense(step: GroupStep):
    """The step over contiguous tensors: the kernels address elements in row-major order.

    Non-contiguous tensors (rare: channels_last or sliced parameters) run on contiguous copies
    that are written back after the update; returns the step and the (original, copy) pairs.
    """
    copies = []

    def dense(tensors, write_back):
        out = []
        for x in tensors:
            if x.is_contiguous():
                out.append(x)
            else:
                c = x.contiguous()
                if write_back:
                    copies.append((x, c))
                out.append(c)
        return out

    if all(x.is_contiguous() for x in step.params + step.grads + step.exp_avgs
           + step.exp_avg_sqs + step.max_exp_avg_sqs):
        return step, copies
    dense_step = dataclasses.replace(
        step, params=dense(step.params, True), grads=dense(step.grads, False),
        exp_avgs=dense(step.exp_avgs, True), exp_avg_sqs=dense(step.exp_avg_sqs, True),
        max_exp_avg_sqs=dense(step.max_exp_avg_sqs, True))
    return dense_step, copies


def _flag(x, device):
    return None if x is None else x.to(device)


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU, whatever the current device is."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _pass(step: GroupStep, *, do_update: bool, damped: bool, emit_probe: bool):
    """One multi-tensor launch per dtype bucket; returns d when ``emit_probe``."""
    tables, update_mod, probe_mod, _ = _kernels()
    device = _device(step)
    layout = tables.layout_of(step, device)
    addresses = tables.addresses_of(step, device)
    config = tables.launch_config(step.probes if emit_probe else 0)
    partials = None
    if emit_probe:
        partials = torch.empty(max(layout.num_chunks, 1), config.k_pad, dtype=torch.float32,
                               device=device)
    args = dict(
        **_scalar64("lr", step.lr, device), **_scalar64("weight_decay", step.weight_decay, device),
        **_scalar64("beta1", step.beta1, device), **_scalar64("beta2", step.beta2, device),
        eps=float(step.eps), damping=_scalar(step.damping, device),
        grad_scale=_flag(step.grad_scale, device), found_inf=_flag(step.found_inf, device),
        window=int(step.window))
    # the statistics columns are only read when probing or damping: otherwise k does not matter
    k = step.probes if (emit_probe or damped) else 0
    for bucket in layout.buckets:
        p_kind, g_kind, s_kind = bucket.kinds
        chunks = slice(bucket.start, bucket.start + bucket.num_chunks)
        update_mod.multi_tensor_step_kernel[(bucket.num_chunks,)](
            layout.chunk_tensor[chunks], addresses, layout.layout, step.stats,
            step.stats.stride(0), partials[chunks] if emit_probe else None, **args,
            P_KIND=p_kind, G_KIND=g_kind, S_KIND=s_kind, DO_UPDATE=do_update,
            EMIT_PROBE=emit_probe, DAMPED=damped, AMSGRAD=step.amsgrad, MAXIMIZE=step.maximize,
            K=k, K_PAD=config.k_pad, BLOCK=config.block, ITERS=config.iters,
            num_warps=config.num_warps)
    if not emit_probe:
        return None
    d = torch.empty(step.stats.shape[0], step.probes, dtype=torch.float32, device=device)
    probe_mod.reduce_partials_kernel[(d.shape[0],)](
        partials, layout.row_start, layout.row_chunks, d, K=step.probes, K_PAD=config.k_pad,
        RBLOCK=tables.reduce_block(config.k_pad), num_warps=8)
    return d


def _count_steps(step: GroupStep) -> None:
    """step += 1 for every tensor before the pass reads it, unless found_inf is set.

    Done as one foreach op so no two programs of the pass race on a step count.
    """
    if step.found_inf is None:
        torch._foreach_add_(step.steps, 1.0)
    else:
        go = torch.logical_not(step.found_inf.reshape(()) > 0).to(torch.float32)
        torch._foreach_add_(step.steps, go.to(step.steps[0].device))


def update(step: GroupStep, *, damped: bool, emit_probe: bool):
    with _device_guard(_device(step)):
        dense_step, copies = _dense(step)
        _count_steps(step)
        d = _pass(dense_step, do_update=True, damped=damped, emit_probe=emit_probe)
        for original, copy in copies:
            original.copy_(copy)
    return d


def directional_derivatives(step: GroupStep) -> torch.Tensor:
    with _device_guard(_device(step)):
        dense_step, _ = _dense(step)
        return _pass(dense_step, do_update=False, damped=False, emit_probe=True)


def finalize(step: GroupStep, d: torch.Tensor, *, lag: int) -> None:
    tables, _, _, finalize_mod = _kernels()
    device = _device(step)
    with _device_guard(device):
        layout = tables.layout_of(step, device)
        d = d.to(device=device, dtype=torch.float32).contiguous()
        finalize_mod.finalize_kernel[(len(step.rows_present),)](
            step.stats, step.stats.stride(0), d, layout.rows, _scalar(step.damping, device),
            _flag(step.found_inf, device), float(step.probe_beta), 1.0 - float(step.probe_beta),
            int(step.window), LAG=int(lag),
            K=step.probes, K_PAD=tables.probe_width(step.probes), num_warps=1)
