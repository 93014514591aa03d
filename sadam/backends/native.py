"""The native backend: the C++ (CPU, at::vec) and CUDA (multi-tensor) kernels of ``sadam._C``.

Each stage is one torch.library op over the whole param group (see ``sadam/_ops.py``), so one
call covers every tensor and ``torch.compile`` can trace it. Serves ``backend="cpu"`` and
``backend="cuda"``; the extension is built from source by ``setup.py``.
"""
import dataclasses

import torch

from .. import _ops
from . import reference
from .step import GroupStep

name = "native"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # params; moments fp32 or bf16


def available(device: torch.device):
    device = torch.device(device)
    if _ops.load() is None:
        return False, _ops.load_error()
    if device.type not in _ops.kernels():
        needs = " with nvcc and a CUDA build of torch" if device.type == "cuda" else ""
        return False, (f"sadam._C was built without {device.type} kernels; rebuild it{needs}: "
                       f"{_ops.BUILD_HINT}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device is available"
    return True, ""


def _is_device_value(v) -> bool:
    return isinstance(v, torch.Tensor) and v.device.type != "cpu"


def _hyper(step: GroupStep, device) -> torch.Tensor:
    """[lr, beta1, beta2, weight_decay, damping] as one float64 tensor, built without a host
    sync: the kernels derive their scalar coefficients from it in float64 like torch's AdamW.

    Numbers (floats, CPU tensors) stay on the CPU: the CUDA kernels take them as launch
    arguments, so no host-to-device copy runs (a copy from pageable memory would wait for the
    device, and could not be captured in a CUDA graph). When any value lives on a device, all
    five are gathered there with device ops only (a fill per number, a cast per tensor).
    """
    values = (step.lr, step.beta1, step.beta2, step.weight_decay, step.damping)
    device = torch.device(device)
    if device.type == "cpu" or not any(_is_device_value(v) for v in values):
        # on the CPU whatever torch.set_default_device says: the kernels read it on the host
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device="cpu")
    return torch.stack([
        v.to(device=device, dtype=torch.float64).reshape(()) if _is_device_value(v)
        else torch.full((), float(v), dtype=torch.float64, device=device)
        for v in values])


def _on(t, device):
    return None if t is None else t.to(device)


def _kernel_supports(step: GroupStep) -> bool:
    """The kernels take fp32/bf16/fp16 params with fp32/bf16 moments; anything else (float64)
    runs the reference math instead."""
    return (all(p.dtype in KERNEL_DTYPES and g.dtype == p.dtype
                for p, g in zip(step.params, step.grads)) and
            all(m.dtype in (torch.float32, torch.bfloat16) for m in step.exp_avgs))


_WRITTEN = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _contiguous(step: GroupStep) -> GroupStep:
    """The step with contiguous copies of non-contiguous tensors (the kernels index flat memory);
    :func:`_write_back` copies the results into the originals."""
    if all(t.is_contiguous() for f in _WRITTEN + ("grads",) for t in getattr(step, f)):
        return step
    copies = {f: [t.contiguous() for t in getattr(step, f)] for f in _WRITTEN + ("grads",)}
    return dataclasses.replace(step, **copies)


def _write_back(step: GroupStep, done: GroupStep) -> None:
    if done is step:
        return
    for f in _WRITTEN:
        for original, result in zip(getattr(step, f), getattr(done, f)):
            if result is not original:
                original.copy_(result)


_PER_TENSOR = ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "scope_rows", "tensor_ids",
               "offsets")


def _dtype_buckets(step: GroupStep):
    """Sub-steps whose tensors share (param, grad, moment) dtypes: each kernel call takes one
    dtype combination, and a group may mix them (spec section 7: one call per bucket)."""
    keys = [(p.dtype, g.dtype, m.dtype) for p, g, m in zip(step.params, step.grads, step.exp_avgs)]
    order = list(dict.fromkeys(keys))
    if len(order) == 1:
        return [step]
    buckets = []
    for key in order:
        index = [i for i, k in enumerate(keys) if k == key]
        fields = {f: [getattr(step, f)[i] for i in index] for f in _PER_TENSOR}
        if step.amsgrad:
            fields["max_exp_avg_sqs"] = [step.max_exp_avg_sqs[i] for i in index]
        buckets.append(dataclasses.replace(step, **fields))
    return buckets


def _sum_in_order(parts):
    """Directional derivatives of the buckets added in a fixed order (deterministic)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def update(step: GroupStep, *, damped: bool, emit_probe: bool):
    buckets = _dtype_buckets(step)
    if len(buckets) > 1:
        parts = [_update_bucket(b, damped=damped, emit_probe=emit_probe) for b in buckets]
        return _sum_in_order(parts) if emit_probe else None
    return _update_bucket(step, damped=damped, emit_probe=emit_probe)


def _update_bucket(step: GroupStep, *, damped: bool, emit_probe: bool):
    if not _kernel_supports(step):
        return reference.update(step, damped=damped, emit_probe=emit_probe)
    device = step.stats.device
    flat = _contiguous(step)
    d = _ops.update(flat.params, flat.grads, flat.exp_avgs, flat.exp_avg_sqs,
                    flat.max_exp_avg_sqs, flat.steps, flat.stats, _hyper(flat, device),
                    _on(flat.grad_scale, device), _on(flat.found_inf, device), flat.scope_rows,
                    flat.tensor_ids, flat.offsets, flat.eps, flat.probes, flat.window, flat.seed,
                    flat.amsgrad, flat.maximize, damped, emit_probe)
    _write_back(step, flat)
    return d if emit_probe else None


def directional_derivatives(step: GroupStep) -> torch.Tensor:
    buckets = _dtype_buckets(step)
    if len(buckets) > 1:
        return _sum_in_order([_directional_bucket(b) for b in buckets])
    return _directional_bucket(step)


def _directional_bucket(step: GroupStep) -> torch.Tensor:
    if not _kernel_supports(step):
        return reference.directional_derivatives(step)
    device = step.stats.device
    return _ops.directional([g.contiguous() for g in step.grads], step.stats,
                            _on(step.grad_scale, device), step.scope_rows, step.tensor_ids,
                            step.offsets, step.probes, step.window, step.seed, step.maximize)


def finalize(step: GroupStep, d: torch.Tensor, *, lag: int) -> None:
    device = step.stats.device
    _ops.finalize(step.stats, d, _hyper(step, device), _on(step.found_inf, device),
                  step.rows_present, step.probe_beta, step.window, lag)
