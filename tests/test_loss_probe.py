"""probe="loss": finite differences of the loss through the closure (spec section 4)."""
import math

import pytest
import torch

import _backends
import sadam
from sadam import SAdam, probe_signs
from sadam import _layout as L


def _closure_for(param, loss_fn, calls=None):
    def closure(backward=True):
        if calls is not None:
            calls.append(backward)
        if not backward:
            return loss_fn(param)
        param.grad = None
        loss = loss_fn(param)
        loss.backward()
        return loss
    return closure


def _probe_once(x0, loss_fn, **kwargs):
    x = torch.nn.Parameter(x0.clone())
    opt = SAdam([x], lr=0.0, weight_decay=0.0, probe="loss", backend="torch", **kwargs)
    opt.step(_closure_for(x, loss_fn))
    return opt.lgi()[0].item(), x, opt


def test_kink_of_abs_gives_high_rho():
    x0 = 1e-4 * torch.randn(16, generator=torch.Generator().manual_seed(0))
    rho, _, _ = _probe_once(x0, lambda x: x.abs().sum(), probes=4)
    assert rho > 0.9


def test_quadratic_gives_low_rho():
    x0 = torch.randn(16, generator=torch.Generator().manual_seed(0))
    rho, _, _ = _probe_once(x0, lambda x: ((x - 3.0) ** 2).sum(), probes=4)
    assert rho < 0.05


def test_symmetric_estimator_is_exactly_zero_on_a_linear_loss():
    a = torch.randn(16, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    rho, _, _ = _probe_once(torch.zeros(16), lambda x: (a * x).sum(), probes=4)
    assert rho < 1e-6


def test_directions_estimator_closed_form_on_a_linear_loss():
    """f = a.x: each probe's one-sided difference is exactly a.s_i / sqrt(n) (the directional
    derivative); rho is their unbiased variance over their mean square."""
    n, k = 64, 8
    a = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rho, _, _ = _probe_once(torch.zeros(n), lambda x: (a.float() * x).sum(), probes=k,
                            probe_estimator="directions", probe_delta=1e-2)
    s = probe_signs(n, k, tensor_id=0, epoch=0, seed=0, dtype=torch.float64)
    dp = (s @ a) / math.sqrt(n)
    expected = min(max(dp.var(unbiased=True).item() / (dp.pow(2).mean().item() + 1e-6), 0.0), 10)
    assert rho == pytest.approx(expected, rel=2e-3)  # fp32 loss differences at step 1e-2


def test_step_without_closure_raises():
    x = torch.nn.Parameter(torch.zeros(3))
    x.grad = torch.ones(3)
    opt = SAdam([x], probe="loss", backend="torch")
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    assert torch.equal(x.detach(), torch.zeros(3)) and not opt.state[x]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_parameters_restored_bit_exactly(dtype, estimator):
    x0 = torch.randn(37, generator=torch.Generator().manual_seed(3)).to(dtype) * 7
    rho, x, _ = _probe_once(x0, lambda x: (x.float().sin() * 3).abs().sum(),
                            probe_estimator=estimator, probe_delta=0.3)
    assert torch.equal(x.detach(), x0)  # lr = 0: any change would come from the probes
    assert rho > 0


@pytest.mark.parametrize("backend", _backends.params())
def test_probing_does_not_change_the_update(backend):
    """With damping=0 the loss probe runs but the trajectory is AdamW's on the same closures."""
    device = _backends.device_of(backend)
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin.load_state_dict(net.state_dict())
    net, twin = net.to(device), twin.to(device)
    x, y = torch.randn(16, 5).to(device), torch.randn(16, 1).to(device)
    opt = SAdam(net.parameters(), lr=1e-2, damping=0.0, probe="loss", backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    for model, o in ((net, opt), (twin, ref)):
        def closure(backward=True, model=model, o=o):
            if not backward:
                return torch.nn.functional.mse_loss(model(x), y)
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        for _ in range(10):
            o.step(closure)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_dropout_masks_replayed_and_rng_continues_as_without_probes():
    torch.manual_seed(5)
    w = torch.nn.Parameter(torch.randn(32))
    drop = torch.nn.Dropout(0.5)
    masks = []

    def loss_fn(p):
        out = drop(torch.ones(32)) * p
        masks.append(out.detach() != 0)
        return out.pow(2).sum()

    opt = SAdam([w], lr=1e-3, probe="loss", probes=3, backend="torch")
    torch.manual_seed(6)
    opt.step(_closure_for(w, loss_fn))
    after_step = torch.rand(4)
    assert len(masks) == 1 + 2 * 3
    assert all(torch.equal(m, masks[0]) for m in masks[1:])
    assert masks[0].float().mean().item() not in (0.0, 1.0)  # dropout really drew a mask

    torch.manual_seed(6)  # the same closure evaluated once, no probes
    loss_fn(w)
    assert torch.equal(torch.rand(4), after_step)


def test_plain_closure_keeps_the_gradients_of_the_first_evaluation():
    x = torch.nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))
    seen = {}

    def closure():  # no `backward` keyword: runs with grad, its gradients are discarded
        x.grad = None
        loss = (x ** 3).sum()
        loss.backward()
        seen.setdefault("grad", x.grad.clone())
        return loss

    opt = SAdam([x], lr=0.0, weight_decay=0.0, probe="loss", probes=2, backend="torch")
    opt.step(closure)
    torch.testing.assert_close(x.grad, seen["grad"])
    torch.testing.assert_close(x.grad, 3 * torch.tensor([0.5, -2.0, 3.0]) ** 2)


def test_probe_every_and_the_ema_over_probings():
    calls = []
    x = torch.nn.Parameter(1e-4 * torch.ones(8))
    opt = SAdam([x], lr=0.0, weight_decay=0.0, probe="loss", probes=2, probe_every=3,
                backend="torch")
    closure = _closure_for(x, lambda p: p.abs().sum(), calls)
    rhos = []
    for _ in range(7):
        opt.step(closure)
        rhos.append(opt.lgi()[0].item())
    probe_calls = calls.count(False)
    assert probe_calls == 3 * 2 * 2  # probings at steps 1, 4, 7; 2 probes, 2 sides each
    # rho_raw is nearly the same at every probing here, so the bias-corrected EMA stays at it
    assert rhos[0] == pytest.approx(rhos[6], abs=1e-3) and rhos[0] > 0.9
    assert rhos[1] == rhos[0] and rhos[2] == rhos[0]  # no probing on steps 2 and 3


def test_preserve_buffers_keeps_batch_norm_statistics():
    """Probe evaluations inside preserve_buffers leave running statistics as one forward would."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(10, 4)
    opt = SAdam(model.parameters(), lr=0.0, weight_decay=0.0, probe="loss", probes=2,
                backend="torch")

    def closure(backward=True):
        if not backward:
            with sadam.preserve_buffers(model):
                return model(x).pow(2).mean()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    twin(x)  # the oracle: the closure's one training forward, no probes
    assert model[1].num_batches_tracked.item() == 1
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=0, atol=0)


def _loss_setup(backend, **kwargs):
    device = _backends.device_of(backend)
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1))
    model = model.to(device)
    x, y = torch.randn(12, 4).to(device), torch.randn(12, 1).to(device)
    opt = SAdam(model.parameters(), lr=1e-2, damping=2.0, probe="loss", probes=3,
                backend=backend, **kwargs)
    return model, opt, x, y


@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_overflow_step_with_loss_probe_changes_nothing(backend, estimator):
    """A GradScaler step with found_inf set neither probes nor counts: params, moments, step,
    the probe statistics (rho EMA, probing count, step count) and lgi() are left as they were,
    and the next probing happens on the schedule of the steps really taken."""
    model, opt, x, y = _loss_setup(backend, probe_every=2, probe_estimator=estimator)
    device = _backends.device_of(backend)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 8)
    calls = []

    def closure(backward=True):
        """GradScaler checks the gradients before the step: the scaled backward runs before
        scaler.step, and the closure only evaluates the loss (for f0 and the probes)."""
        calls.append(backward)
        return (model(x) - y).abs().mean()

    def backward(poison):
        opt.zero_grad()
        scaler.scale((model(x) - y).abs().mean()).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")

    def step(poison):
        backward(poison)
        scaler.step(opt, closure)
        scaler.update()

    for _ in range(3):
        step(poison=False)
    snapshot = {k: [t.clone() for t in v.values() if isinstance(t, torch.Tensor)]
                for k, v in opt.state.items()}
    params = [p.detach().clone() for p in model.parameters()]
    lgi, gamma = opt.lgi()[0].clone(), opt.damping_factors()[0].clone()
    calls.clear()
    step(poison=True)
    assert calls == [True]  # no probe evaluation on a skipped step
    assert scaler.get_scale() == 2.0 ** 7
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for key, saved in snapshot.items():
        now = [t for t in opt.state[key].values() if isinstance(t, torch.Tensor)]
        assert all(torch.equal(a, b) for a, b in zip(now, saved))
    assert torch.equal(opt.lgi()[0], lgi) and torch.equal(opt.damping_factors()[0], gamma)
    calls.clear()
    step(poison=False)  # the 4th step taken: probe_every=2 does not probe
    assert calls == [True]
    calls.clear()
    step(poison=False)  # the 5th: probes
    assert calls.count(False) > 0


@pytest.mark.parametrize("backend", _backends.params())
def test_loss_probe_rho_ema_is_bias_corrected_and_damps_the_step(backend):
    """rho after probings 1 and 2 is the bias-corrected EMA of the raw estimates (closed form
    from two raw values the estimator gives on f = w . |x|: at the kink x = 0 every probe sees
    a pure variance, rho_raw = 1; at x = 0.5 f is linear, rho_raw = 0), and the step applies
    gamma = exp(-damping * rho)."""
    device = _backends.device_of(backend)
    x = torch.nn.Parameter(torch.zeros(8, device=device))
    w = torch.rand(8, generator=torch.Generator().manual_seed(9)).to(device) + 0.5
    beta = 0.6
    opt = SAdam([x], lr=1e-2, weight_decay=0.0, damping=2.0, probe="loss", probes=2,
                probe_beta=beta, backend=backend)
    closure = _closure_for(x, lambda p: (w * p.abs()).sum())
    opt.step(closure)
    stats = opt.state[x]["probe_stats"]
    # the EMA without correction would be (1 - beta) = 0.4 after one probing
    assert float(stats[0, L.rho_col(2)]) == pytest.approx(1.0, abs=1e-6)
    assert float(opt.damping_factors()[0]) == pytest.approx(math.exp(-2.0), rel=1e-6)
    assert torch.equal(x.detach(), torch.zeros_like(x))  # |x| has gradient 0 at 0: no move
    x.data.fill_(0.5)
    opt.step(closure)  # smooth now: rho_raw = 0, EMA (beta * 0.4 + 0) / (1 - beta^2)
    assert float(stats[0, L.rho_col(2)]) == pytest.approx(beta * (1 - beta) / (1 - beta ** 2),
                                                         abs=1e-6)
