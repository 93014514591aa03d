"""The range of the probe statistics (spec section 3, "Range"): for any finite gradients the
statistics stay finite and rho in [0, 1], and rho does not depend on the gradients' scale.

Run through the public API on every backend this machine has (``torch`` and the native ``cpu``
kernel; the Triton kernel has the same checks in test_triton_backend.py), both lags, both scopes.
The oracles: torch's AdamW (what it survives, SAdam survives) and the EMA statistics computed by
hand in float64 from the spec's probe signs.
"""
import copy

import pytest
import torch

from sadam import SAdam
from sadam import _layout as L
from sadam._hash import probe_signs

BACKENDS = ["torch", "cpu"]
LAGS = [0, 1]
SCOPES = ["group", "tensor"]
SCALES = [1e-30, 1e-20, 1e-5, 1.0, 1e5, 1e20, 1e30]


def require(backend):
    if backend == "cpu":
        from sadam.backends import native
        ok, why = native.available(torch.device("cpu"))
        if not ok:
            pytest.skip(f"native cpu kernels unavailable: {why}")


def assert_sane(opt):
    """Finite statistics, rho and the applied rho in [0, 1], finite parameters."""
    for group in opt.param_groups:
        stats = opt.state[group["params"][0]]["probe_stats"]
        assert torch.isfinite(stats).all(), stats
        k = group["probes"]
        for col in (L.rho_col(k), L.rho_applied_col(k)):
            assert ((stats[:, col] >= 0) & (stats[:, col] <= 1)).all(), stats[:, col]
        for p in group["params"]:
            assert torch.isfinite(p).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lag", LAGS)
@pytest.mark.parametrize("scope", SCOPES)
def test_finite_spike_does_not_poison_the_run(backend, lag, scope):
    """One gradient 1e19 times larger (finite) on a 2k-element tensor: AdamW stays finite, so
    must SAdam, and its lgi() must stay a number in [0, 1]."""
    require(backend)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    q = torch.nn.Parameter(p.detach().clone())
    opt = SAdam([p], backend=backend, probe_lag=lag, scope=scope)
    adamw = torch.optim.AdamW([q])
    for t in range(5):
        g = torch.randn(64, 32) * (1e19 if t == 1 else 1.0)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
    assert torch.isfinite(q).all()  # the oracle: AdamW survives this input
    rho = opt.lgi()[0]
    assert torch.isfinite(rho).all() and ((rho >= 0) & (rho <= 1)).all()
    assert torch.isfinite(opt.damping_factors()[0]).all()
    assert_sane(opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lag", LAGS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("spike", [1e17, 1e30])  # fp32 d**2 overflowed from ~1e17 on
def test_spike_on_a_million_element_tensor(backend, lag, scope, spike):
    require(backend)
    gen = torch.Generator().manual_seed(1)
    big = torch.nn.Parameter(torch.zeros(1 << 20))
    small = torch.nn.Parameter(torch.zeros(37))
    opt = SAdam([big, small], backend=backend, probe_lag=lag, scope=scope)
    for t in range(3):
        for p in (big, small):
            p.grad = torch.randn(p.shape, generator=gen) * (spike if t == 1 else 1.0)
        opt.step()
        assert_sane(opt)


def _noise_run(backend, lag, scope, scale, steps=25):
    """lgi() after each step of pure-noise gradients times ``scale`` (the same noise for every
    scale); two tensors so that scope="tensor" has two rows."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.zeros(64, 32)), torch.nn.Parameter(torch.zeros(37))]
    opt = SAdam(params, backend=backend, probe_lag=lag, scope=scope)
    trace = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.step()
        assert_sane(opt)
        trace.append(opt.lgi()[0].clone())
    return torch.stack(trace)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lag", LAGS)
@pytest.mark.parametrize("scope", SCOPES)
def test_rho_does_not_depend_on_the_gradient_scale(backend, lag, scope):
    require(backend)
    unit = _noise_run(backend, lag, scope, 1.0)
    assert unit[-1].min() > 0.5  # pure noise: rho near 1, so a collapse to 0 would show
    for scale in SCALES:
        scaled = _noise_run(backend, lag, scope, scale)
        assert (scaled - unit).abs().max() <= 0.01, f"scale {scale}"


def _float64_statistics(grads, probes, beta, scope, seed):
    """The spec's EMA statistics and rho of a gradient sequence, by hand in float64."""
    rows = 1 if scope == "group" else len(grads[0])
    a = torch.zeros(rows, probes, dtype=torch.float64)
    b = torch.zeros(rows, probes, dtype=torch.float64)
    rhos = []
    for t, step_grads in enumerate(grads, start=1):
        d = torch.zeros(rows, probes, dtype=torch.float64)
        for j, g in enumerate(step_grads):
            signs = probe_signs(g.numel(), probes, tensor_id=j, epoch=0, seed=seed,
                                dtype=torch.float64)
            d[0 if scope == "group" else j] += signs @ g.double().reshape(-1)
        # a d_i below 1/4096 of its row's largest is rounding noise of a cancelling sum: 0
        d = torch.where(d.abs() * 4096 < d.abs().amax(1, keepdim=True), 0.0, d)
        a = beta * a + (1 - beta) * d
        b = beta * b + (1 - beta) * d * d
        mean, second = a / (1 - beta ** t), b / (1 - beta ** t)
        ratio = (second - mean * mean).clamp_min(0) / second
        rhos.append(torch.where(second > 0, ratio, 0.0).mean(1) if t >= 2 else torch.zeros(rows))
    return a, b, torch.stack(rhos)


def _assert_statistics_match_float64(opt, params, grads, probes, beta, scope, seed):
    """a * 2**E and b * 2**(2E) within 1e-5 of each row's largest, and rho within 1e-4, of the
    float64 statistics of ``grads``; returns the float64 rho of every step."""
    a, b, rhos = _float64_statistics(grads, probes, beta, scope, seed)
    stats = opt.state[params[0]]["probe_stats"]
    a_kept, b_kept = L.unscaled(stats, probes)
    for kept, exact in ((a_kept, a), (b_kept, b)):
        row_max = exact.abs().amax(1, keepdim=True)
        assert ((kept - exact).abs() <= 1e-5 * row_max).all(), (kept, exact)
    torch.testing.assert_close(stats[:, L.rho_col(probes)].double(), rhos[-1], rtol=0, atol=1e-4)
    return rhos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lag", LAGS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
def test_statistics_equal_float64_ema_computed_by_hand(backend, lag, scope, scale):
    """a * 2**E and b * 2**(2E) are the float64 EMAs of d and d**2, rho the spec's estimate,
    lgi() that estimate (lag 0) or the previous one (lag 1); at scales where d**2 leaves fp32."""
    require(backend)
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 25), (7,), (3,)]  # the last one's gradient sums to 0, like a softmax bias
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    probes, beta, seed = 8, 0.9, 11
    opt = SAdam(params, backend=backend, probe_lag=lag, scope=scope, probes=probes,
                probe_beta=beta, seed=seed)
    grads, applied = [], []
    for t in range(12):
        # drift plus noise, so that rho sits away from 0 and 1
        step_grads = [(0.5 + torch.randn(s, generator=gen)) * scale for s in shapes]
        step_grads[-1] = step_grads[-1] - step_grads[-1].mean()
        grads.append(step_grads)
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        applied.append(opt.lgi()[0].reshape(-1).double())
    rhos = _assert_statistics_match_float64(opt, params, grads, probes, beta, scope, seed)
    expected_applied = rhos if lag == 0 else torch.cat([torch.zeros(1, rhos.shape[1]), rhos[:-1]])
    torch.testing.assert_close(torch.stack(applied), expected_applied, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_a_jump_of_2_to_the_130_rescales_the_statistics_exactly(backend, scope):
    """Gradients 1e-30 for four steps, then 1e10: the old b moves down by 2**(2 * 130), past
    the 2**252 that two fp32 power-of-two factors reach, and must underflow to 0, not wrap."""
    require(backend)
    gen = torch.Generator().manual_seed(5)
    shapes = [(30,), (9,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    probes, beta, seed = 8, 0.9, 11
    opt = SAdam(params, backend=backend, scope=scope, probes=probes, probe_beta=beta, seed=seed)
    grads = []
    for scale in [1e-30] * 4 + [1e10] * 4:
        step_grads = [(0.5 + torch.randn(s, generator=gen)) * scale for s in shapes]
        grads.append(step_grads)
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    _assert_statistics_match_float64(opt, params, grads, probes, beta, scope, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_redraw_from_2_down_to_subnormal_gradients_stays_finite(backend):
    """At a redraw a and b restart from 0 while the scale exponent falls from 1 (|d| = 3) to
    -127 (a subnormal d): b moves by 2**(2 * 128), and 0 times its factors must stay 0 (a factor
    of 2**128 would be inf, and 0 * inf NaN). One element: |d| is the gradient's magnitude."""
    require(backend)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = SAdam([p], backend=backend, probes=4, probe_window=2, lr=0.0)
    for g in (3.0, 3.0, 1e-44, 1e-44):
        p.grad = torch.tensor([g])
        opt.step()
        assert_sane(opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_rows_scale_exponent_is_the_smallest_that_fits_its_own_values(backend):
    """Spec section 3: each step, a row's E is the smallest with |d| / 2**E < 2, |a| / 2**E < 2
    and b / 2**(2E) < 4 (this step's d, the statistics before it), at least -200; a row whose
    d, a and b are all 0 keeps its E. Rows of 1e20, 1 and 0 gradients, then a stretch of zero
    gradients where the decaying a and b alone set E."""
    require(backend)
    gen = torch.Generator().manual_seed(8)
    probes, beta, seed = 8, 0.9, 11
    scales = (1e20, 1.0, 0.0)
    params = [torch.nn.Parameter(torch.zeros(12)) for _ in scales]
    opt = SAdam(params, backend=backend, scope="tensor", probes=probes, probe_beta=beta, seed=seed,
                lr=0.0)
    col = L.scale_col(probes)
    before = L.new_stats(len(scales), probes, "cpu")
    for t in range(16):
        live = 1.0 if t < 4 else 0.0
        grads = [(0.5 + torch.randn(12, generator=gen)) * scale * live for scale in scales]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        stats = opt.state[params[0]]["probe_stats"]
        a_before, b_before = L.unscaled(before, probes)
        for row, g in enumerate(grads):
            signs = probe_signs(12, probes, tensor_id=row, epoch=0, seed=seed, dtype=torch.float64)
            d = float((signs @ g.double()).abs().max())
            a, b = float(a_before[row].abs().max()), float(b_before[row].max())
            exponent = int(stats[row, col])
            if d == a == b == 0:
                assert exponent == int(before[row, col]), (t, row)
                continue
            fits = [d / 2.0 ** e < 2 and a / 2.0 ** e < 2 and b / 2.0 ** (2 * e) < 4
                    for e in (exponent, exponent - 1)]
            assert fits[0] and (not fits[1] or exponent == -200), (t, row, exponent, d, a, b)
        before = stats.clone()
    assert [int(e) for e in stats[:, col]] != [int(stats[0, col])] * 3  # the rows differ


def test_checkpoint_of_the_previous_layout_loads():
    """A (scopes, 2k + 5) probe_stats (no SCALE column, true a and b) loads as E = 0 and the run
    continues exactly as the one that saved it."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(50))
    opt = SAdam([p], backend="torch", scope="tensor", probes=4)
    for _ in range(5):
        p.grad = torch.randn(50, generator=gen) * 1e3
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    stats = saved["state"][0]["probe_stats"]
    a, b = L.unscaled(stats, 4)
    old = torch.cat([a.float(), b.float(), stats[:, 8:13]], dim=1)  # the 2k + 5 layout
    saved["state"][0]["probe_stats"] = old

    q = torch.nn.Parameter(p.detach().clone())
    twin = SAdam([q], backend="torch", scope="tensor", probes=4)
    twin.load_state_dict(saved)
    loaded = twin.state[q]["probe_stats"]
    assert loaded.shape == (1, L.row_width(4)) and loaded[0, L.scale_col(4)].item() == 0
    assert torch.equal(loaded[:, :L.scale_col(4)], old)
    for _ in range(3):
        g = torch.randn(50, generator=gen) * 1e3
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    torch.testing.assert_close(twin.lgi()[0], opt.lgi()[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(q, p, rtol=1e-6, atol=0)


def test_upgrade_leaves_current_layout_alone():
    stats = L.new_stats(3, 5, "cpu")
    assert L.upgrade_stats(stats, 5) is stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_a_rounded_up_to_one_keeps_its_exponent_over_a_b_just_below_it(backend):
    """fp32 can round a column's scaled a up to exactly 1 while its b, the EMA of squares, stays
    just below 1 (a = 1 - 2**-25 + 2**-30 rounds up, its square rounds down to 1 - 2**-24).
    With d = 0 the a term alone then decides: E stays, since a / 2**(E - 1) = 2 does not fit
    below 2 (spec section 3), though b alone would let E fall by one."""
    require(backend)
    probes = 4
    p = torch.nn.Parameter(torch.ones(3))
    opt = SAdam([p], backend=backend, probes=probes, lr=0.0)
    p.grad = torch.full((3,), 8.0)
    opt.step()
    stats = opt.state[p]["probe_stats"]
    exponent = int(stats[0, L.scale_col(probes)])
    stats[0, :probes] = 1.0
    stats[0, probes:2 * probes] = 1.0 - 2.0 ** -24
    p.grad = torch.zeros(3)
    opt.step()
    assert int(stats[0, L.scale_col(probes)]) == exponent
    a, b = L.unscaled(stats, probes)
    torch.testing.assert_close(a[0], torch.full((probes,), 0.9 * 2.0 ** exponent,
                                                dtype=torch.float64), rtol=1e-7, atol=0)
