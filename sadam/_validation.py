"""Hyperparameter checks: each failure is a ValueError that names the argument."""
import math
import numbers

import torch

from ._hash import MAX_PROBES
from .backends import BACKENDS

PROBE_MODES = ("gradient", "loss", "off")
SCOPES = ("group", "tensor")
ESTIMATORS = ("symmetric", "directions")
PROBE_RNG = (None, "replay", "fresh")
STATE_DTYPES = (torch.float32, torch.bfloat16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _value(name, x):
    """A float of a number or a one-element tensor, for range checks (construction time only)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(x.shape)}")
        if x.is_floating_point() is False and x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} as a Tensor must be real, got {x.dtype}")
        return float(x.detach().cpu())
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number or a one-element Tensor, got {x!r}")
    return float(x)


def _check(cond, name, msg, value):
    if not cond:
        raise ValueError(f"{name} {msg}, got {value!r}")


def _int(name, x, lo, hi=None):
    ok = isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= lo
    ok = ok and (hi is None or x <= hi)
    rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    _check(ok, name, f"must be an integer {rng}", x)


def _choice(name, x, choices):
    _check(x in choices, name, f"must be one of {choices}", x)


TENSOR_HYPERPARAMETERS = ("lr", "weight_decay", "damping", "probe_delta")


def _as_scalar(x):
    """A one-element tensor of any shape as a 0-d view (a scheduler's in-place fill of the
    original still reaches it); anything else unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.numel() == 1:
        return x.reshape(())
    return x


def normalize_group(g: dict) -> None:
    """Hyperparameters given as one-element tensors of shape (1,), (1, 1), ... become 0-d, so
    every backend sees the scalar it is written for (in place, before validation)."""
    for name in TENSOR_HYPERPARAMETERS:
        if name in g:
            g[name] = _as_scalar(g[name])
    betas = g.get("betas")
    if isinstance(betas, (tuple, list)) and any(isinstance(b, torch.Tensor) for b in betas):
        g["betas"] = tuple(_as_scalar(b) for b in betas)


def validate_group(g: dict) -> None:
    """Raise ValueError naming the first invalid hyperparameter of param group ``g``."""
    lr = _value("lr", g["lr"])
    _check(lr >= 0 and lr == lr, "lr", "must be >= 0", g["lr"])
    betas = g["betas"]
    _check(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "must be a pair", betas)
    for i, beta in enumerate(betas):
        b = _value(f"betas[{i}]", beta)
        _check(0.0 <= b < 1.0, f"betas[{i}]", "must be in [0, 1)", beta)
    eps = _value("eps", g["eps"])
    _check(eps >= 0, "eps", "must be >= 0", g["eps"])
    _check(not isinstance(g["eps"], torch.Tensor), "eps", "must be a float", g["eps"])
    wd = _value("weight_decay", g["weight_decay"])
    _check(wd >= 0, "weight_decay", "must be >= 0", g["weight_decay"])
    damping = _value("damping", g["damping"])
    _check(damping >= 0 and math.isfinite(damping), "damping", "must be a finite number >= 0",
           g["damping"])
    _int("probes", g["probes"], 1, MAX_PROBES)
    _choice("probe", g["probe"], PROBE_MODES)
    pb = _value("probe_beta", g["probe_beta"])
    _check(0.0 <= pb < 1.0 and not isinstance(g["probe_beta"], torch.Tensor), "probe_beta",
           "must be a float in [0, 1)", g["probe_beta"])
    _choice("scope", g["scope"], SCOPES)
    _int("probe_lag", g["probe_lag"], 0, 1)  # an int, as amsgrad must be a bool: no True, no 1.0
    if g["probe_window"] is not None:
        _int("probe_window", g["probe_window"], 2)
    delta = _value("probe_delta", g["probe_delta"])
    _check(delta > 0 and math.isfinite(delta), "probe_delta", "must be a finite number > 0",
           g["probe_delta"])
    _int("probe_every", g["probe_every"], 1)
    _choice("probe_estimator", g["probe_estimator"], ESTIMATORS)
    _choice("probe_rng", g["probe_rng"], PROBE_RNG)
    if g["probe"] == "loss":
        _check(g["scope"] == "group", "scope",
               "must be 'group' with probe='loss' (the loss probe measures one rho for the model)",
               g["scope"])
        if g["probe_estimator"] == "directions":
            _int("probes", g["probes"], 2, MAX_PROBES)  # an unbiased variance needs two values
    _choice("state_dtype", g["state_dtype"], STATE_DTYPES)
    _int("seed", g["seed"], 0, 2 ** 32 - 1)
    for flag in ("amsgrad", "maximize", "capturable"):
        _check(isinstance(g[flag], bool), flag, "must be a bool", g[flag])
    _choice("backend", g["backend"], BACKENDS)


LOSS_SHARED = ("probes", "probe_delta", "probe_every", "probe_estimator", "probe_beta", "seed",
               "probe_rng")


def validate_loss_groups(groups) -> None:
    """Groups with probe='loss' are probed together, so their probe settings must agree."""
    loss_groups = [g for g in groups if g["probe"] == "loss"]
    for g in loss_groups[1:]:
        for key in LOSS_SHARED:
            if g[key] != loss_groups[0][key]:
                raise ValueError(f"{key} must be the same in every param group with probe='loss' "
                                 f"(they are probed together), got {loss_groups[0][key]!r} and "
                                 f"{g[key]!r}")


def validate_param(p: torch.Tensor, where: str) -> None:
    if p.is_complex():
        raise ValueError(f"SAdam does not support complex parameters ({where}); optimize "
                         "torch.view_as_real(p) as a real parameter instead")
    if p.dtype not in PARAM_DTYPES:
        raise ValueError(f"SAdam supports parameters of dtype {PARAM_DTYPES} ({where} is {p.dtype})")


def validate_grad(p: torch.Tensor, where: str) -> None:
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"SAdam does not support sparse gradients ({where})")
    if g.shape != p.shape:
        raise RuntimeError(f"gradient of {where} has shape {tuple(g.shape)}, the parameter "
                           f"{tuple(p.shape)}")
    if g.device != p.device:
        raise RuntimeError(f"gradient of {where} is on {g.device}, the parameter on {p.device}")
    if g.is_complex() or not g.is_floating_point():
        raise RuntimeError(f"gradient of {where} must be real floating point, got {g.dtype}")
