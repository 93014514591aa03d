"""The reference backend: the S-Adam contract written literally in plain torch ops.

It is the ground truth every kernel is tested against, so it favours clarity over speed: one
parameter at a time, fp32 math, sign vectors materialized per tensor. It runs on any device and
never reads a device value back to the host.
"""
import torch

from .. import _layout as L
from .._hash import probe_bits, signs_from_bits
from .step import GroupStep

name = "torch"


def available(device: torch.device):
    return True, ""


def _scalar(x, device):
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def _scalar64(x, device):
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _effective_epoch(step: GroupStep, row: int) -> torch.Tensor:
    """Epoch of this step's directions: a full window redraws them before the step's sample."""
    k = step.probes
    epoch = step.stats[row, L.epoch_col(k)]
    if step.window > 0:
        epoch = epoch + (step.stats[row, L.count_col(k)] >= step.window).float()
    return epoch.to(torch.int64)


def _gradient(step: GroupStep, i: int) -> torch.Tensor:
    g = step.grads[i].float()
    if step.maximize:
        g = -g
    if step.grad_scale is not None:
        g = g / step.grad_scale.to(g.device)
    return g


def _skip(step: GroupStep, device):
    """A 0-d bool that is True when GradScaler found an inf (the step must change nothing)."""
    if step.found_inf is None:
        return None
    return step.found_inf.to(device) > 0


def _keep_if(skip, old, new):
    return new if skip is None else torch.where(skip, old, new)


def _directional(step: GroupStep, i: int, g: torch.Tensor) -> torch.Tensor:
    """d_i contributions of tensor i: (probes,) fp32, the signs dotted with the gradient."""
    row = step.scope_rows[i]
    bits = probe_bits(g.numel(), tensor_id=step.tensor_ids[i], seed=step.seed,
                      epoch=_effective_epoch(step, row).to(g.device), offset=step.offsets[i],
                      device=g.device)
    signs = signs_from_bits(bits, step.probes)
    return (signs * g.reshape(1, -1)).sum(dim=1)


def directional_derivatives(step: GroupStep) -> torch.Tensor:
    d = torch.zeros(step.stats.shape[0], step.probes, dtype=torch.float32, device=step.stats.device)
    for i in range(len(step.params)):
        d[step.scope_rows[i]] += _directional(step, i, _gradient(step, i)).to(d.device)
    return d


def update(step: GroupStep, *, damped: bool, emit_probe: bool):
    d = None
    if emit_probe:
        d = torch.zeros(step.stats.shape[0], step.probes, dtype=torch.float32,
                        device=step.stats.device)
    k = step.probes
    for i, p in enumerate(step.params):
        dev = p.device
        skip = _skip(step, dev)
        g = _gradient(step, i)
        if emit_probe:
            d[step.scope_rows[i]] += _directional(step, i, g).to(d.device)

        # Scalar coefficients in float64, as torch's AdamW computes them, so that e.g. 1 - beta2
        # is not the fp32 rounding of beta2 subtracted from 1 (a 5e-5 relative error).
        lr, wd = _scalar64(step.lr, dev), _scalar64(step.weight_decay, dev)
        b1, b2 = _scalar64(step.beta1, dev), _scalar64(step.beta2, dev)
        t = step.steps[i] + 1
        m = b1.float() * step.exp_avgs[i].float() + (1 - b1).float() * g
        v = b2.float() * step.exp_avg_sqs[i].float() + (1 - b2).float() * g * g
        v_used = v
        if step.amsgrad:
            v_used = torch.maximum(step.max_exp_avg_sqs[i].float(), v)
        gamma = torch.ones((), dtype=torch.float64, device=dev)
        if damped:
            rho = step.stats[step.scope_rows[i], L.rho_col(k)].to(dev, torch.float64)
            gamma = torch.exp(-_scalar64(step.damping, dev) * rho)
        bias1 = 1 - b1 ** t.double()
        bias2_sqrt = torch.sqrt(1 - b2 ** t.double()).float()
        step_size = (lr * gamma / bias1).float()
        p32 = p.float() * (1 - lr * wd).float()
        p32 = p32 - step_size * m / (torch.sqrt(v_used) / bias2_sqrt + step.eps)

        p.copy_(_keep_if(skip, p, p32.to(p.dtype)))
        step.exp_avgs[i].copy_(_keep_if(skip, step.exp_avgs[i], m.to(step.exp_avgs[i].dtype)))
        step.exp_avg_sqs[i].copy_(_keep_if(skip, step.exp_avg_sqs[i],
                                           v.to(step.exp_avg_sqs[i].dtype)))
        if step.amsgrad:
            vmax = step.max_exp_avg_sqs[i]
            vmax.copy_(_keep_if(skip, vmax, v_used.to(vmax.dtype)))
        step.steps[i].copy_(_keep_if(skip, step.steps[i], t))
    return d


# Exact power-of-two arithmetic of the statistics' scale (spec section 3, sadam/_layout.py),
# written with integer bit operations so that every backend computes the same bits.
SCALE_MIN = -200  # lowest scale exponent: below it a and b may underflow (they are 0 by then)


def ilogb(x: torch.Tensor) -> torch.Tensor:
    """The fp32 exponent field minus 127 of x >= 0, as int32 (-127 for 0 and subnormals)."""
    return ((x.contiguous().view(torch.int32) >> 23) & 0xFF) - 127


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """2.0**n in fp32, exactly, for int32 n in [-126, 127]."""
    return ((n + 127) << 23).view(torch.float32)


def times_pow2(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """x * 2**n as two exact power-of-two factors (n clamped to [-252, 252]: no factor
    overflows; results below the fp32 range underflow towards 0)."""
    n = n.clamp(-252, 252)
    half = torch.div(n, 2, rounding_mode="floor")
    return x * _pow2(half) * _pow2(n - half)


def new_scale(scale: torch.Tensor, d: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor) -> torch.Tensor:
    """The scale exponent E' of each row for this step: the smallest with |d| / 2**E' < 2 and
    |a|, sqrt(b) rescaled below 2 (the a term only matters once b has underflowed), at least
    SCALE_MIN; E where d, a and b are all 0."""
    absent = torch.full_like(scale, -(2 ** 30))
    d_max, a_max, b_max = d.abs().amax(1), a.abs().amax(1), b.amax(1)
    from_d = torch.where(d_max > 0, ilogb(d_max), absent)
    from_a = torch.where(a_max > 0, scale + ilogb(a_max), absent)
    from_b = torch.where(b_max > 0, scale + torch.div(ilogb(b_max), 2, rounding_mode="floor"),
                         absent)
    wanted = torch.maximum(torch.maximum(from_d, from_a), from_b)
    return torch.where(wanted > absent, wanted.clamp_min(SCALE_MIN), scale)


def finalize(step: GroupStep, d: torch.Tensor, *, lag: int) -> None:
    """EMA statistics of d, rho and the applied gamma for the rows this step touched."""
    k = step.probes
    stats = step.stats
    dev = stats.device
    rows = torch.tensor(step.rows_present, dtype=torch.long, device=dev)
    old = stats[rows]
    new = old.clone()
    d = d[rows].to(dev)
    beta = step.probe_beta
    damping = _scalar(step.damping, dev)

    a, b = old[:, :k], old[:, k:2 * k]
    count = old[:, L.count_col(k)]
    epoch = old[:, L.epoch_col(k)]
    rho_old = old[:, L.rho_col(k)]
    scale = old[:, L.scale_col(k)].to(torch.int32)

    if lag == 1:  # the update that just ran applied the previous estimate
        new[:, L.rho_applied_col(k)] = rho_old
        new[:, L.gamma_applied_col(k)] = torch.exp(-damping * rho_old)

    reset = (count >= step.window) if step.window > 0 else torch.zeros_like(count, dtype=torch.bool)
    a = torch.where(reset.unsqueeze(1), 0.0, a)
    b = torch.where(reset.unsqueeze(1), 0.0, b)
    count = torch.where(reset, 0.0, count) + 1
    epoch = epoch + reset.float()
    # rescale to this step's exponent, then the EMA in units of 2**E' (no fp32 over/underflow)
    rescaled = new_scale(scale, d, a, b)
    shift = (scale - rescaled).unsqueeze(1)
    a = times_pow2(a, shift)
    b = times_pow2(b, 2 * shift)
    d_scaled = times_pow2(d, -rescaled.unsqueeze(1))
    a = beta * a + (1 - beta) * d_scaled
    b = beta * b + (1 - beta) * d_scaled * d_scaled
    correction = 1 - torch.pow(torch.tensor(beta, device=dev), count)
    mean = a / correction.unsqueeze(1)
    second = b / correction.unsqueeze(1)
    ratio = torch.clamp(second - mean * mean, min=0.0) / second
    estimate = torch.where(second > 0, ratio, 0.0).mean(1)  # a term with B_i = 0 counts 0
    rho = torch.where(count >= 2, estimate, rho_old)

    # A row whose d is not finite (a NaN/Inf gradient) keeps its statistics: one bad step must
    # not poison the damping of every later step.
    finite = torch.isfinite(d).all(dim=1, keepdim=True)
    new[:, :k] = torch.where(finite, a, old[:, :k])
    new[:, k:2 * k] = torch.where(finite, b, old[:, k:2 * k])
    finite = finite.squeeze(1)
    new[:, L.count_col(k)] = torch.where(finite, count, old[:, L.count_col(k)])
    new[:, L.epoch_col(k)] = torch.where(finite, epoch, old[:, L.epoch_col(k)])
    new[:, L.rho_col(k)] = torch.where(finite, rho, rho_old)
    new[:, L.scale_col(k)] = torch.where(finite, rescaled.float(), old[:, L.scale_col(k)])
    if lag == 0:
        new[:, L.rho_applied_col(k)] = new[:, L.rho_col(k)]
        new[:, L.gamma_applied_col(k)] = torch.exp(-damping * new[:, L.rho_col(k)])

    skip = _skip(step, dev)
    stats[rows] = _keep_if(skip, old, new)
