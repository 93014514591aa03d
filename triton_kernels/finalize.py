"""The probe statistics update (spec section 3), one program per scope row present in the step.

Same semantics as the reference finalize: a and b are kept in units of a per-row power-of-two
scale 2**E that follows the size of d (sadam/_layout.py), EMA of d and d**2 with bias correction,
rho as the mean normalized variance, a window reset that redraws the directions, rows with a
non-finite d keep their statistics, lag 1 records the rho/gamma the update just applied, and a set
``found_inf`` leaves every row untouched. The power-of-two arithmetic works on the fp32 bits, as
in the reference and the C++ kernels, so all of them choose the same E.
"""
import triton
import triton.language as tl

from ._convert import pow_f32, proceed, scalar_f32

SCALE_MIN: tl.constexpr = tl.constexpr(-200)  # lowest E (sadam.backends.reference.SCALE_MIN)
ABSENT: tl.constexpr = tl.constexpr(-(1 << 30))  # "no candidate" for the new E


@triton.jit
def _ilogb(x):
    """The exponent field minus 127 of fp32 x >= 0 (-127 for 0 and subnormals)."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _floor_half(n):
    return (n - (n & 1)) // 2


@triton.jit
def _pow2(n):
    """2**n exactly, for int32 n in [-126, 127]."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _times_pow2(x, n):
    """x * 2**n as two exact power-of-two factors (n clamped to [-252, 252])."""
    n = tl.minimum(tl.maximum(n, -252), 252)
    half = _floor_half(n)
    return x * _pow2(half) * _pow2(n - half)


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
    scale_old = tl.load(base + 2 * K + 5)
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

    # E': |d| / 2**E' < 2 and |a|, sqrt(b) rescaled below 2; E where d, a and b are all 0
    scale = scale_old.to(tl.int32)
    d_max = tl.max(tl.where(valid, tl.abs(dd), 0.0), axis=0)
    a_max = tl.max(tl.where(valid, tl.abs(a), 0.0), axis=0)
    b_max = tl.max(tl.where(valid, b, 0.0), axis=0)
    wanted = tl.where(d_max > 0, _ilogb(d_max), ABSENT)
    wanted = tl.maximum(wanted, tl.where(a_max > 0, scale + _ilogb(a_max), ABSENT))
    wanted = tl.maximum(wanted, tl.where(b_max > 0, scale + _floor_half(_ilogb(b_max)), ABSENT))
    rescaled = tl.where(wanted > ABSENT, tl.maximum(wanted, SCALE_MIN), scale)
    shift = scale - rescaled
    a = _times_pow2(a, shift)
    b = _times_pow2(b, 2 * shift)
    d_scaled = _times_pow2(dd, -rescaled)

    a = probe_beta * a + probe_beta_comp * d_scaled
    b = probe_beta * b + probe_beta_comp * d_scaled * d_scaled
    correction = 1.0 - pow_f32(probe_beta, count)
    mean = a / correction
    second = b / correction
    # a term with B_i = 0 counts 0
    ratio = tl.maximum(second - mean * mean, 0.0) / tl.where(second > 0, second, 1.0)
    estimate = tl.sum(tl.where(valid & (second > 0), ratio, 0.0), axis=0) / K
    rho = tl.where(count >= 2.0, estimate, rho_old)

    # a non-finite d (NaN/Inf gradient) must not poison the statistics of later steps
    bad = tl.sum(tl.where(valid & ~(tl.abs(dd) < float("inf")), 1, 0), axis=0)
    finite = bad == 0
    a = tl.where(finite, a, a_old)
    b = tl.where(finite, b, b_old)
    count = tl.where(finite, count, count_old)
    epoch = tl.where(finite, epoch, epoch_old)
    rho = tl.where(finite, rho, rho_old)
    scale_new = tl.where(finite, rescaled.to(tl.float32), scale_old)
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
    tl.store(base + 2 * K + 5, scale_new, mask=keep)
