"""Backend registry: which implementation runs a param group's step.

``backend="auto"`` picks the fastest one available for the parameters' device (CUDA: triton, then
the cuda extension, then torch; CPU: the cpu extension, then torch) and says what it picked once in
a debug log. A backend asked for by name that cannot run raises :class:`BackendUnavailable` with
the reason.
"""
import importlib
import logging
import os

import torch

logger = logging.getLogger("sadam")

# name -> (module, device type it is limited to or None)
_REGISTRY = {
    "torch": ("reference", None),
    "triton": ("triton", None),
    "cuda": ("native", "cuda"),
    "cpu": ("native", "cpu"),
}
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
BACKENDS = ("auto",) + tuple(_REGISTRY)
_announced = set()


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name and cannot run here; the message says why."""


def _why_unavailable(name: str, device: torch.device):
    """None if backend `name` can run on `device`, else the reason, plus the module."""
    module_name, device_type = _REGISTRY[name]
    if device_type is not None and device.type != device_type:
        return f"it runs on {device_type} parameters and these are on {device}", None
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        return f"its module could not be imported ({exc})", None
    ok, why = module.available(device)
    return (None, module) if ok else (why, None)


def resolve(name: str, device: torch.device):
    """The backend module that runs parameters on `device` for the requested `name`."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        why, module = _why_unavailable(name, device)
        if why is not None:
            raise BackendUnavailable(f"backend={name!r} is not available: {why}")
        return module
    reasons = []
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        why, module = _why_unavailable(candidate, device)
        if why is None:
            key = (device.type, candidate, os.environ.get("TRITON_INTERPRET"))
            if key not in _announced:
                _announced.add(key)
                logger.debug("sadam: backend='auto' uses %r on %s (%s)", candidate, device.type,
                             "; ".join(reasons) or "first choice")
            return module
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailable("no backend can run: " + "; ".join(reasons))


def available_backends(device="cpu"):
    """Names of the backends that can run parameters on `device`."""
    device = torch.device(device)
    return [name for name in _REGISTRY if _why_unavailable(name, device)[0] is None]
