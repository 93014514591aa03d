"""rho and gamma through the public API, with hand-set gradient sequences and closed forms."""
import math

import pytest
import torch

import _backends
from sadam import SAdam

BETA = 0.9


def _feed(grads, steps, n=64, warmup=50, **kwargs):
    """Step an optimizer over hand-set gradients; return the mean lgi() after warm-up."""
    p = torch.nn.Parameter(torch.zeros(n))
    opt = SAdam([p], lr=0.0, weight_decay=0.0, probe_beta=BETA, backend="torch", **kwargs)
    seen = []
    for t in range(steps):
        p.grad = grads(t)
        opt.step()
        if t >= warmup:
            seen.append(opt.lgi()[0].item())
    return sum(seen) / len(seen), opt


@pytest.mark.parametrize("lag", [0, 1])
def test_constant_gradient_is_smooth(lag):
    g = torch.randn(64, generator=torch.Generator().manual_seed(0))
    rho, _ = _feed(lambda t: g.clone(), 100, probes=32, probe_lag=lag)
    assert rho < 0.05


@pytest.mark.parametrize("lag", [0, 1])
def test_sign_alternating_gradient_chatters(lag):
    g = torch.randn(64, generator=torch.Generator().manual_seed(0))
    rho, _ = _feed(lambda t: g * (-1) ** t, 100, probes=32, probe_lag=lag)
    assert rho > 0.95


@pytest.mark.parametrize("mu,sigma", [(1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (0.0, 1.0)])
def test_noisy_gradient_matches_closed_form(mu, sigma):
    """g = mean + sigma * noise, with the mean chosen so every probe sees |D_i| = mu * sqrt(n).

    Then d_i has mean +-mu*sqrt(n) and variance sigma**2 * n, and the per-probe normalized variance
    is sigma**2 / (sigma**2 + mu**2). The EMA over a finite window shrinks the variance estimate by
    (1 - beta) / (1 + beta) (the sum of squared EMA weights, 0.053 for beta = 0.9) while the
    random denominator pushes the ratio the other way, so the estimate lies within that fraction
    of the value; averaging 32 probes over 250 steps adds a sampling error below 0.01.
    """
    n = 64
    gen = torch.Generator().manual_seed(1)
    mean = torch.zeros(n)
    mean[0] = mu * math.sqrt(n)  # one element: s_i . mean = +-mu*sqrt(n) for every probe
    rho, _ = _feed(lambda t: mean + sigma * torch.randn(n, generator=gen), 300, n=n, probes=32)
    expected = sigma ** 2 / (sigma ** 2 + mu ** 2)
    tolerance = (1 - BETA) / (1 + BETA) * expected + 0.01
    assert abs(rho - expected) <= tolerance


def test_scope_tensor_separates_noisy_from_smooth():
    gen = torch.Generator().manual_seed(2)
    smooth, noisy = torch.nn.Parameter(torch.zeros(40)), torch.nn.Parameter(torch.zeros(7, 9))
    opt = SAdam([smooth, noisy], lr=0.0, probes=32, scope="tensor", backend="torch")
    fixed = torch.randn(40, generator=gen)
    for _ in range(60):
        smooth.grad = fixed.clone()
        noisy.grad = torch.randn(7, 9, generator=gen)
        opt.step()
    rho = opt.lgi()[0]
    assert rho.shape == (2,)
    assert rho[0] < 0.05 and rho[1] > 0.8
    gamma = opt.damping_factors()[0]
    torch.testing.assert_close(gamma, torch.exp(-1.0 * rho))


def _paired_runs(steps, **kwargs):
    """Two optimizers (lag 0 and lag 1) fed the same gradient sequence; their lgi() traces."""
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(50, generator=gen) * (1 + t % 3) for t in range(steps)]
    traces = {}
    for lag in (0, 1):
        p = torch.nn.Parameter(torch.zeros(50))
        opt = SAdam([p], lr=1e-2, probe_lag=lag, damping=2.0, backend="torch", **kwargs)
        traces[lag] = []
        for g in grads:
            p.grad = g.clone()
            opt.step()
            traces[lag].append((opt.lgi()[0].item(), opt.damping_factors()[0].item()))
    return traces


def test_lag_one_applies_the_previous_estimate():
    traces = _paired_runs(30)
    assert traces[1][0] == (0.0, 1.0)  # step 1 of lag 1: no statistics yet, gamma = 1
    for t in range(1, 30):
        assert traces[1][t][0] == pytest.approx(traces[0][t - 1][0], abs=1e-7)
    assert all(gamma == pytest.approx(math.exp(-2.0 * rho), rel=1e-6)
               for rho, gamma in traces[0])


def test_applied_gamma_scales_the_adamw_step():
    """Without weight decay, SAdam's step is AdamW's step times the reported gamma."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(33, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    opt = SAdam([p], lr=1e-2, weight_decay=0.0, damping=3.0, probe_lag=0, backend="torch")
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0)
    for _ in range(20):
        g = torch.randn(33, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        before = p.detach().clone()
        q.data.copy_(before)
        opt.step()
        ref.step()
        gamma = opt.damping_factors()[0]
        # atol: two fp32 ulps of |p| <= 4, the rounding of the parameter write itself
        torch.testing.assert_close(p - before, gamma * (q - before), rtol=1e-5, atol=1e-6)
    assert 0 < gamma < 1


def test_probe_window_redraws_and_resets():
    p = torch.nn.Parameter(torch.zeros(20))
    opt = SAdam([p], lr=0.0, probe_window=10, probe_lag=0, backend="torch")
    gen = torch.Generator().manual_seed(5)
    rhos = []
    for _ in range(25):
        p.grad = torch.randn(20, generator=gen)
        opt.step()
        rhos.append(opt.lgi()[0].item())
    k = 8
    stats = opt.state[p]["probe_stats"][0]
    assert stats[2 * k].item() == 5  # samples since the last reset (steps 21..25)
    assert stats[2 * k + 1].item() == 2  # two redraws: at steps 11 and 21
    assert rhos[10] == rhos[9] and rhos[20] == rhos[19]  # one sample after a reset: rho kept
    assert rhos[11] != rhos[10]


def test_probe_off_reports_no_damping():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = SAdam([p], probe="off", backend="torch")
    p.grad = torch.ones(5)
    opt.step()
    assert opt.lgi()[0].item() == 0.0 and opt.damping_factors()[0].item() == 1.0


def test_lgi_before_any_step():
    opt = SAdam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))],
                scope="tensor", backend="torch")
    assert opt.lgi()[0].tolist() == [0.0, 0.0]
    assert opt.damping_factors()[0].tolist() == [1.0, 1.0]


def test_lgi_before_any_step_is_on_the_parameters_device():
    """Like the statistics a step creates, the fresh values lie on the parameters' device (meta
    here: a model built for deferred initialisation); a group without parameters gives CPU
    values."""
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = SAdam([{"params": [meta]}, {"params": []}], backend="torch")
    assert [r.device.type for r in opt.lgi()] == ["meta", "cpu"]
    assert [g.device.type for g in opt.damping_factors()] == ["meta", "cpu"]


@pytest.mark.parametrize("emit", ["directional_derivatives", "update"])
def test_directional_derivatives_are_fp32_sums_whatever_the_default_dtype(emit):
    """The reference sums d in fp32 (spec section 3) under a float64 default dtype too: both the
    separate pass and the update that emits it. Three tensors share one group row, so a float64
    row would round the sum differently."""
    from _native_cases import clone, make_group, new_grads, step_of
    from sadam.backends import reference

    def d_of(group):
        if emit == "update":
            return reference.update(step_of(group), damped=False, emit_probe=True)
        return reference.directional_derivatives(step_of(group))

    group = make_group([(33,), (7, 5), (64,)], probes=8, scope="group")
    new_grads(group, torch.Generator().manual_seed(3))
    fp32_default = d_of(clone(group))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = d_of(clone(group))
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and torch.equal(got, fp32_default)



@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("config", [
    dict(scope="group"), dict(scope="tensor", probe_lag=0, amsgrad=True), dict(probe="loss"),
    dict(probe="loss", probe_estimator="symmetric")], ids=["group", "tensor-lag0", "loss",
                                                           "loss-symmetric"])
def test_a_float64_default_dtype_changes_no_bit(backend, config):
    """Every number SAdam computes is fp32 (spec section 1) whatever torch's default dtype: five
    steps under a float64 default give the same parameters, rho and gamma, bit for bit."""
    device = _backends.device_of(backend)

    def run():
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32)
                                     .to(device)) for shape in ((40,), (7, 3), (64,))]
        opt = SAdam(params, lr=1e-2, weight_decay=1e-2, backend=backend, **config)

        def closure():
            opt.zero_grad()
            loss = sum((p - 0.3).abs().sum() for p in params)
            loss.backward()
            return loss
        for _ in range(5):
            if config.get("probe") == "loss":
                opt.step(closure)
                continue
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(device)
            opt.step()
        return [t.detach().clone() for t in (*params, *opt.lgi(), *opt.damping_factors())]

    expected = run()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run()
    finally:
        torch.set_default_dtype(default)
    assert all(a.dtype == torch.float32 and torch.equal(a, e) for a, e in zip(got, expected))
    assert float(expected[3].max()) > 0  # rho moved
