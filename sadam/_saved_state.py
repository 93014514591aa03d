"""A loaded state_dict's per-parameter state, checked and converted before the optimizer takes it.

Every tensor is checked for dtype, shape and range, and converted to what a step expects: the
step count to a 0-d fp32 tensor (a Python number or an integer tensor from an older checkpoint is
accepted, as torch's AdamW accepts it), the moments to the group's ``state_dtype``, the probe
statistics to fp32; all on the parameter's device. Anything that cannot be converted is a
ValueError naming the parameter and the key. Nothing here touches the optimizer.
"""
import copy
import math
import numbers

import torch

from . import _layout as L

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
REQUIRED = ("step", "exp_avg", "exp_avg_sq")  # a parameter's state has all or none
_NONNEGATIVE_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
RHO_MAX_DIRECTIONS = 10.0  # the "directions" loss-probe estimator clips rho to [0, 10]


def _is_real_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()  # False for complex, integer and bool tensors


def _has_values(t: torch.Tensor, p, what: str) -> bool:
    """False for a meta tensor, which has a shape and a dtype but no values to check: onto a
    meta parameter it loads unchecked, as into torch's AdamW; a parameter with values cannot
    take it."""
    if t.device.type != "meta":
        return True
    if p.device.type != "meta":
        raise ValueError(f"{what} is a meta tensor, which holds no values for a parameter on "
                         f"{p.device}")
    return False


def _convert_step(value, p, where):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"state 'step' of {where} must be a number or a one-element real "
                             f"tensor, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if not _has_values(value, p, f"state 'step' of {where}"):
            return value.detach().to(device=p.device, dtype=torch.float32).reshape(())
        number = float(value.detach().cpu())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"state 'step' of {where} must be a number or a one-element tensor, "
                         f"got {value!r}")
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"state 'step' of {where} must be finite and >= 0, got {number}")
    return torch.tensor(number, dtype=torch.float32, device=p.device)


def _convert_moment(name, value, p, state_dtype, where):
    if not isinstance(value, torch.Tensor) or not _is_real_float(value):
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"state {name!r} of {where} must be a floating-point tensor, got {kind}")
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"state {name!r} of {where} has shape {tuple(value.shape)}, the "
                         f"parameter {tuple(p.shape)}")
    has_values = _has_values(value, p, f"state {name!r} of {where}")
    if has_values and name in _NONNEGATIVE_MOMENTS and bool((value < 0).any()):
        raise ValueError(f"state {name!r} of {where} holds negative values (a second moment "
                         "is >= 0)")
    return value.detach().to(device=p.device, dtype=state_dtype, copy=True)


def _convert_stats(value, p, group, where, scopes):
    if not isinstance(value, torch.Tensor) or not _is_real_float(value):
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"probe_stats of {where} must be a floating-point tensor, got {kind}")
    value = L.upgrade_stats(value, group["probes"])  # older 2k + 5 layout: E = 0 appended
    expected = (scopes, L.row_width(group["probes"]))
    if tuple(value.shape) != expected:
        raise ValueError(f"probe_stats of {where} has shape {tuple(value.shape)}, expected "
                         f"{expected} for scope={group['scope']!r}, probes={group['probes']}")
    stats = value.detach().to(torch.float32)  # checked where it is: p may be a meta tensor
    if _has_values(stats, p, f"probe_stats of {where}"):
        _check_stats_values(stats, group, where)
    return stats.to(device=p.device, copy=True)


def _check_stats_values(stats, group, where):
    if not bool(torch.isfinite(stats).all()):
        raise ValueError(f"probe_stats of {where} holds non-finite values (in fp32)")
    k = group["probes"]
    directions = group["probe"] == "loss" and group["probe_estimator"] == "directions"
    rho_max = RHO_MAX_DIRECTIONS if directions else 1.0
    ranges = {"count": (L.count_col(k), 0.0, math.inf),
              "epoch": (L.epoch_col(k), 0.0, math.inf),
              "rho": (L.rho_col(k), 0.0, rho_max),
              "applied rho": (L.rho_applied_col(k), 0.0, rho_max),
              "applied gamma": (L.gamma_applied_col(k), 0.0, 1.0)}
    for column, (index, lo, hi) in ranges.items():
        values = stats[:, index]
        if bool(((values < lo) | (values > hi)).any()):
            raise ValueError(f"probe_stats of {where}: the {column} column must lie in "
                             f"[{lo}, {hi}], got {values.tolist()}")


def convert_param_state(p, values: dict, group: dict, where: str, scopes: int) -> dict:
    """The state of parameter ``p`` (of param group ``group``, whose statistics have ``scopes``
    rows) from a saved ``values`` dict, every tensor checked and converted; raises ValueError
    naming ``where`` and the key."""
    present = [name for name in REQUIRED if name in values]
    if present and len(present) != len(REQUIRED):
        missing = sorted(set(REQUIRED) - set(present))
        raise ValueError(f"state of {where} has {present} but lacks {missing}")
    out = {}
    for name, value in values.items():
        if name == "step":
            out[name] = _convert_step(value, p, where)
        elif name in MOMENTS:
            out[name] = _convert_moment(name, value, p, group["state_dtype"], where)
        elif name == "probe_stats":
            out[name] = _convert_stats(value, p, group, where, scopes)
        elif isinstance(value, torch.Tensor):
            out[name] = value.detach().to(p.device, copy=True)
        else:
            out[name] = copy.deepcopy(value)
    return out
