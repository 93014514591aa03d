"""The probe statistics update (spec section 3), one program per scope row present in the step.

Same semantics as the reference finalize: EMA of d and d**2 with bias correction, rho as the mean
normalized variance, a window reset that redraws the directions, rows with a non-finite d keep
their statistics, lag 1 records the rho/gamma the update just applied, and a set ``found_inf``
leaves every row untouched.
"""
import triton
import triton.language as tl

from ._convert import pow_f32, proceed, scalar_f32


@triton.jit
def finalize_kernel(stats, stats_stride, d, rows, damping, found_inf, probe_beta, probe_beta_comp,
                    window,
                    LAG: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr):
    row = tl.load(rows + tl.program_id(0)).to(tl.int64)
    base = stats + row * stats_stride
    probe = tl.arange(0, K_PAD)
    valid = probe < K
    a_old = tl.load(base + probe, mask=valid, other=0.0)
    b_old = tl.load(base + K + probe, mask=valid, other=0.0)
    count_old = tl.load(base + 2 * K)
    epoch_old = tl.load(base + 2 * K + 1)
    rho_old = tl.load(base + 2 * K + 2)
    rho_applied = tl.load(base + 2 * K + 3)
    gamma_applied = tl.load(base + 2 * K + 4)
    dd = tl.load(d + row * K + probe, mask=valid, other=0.0)
    lam = scalar_f32(damping)

    if LAG == 1:  # the update that just ran applied the previous estimate
        rho_applied = rho_old
        gamma_applied = tl.exp(-lam * rho_old)

    reset = (window > 0) & (count_old >= window)
    a = tl.where(reset, 0.0, a_old)
    b = tl.where(reset, 0.0, b_old)
    count = tl.where(reset, 0.0, count_old) + 1.0
    epoch = epoch_old + tl.where(reset, 1.0, 0.0)
    a = probe_beta * a + probe_beta_comp * dd
    b = probe_beta * b + probe_beta_comp * dd * dd
    correction = 1.0 - pow_f32(probe_beta, count)
    mean = a / correction
    second = b / correction
    ratio = tl.maximum(second - mean * mean, 0.0) / tl.maximum(second, 1e-30)
    estimate = tl.sum(tl.where(valid, ratio, 0.0), axis=0) / K
    rho = tl.where(count >= 2.0, estimate, rho_old)

    # a non-finite d (NaN/Inf gradient) must not poison the statistics of later steps
    bad = tl.sum(tl.where(valid & ~(tl.abs(dd) < float("inf")), 1, 0), axis=0)
    finite = bad == 0
    a = tl.where(finite, a, a_old)
    b = tl.where(finite, b, b_old)
    count = tl.where(finite, count, count_old)
    epoch = tl.where(finite, epoch, epoch_old)
    rho = tl.where(finite, rho, rho_old)
    if LAG == 0:
        rho_applied = rho
        gamma_applied = tl.exp(-lam * rho)

    keep = proceed(found_inf)
    tl.store(base + probe, a, mask=valid & keep)
    tl.store(base + K + probe, b, mask=valid & keep)
    tl.store(base + 2 * K, count, mask=keep)
    tl.store(base + 2 * K + 1, epoch, mask=keep)
    tl.store(base + 2 * K + 2, rho, mask=keep)
    tl.store(base + 2 * K + 3, rho_applied, mask=keep)
    tl.store(base + 2 * K + 4, gamma_applied, mask=keep)
