"""The native backend: the C++ (CPU, at::vec) and CUDA (multi-tensor) kernels of ``sadam._C``.

Each stage is one torch.library op over the whole param group (see ``sadam/_ops.py``), so one
call covers every tensor and ``torch.compile`` can trace it. Serves ``backend="cpu"`` and
``backend="cuda"``; the extension is built from source by ``setup.py``.
"""
import torch

from .. import _ops
from .step import GroupStep

name = "native"


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


def _hyper(step: GroupStep, device) -> torch.Tensor:
    """[lr, beta1, beta2, weight_decay, damping] as one float64 device tensor (no host reads):
    the kernels derive their scalar coefficients in float64 like torch's AdamW."""
    values = (step.lr, step.beta1, step.beta2, step.weight_decay, step.damping)
    if not any(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor(values, dtype=torch.float64, device=device)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                        for v in values])


def _on(t, device):
    return None if t is None else t.to(device)


def update(step: GroupStep, *, damped: bool, emit_probe: bool):
    device = step.stats.device
    d = _ops.update(step.params, step.grads, step.exp_avgs, step.exp_avg_sqs,
                    step.max_exp_avg_sqs, step.steps, step.stats, _hyper(step, device),
                    _on(step.grad_scale, device), _on(step.found_inf, device), step.scope_rows,
                    step.tensor_ids, step.offsets, step.eps, step.probes, step.window, step.seed,
                    step.amsgrad, step.maximize, damped, emit_probe)
    return d if emit_probe else None


def directional_derivatives(step: GroupStep) -> torch.Tensor:
    device = step.stats.device
    return _ops.directional(step.grads, step.stats, _on(step.grad_scale, device),
                            step.scope_rows, step.tensor_ids, step.offsets, step.probes,
                            step.window, step.seed, step.maximize)


def finalize(step: GroupStep, d: torch.Tensor, *, lag: int) -> None:
    device = step.stats.device
    _ops.finalize(step.stats, d, _hyper(step, device), _on(step.found_inf, device),
                  step.rows_present, step.probe_beta, step.window, lag)
