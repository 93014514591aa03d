"""The native kernels as torch.library ops: schemas and fake (meta) kernels live here, the CPU and
CUDA kernels register themselves from ``sadam._C`` when it is loaded.

With the fake kernels ``torch.compile`` traces a step through these ops without running them. The
extension is loaded lazily by :func:`load`, so importing ``sadam`` never needs a compiled build.
"""
import importlib

import torch

NAMESPACE = "sadam"
BUILD_HINT = ("build it from source: `pip install --no-build-isolation -e .` in the sadam "
              "checkout (or `make build`) with a C++ compiler, plus nvcc for the CUDA kernels")

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define(
    "native_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor stats, "
    "Tensor hyper, Tensor? grad_scale, Tensor? found_inf, int[] scope_rows, int[] tensor_ids, "
    "int[] offsets, float eps, int probes, int window, int seed, bool amsgrad, bool maximize, "
    "bool damped, bool emit_probe) -> Tensor")
_lib.define(
    "native_directional(Tensor[] grads, Tensor stats, Tensor? grad_scale, int[] scope_rows, "
    "int[] tensor_ids, int[] offsets, int probes, int window, int seed, bool maximize) -> Tensor")
_lib.define(
    "native_finalize(Tensor(a!) stats, Tensor d, Tensor hyper, Tensor? found_inf, int[] rows, "
    "float probe_beta, int window, int lag) -> ()")


@torch.library.register_fake(f"{NAMESPACE}::native_update")
def _update_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, stats, hyper,
                 grad_scale, found_inf, scope_rows, tensor_ids, offsets, eps, probes, window,
                 seed, amsgrad, maximize, damped, emit_probe):
    return stats.new_empty((stats.shape[0] if emit_probe else 0, probes))


@torch.library.register_fake(f"{NAMESPACE}::native_directional")
def _directional_fake(grads, stats, grad_scale, scope_rows, tensor_ids, offsets, probes, window,
                      seed, maximize):
    return stats.new_empty((stats.shape[0], probes))


@torch.library.register_fake(f"{NAMESPACE}::native_finalize")
def _finalize_fake(stats, d, hyper, found_inf, rows, probe_beta, window, lag):
    return None


_extension = None
_load_error = None


def load():
    """The compiled module ``sadam._C`` (its kernels are registered once loaded), or None."""
    global _extension, _load_error
    if _extension is None and _load_error is None:
        try:
            _extension = importlib.import_module("sadam._C")
        except ImportError as exc:
            _load_error = f"sadam._C is not built ({exc}); {BUILD_HINT}"
    return _extension


def load_error() -> str:
    load()
    return _load_error or ""


def kernels():
    """Device types the built extension has kernels for (empty when it is not built)."""
    ext = load()
    return list(ext.kernels()) if ext is not None else []


update = torch.ops.sadam.native_update
directional = torch.ops.sadam.native_directional
finalize = torch.ops.sadam.native_finalize
