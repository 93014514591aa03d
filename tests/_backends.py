"""Which backends a shared test body runs on, and on which device.

Every backend is listed in every parametrisation; one that cannot run here is a recorded skip that
says why, never a silent drop. Triton on CPU runs only under its interpreter, which has to be
switched on before triton is first imported: ``test_triton_interpreter.py`` runs the shared
bodies again in a subprocess that sets it. Each backend's tensors live on the device it runs on
(the cuda backend on CUDA tensors, triton on CUDA where there is a GPU).
"""
import os

import pytest
import torch

from sadam.backends import _why_unavailable

ALL = ("torch", "cpu", "triton", "cuda")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def device_of(backend: str) -> torch.device:
    """The device whose tensors ``backend`` steps in these tests."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def why_skipped(backend: str):
    """None when ``backend`` runs here on :func:`device_of` tensors, else the reason."""
    device = device_of(backend)
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"backend {backend!r} needs a CUDA device (none here)"
    if backend == "triton" and device.type == "cpu" and not INTERPRETED:
        return ("triton on CPU runs under TRITON_INTERPRET=1 in the subprocess of "
                "tests/test_triton_interpreter.py")
    why = _why_unavailable(backend, device)[0]
    return None if why is None else f"backend {backend!r} is not available on {device}: {why}"


def params(names=ALL):
    """``pytest.param`` per backend, a skip with its reason where it cannot run."""
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(
        why_skipped(name) is not None, reason=why_skipped(name) or "")) for name in names]


def kernel_params():
    return params(tuple(name for name in ALL if name != "torch"))
