"""probe="loss": finite differences of the loss through the closure (spec section 4)."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _backends
import sadam
from sadam import SAdam, probe_signs
from sadam import _layout as L
from sadam._hash import probe_key
from sadam._loss_directions import gaussian_directions, sign_directions

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in sadam.available_backends(torch.device("cpu")),
    reason="the CPU kernel of sadam._C is not built"))]


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


def _keyword_closure(opt, loss_fn):
    """A closure with the ``backward`` keyword: evaluates ``loss_fn()``, and backpropagates it
    (after ``opt.zero_grad()``) only when asked."""
    def closure(backward=True):
        loss = loss_fn()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss
    return closure


def _probe_once(x0, loss_fn, backend="torch", **kwargs):
    x = torch.nn.Parameter(x0.clone())
    opt = SAdam([x], lr=0.0, weight_decay=0.0, probe="loss", backend=backend, **kwargs)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_norm", [1.5, 4.0])
def test_symmetric_estimator_closed_form_on_a_quadratic(backend, x_norm):
    """f = b/2 |x|^2 moved by +-t s_i (t = h / sqrt(n), h = delta * max(|x0|, 1), s_i the
    spec's signs): the differences over h are exactly dp, dm = +-b x0.s_i / sqrt(n) + b h / 2,
    so rho = sum (b h / 2)^2 / (sum (b h / 2)^2 + sum (b x0.s_i)^2 / n)."""
    n, k, delta, b = 16, 4, 0.5, 3.0
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(4))
    x0 = x0 * (x_norm / x0.norm())
    rho, _, _ = _probe_once(x0, lambda x: 0.5 * b * (x * x).sum(), backend, probes=k,
                            probe_delta=delta)
    h = delta * max(x_norm, 1.0)
    signs = probe_signs(n, k, tensor_id=0, epoch=0, seed=0).double()
    even = k * (b * h / 2) ** 2
    odd = float(((b * signs @ x0.double()) ** 2).sum()) / n
    assert rho == pytest.approx(even / (even + odd), rel=1e-4)


def test_symmetric_estimator_probes_exactly_the_parameters_with_gradients():
    """The closed form of the quadratic over every parameter that has a gradient, a one-element
    one included, and none without: x (16) and s (1) move along their own spec signs (tensor
    ids 0 and 1), an unused parameter (no gradient) is left out of n and of |x0|."""
    k, delta, b = 4, 0.5, 3.0
    gen = torch.Generator().manual_seed(4)
    x = torch.nn.Parameter(torch.randn(16, generator=gen))
    s = torch.nn.Parameter(torch.randn(1, generator=gen) + 2.0)
    unused = torch.nn.Parameter(torch.full((3,), 7.0))
    opt = SAdam([x, s, unused], lr=0.0, weight_decay=0.0, probe="loss", probes=k,
                probe_delta=delta, backend="torch")

    closure = _keyword_closure(opt, lambda: 0.5 * b * ((x * x).sum() + (s * s).sum()))

    x0 = torch.cat([x.detach(), s.detach()]).double()
    opt.step(closure)
    signs = torch.cat([probe_signs(16, k, tensor_id=0, epoch=0, seed=0),
                       probe_signs(1, k, tensor_id=1, epoch=0, seed=0)], dim=1).double()
    h = delta * max(float(x0.norm()), 1.0)
    even = k * (b * h / 2) ** 2
    odd = float(((b * signs @ x0) ** 2).sum()) / 17
    assert opt.lgi()[0].item() == pytest.approx(even / (even + odd), rel=1e-4)


@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_a_loss_group_without_gradients_has_rho_zero(estimator):
    """A loss-probed group none of whose parameters has a gradient has nothing to probe: its rho
    is 0 (no damping), and a group that has gradients is probed as usual."""
    frozen = torch.nn.Parameter(torch.ones(4))
    w = torch.nn.Parameter(0.5 + 1e-4 * torch.randn(6, generator=torch.Generator().manual_seed(2)))
    groups = [{"params": [frozen]}, {"params": [w]}] if estimator == "directions" else \
        [{"params": [frozen]}]
    opt = SAdam(groups, lr=0.0, weight_decay=0.0, probe="loss", probes=3,
                probe_estimator=estimator, backend="torch")

    closure = _keyword_closure(opt, lambda: (w - 0.5).abs().sum())

    opt.step(closure)
    assert frozen.grad is None and opt.lgi()[0].item() == 0.0
    if estimator == "directions":
        assert opt.lgi()[1].item() > 0


def test_a_group_with_non_finite_probes_leaves_the_other_groups_probed():
    """The directions estimator probes each group alone: when only the first group's probe
    losses are infinite, it keeps its statistics and the second group still gets its sample."""
    x = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(3)))
    y = torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(4)))
    opt = SAdam([{"params": [x]}, {"params": [y]}], lr=0.0, weight_decay=0.0, probe="loss",
                probe_estimator="directions", probes=3, backend="torch")
    x0 = x.detach().clone()

    def closure(backward=True):
        loss = x.sum() + (y - 0.3).abs().sum()
        if backward:
            opt.zero_grad()
            loss.backward()
            return loss
        return loss if torch.equal(x.detach(), x0) else loss * float("inf")

    opt.step(closure)
    counts = [opt.state[p]["probe_stats"][0, L.count_col(3)].item() for p in (x, y)]
    assert counts == [0, 1]


@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_loss_probe_reports_the_damping_it_applies(estimator):
    """damping_factors() after a loss-probed step is exp(-damping * rho) of the rho lgi()
    reports (spec: gamma = exp(-lambda * rho))."""
    w = torch.nn.Parameter(0.5 + 1e-4 * torch.randn(8, generator=torch.Generator().manual_seed(9)))
    opt = SAdam([w], lr=1e-3, damping=2.5, probe="loss", probes=3, probe_estimator=estimator,
                backend="torch")

    closure = _keyword_closure(opt, lambda: (w - 0.5).abs().sum())

    for _ in range(2):
        opt.step(closure)
    rho = opt.lgi()[0].item()
    assert rho > 0
    assert opt.damping_factors()[0].item() == pytest.approx(math.exp(-2.5 * rho), rel=1e-6)


NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]


@pytest.mark.parametrize("damping_on", [None, "cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_loss_probe_damping_is_fp32_whatever_the_default_dtype(damping_on):
    """gamma = exp(-damping * rho) is computed in fp32 on the parameters' device (spec: math in
    fp32) under a float64 default dtype too: a float64 product rounds to different fp32 bits for
    about 1 value in 7. A damping tensor on another device (damping_on) gives the same bits as
    the number, so the exponential is taken where the statistics are, not on the GPU."""
    damping = 0.3 if damping_on is None else torch.tensor(0.3, device=damping_on)
    gen = torch.Generator().manual_seed(12)
    ws = [torch.nn.Parameter(0.5 + 1e-3 * torch.randn(6, generator=gen)) for _ in range(4)]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt = SAdam([{"params": [w]} for w in ws], lr=1e-2, damping=damping, probe="loss",
                    probes=3, backend="torch")
        closure = _keyword_closure(opt, lambda: sum(((w - 0.5) ** 2).sum().sqrt() for w in ws))
        applied, expected = [], []
        for _ in range(8):
            opt.step(closure)
            rho = torch.stack([r.reshape(()) for r in opt.lgi()])
            applied.append(torch.stack([g.reshape(()) for g in opt.damping_factors()]))
            expected.append(torch.exp(-torch.tensor(0.3, dtype=torch.float32) * rho.float()))
    finally:
        torch.set_default_dtype(default)
    applied, expected = torch.stack(applied), torch.stack(expected)
    assert applied.dtype == torch.float32 and (expected < 1).all()
    assert torch.equal(applied, expected)


def test_loss_probe_damps_the_adamw_update_by_the_reported_gamma():
    """With probe="loss" the update is AdamW's scaled by gamma = damping_factors() (weight decay
    off, one step: the Adam term alone), while probe="off" takes AdamW's full step."""
    w0 = 0.5 + 1e-4 * torch.randn(8, generator=torch.Generator().manual_seed(10))
    deltas = {}
    for probe in ("loss", "off"):
        w = torch.nn.Parameter(w0.clone())
        opt = SAdam([w], lr=1e-2, weight_decay=0.0, damping=2.0, probe=probe, probes=3,
                    backend="torch")

        closure = _keyword_closure(opt, lambda: (w - 0.5).abs().sum())

        opt.step(closure)
        deltas[probe] = (w.detach() - w0, opt.damping_factors()[0].item())
    adamw = deltas["off"][0]  # Adam's first step: -lr * sign(g), up to eps
    gamma = deltas["loss"][1]
    assert 0 < gamma < 0.5 and deltas["off"][1] == 1.0
    torch.testing.assert_close(deltas["loss"][0], gamma * adamw, rtol=1e-4, atol=1e-7)  # fp32 w - w0


def test_closure_returning_nothing_is_named_and_a_non_finite_loss_skips_the_probe():
    x = torch.nn.Parameter(torch.randn(5))
    opt = SAdam([x], probe="loss", backend="torch")

    def returns_nothing():
        opt.zero_grad()
        x.square().sum().backward()

    with pytest.raises(RuntimeError) as error:
        opt.step(returns_nothing)
    assert str(error.value) == "probe='loss' needs the closure to return the loss"

    def infinite_loss():
        opt.zero_grad()
        x.square().sum().backward()
        return torch.tensor(float("inf"))

    opt.step(infinite_loss)
    stats = opt.state[x]["probe_stats"]
    assert stats[0, L.count_col(8)].item() == 0  # no probe sample from an infinite loss
    assert torch.isfinite(x).all()


def test_sign_directions_are_the_spec_signs_one_byte_each():
    """Group 0's sign directions are the spec's probe signs, kept as int8 (k bytes per element
    while a probing runs, not 4k or 8k)."""
    signs = sign_directions(torch.zeros(37), 5, seed=3, group_index=0, tensor_index=2, probing=4)
    assert signs.dtype == torch.int8 and signs.shape == (5, 37)
    assert torch.equal(signs.float(), probe_signs(37, 5, tensor_id=2, epoch=4, seed=3).float())


def test_gaussian_directions_are_fp32_whatever_the_default_dtype():
    """The directions are documented fp32 values from a CPU generator: a float64 default dtype
    changes neither their dtype nor their values."""
    kwargs = dict(seed=1, group_index=0, tensor_index=0, probing=2)
    expected = gaussian_directions(torch.zeros(19), 3, **kwargs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = gaussian_directions(torch.zeros(19, dtype=torch.float32), 3, **kwargs)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def _gaussian_directions(n, k, *, seed, probing, tensor_index):
    """The documented directions: torch.randn(k, n) from a CPU generator seeded with the
    32-bit hash key of (seed, probing, tensor index), each row normalised."""
    g = torch.Generator().manual_seed(int(probe_key(seed, probing, tensor_index)))
    z = torch.randn(k, n, generator=g).double()
    return z / z.norm(dim=1, keepdim=True)


def _directions_rho(dp):
    return min(max(dp.var(unbiased=True).item() / (dp.pow(2).mean().item() + 1e-6), 0.0), 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slope", [1.0, 1e-3])
def test_directions_estimator_closed_form_on_a_linear_loss(backend, slope):
    """f = a.x: each probe's one-sided difference is exactly a.u_i (the directional derivative
    along the unit Gaussian direction u_i); rho is their unbiased variance over their mean
    square plus 1e-6 (a gentle slope makes that term count)."""
    n, k = 67, 8  # not a multiple of 16: randn(k, n) differs from k calls of randn(n)
    a = slope * torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rho, _, _ = _probe_once(torch.zeros(n), lambda x: (a.float() * x).sum(), backend, probes=k,
                            probe_estimator="directions", probe_delta=1e-2)
    dp = _gaussian_directions(n, k, seed=0, probing=0, tensor_index=0) @ a
    assert rho == pytest.approx(_directions_rho(dp), rel=2e-3)  # fp32 differences at step 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_directions_estimator_one_rho_per_param_group(backend):
    """Each group is probed alone: its rho is the closed form of its own directions, which
    differ between equal-sized tensors of different groups (the group enters the key)."""
    n, k = 32, 6
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(n, generator=gen), 5 * torch.randn(n, generator=gen)
    x, y = torch.nn.Parameter(torch.zeros(n)), torch.nn.Parameter(torch.zeros(n))
    opt = SAdam([{"params": [x]}, {"params": [y]}], lr=0.0, weight_decay=0.0, probe="loss",
                probe_estimator="directions", probes=k, seed=9, backend=backend)

    closure = _keyword_closure(opt, lambda: (a * x).sum() + (b * y).sum())

    opt.step(closure)
    rho_x, rho_y = (r.item() for r in opt.lgi())
    ux = _gaussian_directions(n, k, seed=9, probing=0, tensor_index=0)
    # the documented key: the group index folded into the seed, seed ^ (0x27D4EB2F * group)
    uy = _gaussian_directions(n, k, seed=9 ^ 0x27D4EB2F, probing=0, tensor_index=0)
    assert not torch.allclose(ux, uy)
    assert rho_x == pytest.approx(_directions_rho(ux @ a.double()), rel=2e-3)
    assert rho_y == pytest.approx(_directions_rho(uy @ b.double()), rel=2e-3)


@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_no_two_tensors_share_a_direction(estimator):
    """Equal-sized tensors in different groups (same index in their group) move along different
    directions; group 0 keeps the spec's hash for the symmetric estimator."""
    n = 16
    x = torch.nn.Parameter(torch.ones(n))
    y = torch.nn.Parameter(torch.ones(n))
    moves = []

    def closure(backward=True):
        if not backward:
            moves.append((x.detach() - 1, y.detach() - 1))
        loss = x.sum() + y.sum()
        if backward:
            opt.zero_grad()
            loss.backward()
        return loss

    opt = SAdam([{"params": [x]}, {"params": [y]}], lr=0.0, weight_decay=0.0, probe="loss",
                probes=3, probe_estimator=estimator, backend="torch")
    opt.step(closure)
    probes_x = [dx for dx, dy in moves if dx.abs().sum() > 0]
    probes_y = [dy for dx, dy in moves if dy.abs().sum() > 0]
    assert probes_x and probes_y
    for dx in probes_x:
        for dy in probes_y:
            assert not torch.allclose(dx.sign(), dy.sign())
    if estimator == "symmetric":
        expected = probe_signs(n, 3, tensor_id=0, epoch=0, seed=0)[0]
        assert torch.equal(moves[0][0].sign(), expected)


def test_step_without_closure_raises():
    x = torch.nn.Parameter(torch.zeros(3))
    x.grad = torch.ones(3)
    opt = SAdam([x], probe="loss", backend="torch")
    with pytest.raises(RuntimeError) as error:
        opt.step()
    assert str(error.value) == ("SAdam with probe='loss' needs a closure: call optimizer.step(closure) "
                                "with a closure that returns the loss")
    assert torch.equal(x.detach(), torch.zeros(3)) and not opt.state[x]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_parameters_restored_bit_exactly(dtype, estimator, backend):
    x0 = torch.randn(37, generator=torch.Generator().manual_seed(3)).to(dtype) * 7
    rho, x, _ = _probe_once(x0, lambda x: (x.float().sin() * 3).abs().sum(), backend,
                            probe_estimator=estimator, probe_delta=0.3)
    assert torch.equal(x.detach(), x0)  # lr = 0: any change would come from the probes
    assert rho > 0


@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_probing_does_not_change_the_update(estimator, backend):
    """With damping=0 the loss probe runs but the trajectory is AdamW's on the same closures."""
    device = _backends.device_of(backend)
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin.load_state_dict(net.state_dict())
    net, twin = net.to(device), twin.to(device)
    x, y = torch.randn(16, 5).to(device), torch.randn(16, 1).to(device)
    opt = SAdam(net.parameters(), lr=1e-2, damping=0.0, probe="loss", backend=backend,
                probe_estimator=estimator)
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


@pytest.mark.parametrize("estimator, probe_rng, same_masks", [
    ("symmetric", None, True), ("symmetric", "fresh", False), ("directions", None, False),
    ("directions", "fresh", False), ("directions", "replay", True)])
def test_dropout_masks_replayed_or_fresh_and_rng_continues_as_without_probes(
        estimator, probe_rng, same_masks):
    """"replay" (the symmetric default) evaluates every probe with the first evaluation's
    dropout mask, "fresh" (the directions default) draws a new one each time; either way the
    random-number state continues as if no probe had run."""
    w = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(5)))
    drop = torch.nn.Dropout(0.5)
    masks = []

    def loss_fn(p):
        out = drop(torch.ones(64)) * p
        masks.append(out.detach() != 0)
        return out.pow(2).sum()

    opt = SAdam([w], lr=1e-3, probe="loss", probes=3, probe_estimator=estimator,
                probe_rng=probe_rng, backend="torch")
    torch.manual_seed(6)
    opt.step(_closure_for(w, loss_fn))
    after_step = torch.rand(4)
    assert len(masks) == 1 + (2 * 3 if estimator == "symmetric" else 3)
    assert masks[0].float().mean().item() not in (0.0, 1.0)  # dropout really drew a mask
    if same_masks:
        assert all(torch.equal(m, masks[0]) for m in masks[1:])
    else:
        assert len({tuple(m.tolist()) for m in masks}) == len(masks)

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


def test_preserve_buffers_restores_and_lets_an_exception_through():
    """An error inside the block still restores the buffers, and reaches the caller."""
    model = torch.nn.BatchNorm1d(3)
    saved = model.running_mean.clone()
    with pytest.raises(RuntimeError, match="inside the block"):
        with sadam.preserve_buffers(model):
            model(torch.randn(4, 3) + 5.0)
            raise RuntimeError("inside the block")
    assert torch.equal(model.running_mean, saved)


def _bn_model_and_twin():
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _assert_bn_as_after_forwards(model, twin, x, forwards):
    for _ in range(forwards):
        twin(x)  # the oracle: the closure's training forwards, no probes
    assert model[1].num_batches_tracked.item() == forwards
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=0, atol=0)


class _SharedNorm(torch.nn.Module):
    """Two batch norms, one of them run twice per forward: directly, then inside its block."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))

    def forward(self, x):
        return self.head(self.block(self.block[0](x)))


@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_probes_keep_the_buffers_of_shared_and_nested_modules(estimator):
    """Every buffer is restored to its value before the evaluation, also for a module that runs
    twice in one forward and before the block that contains it, and for every module."""
    torch.manual_seed(3)
    model, twin = _SharedNorm(), _SharedNorm()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(10, 4)
    opt = SAdam(model.parameters(), lr=0.0, weight_decay=0.0, probe="loss", probes=2,
                probe_estimator=estimator, backend="torch")

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
        twin(x)  # the oracle: the closure's one training forward per step, no probes
    for name, buffer in twin.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buffer, rtol=0, atol=0)


@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_probe_evaluations_may_return_floats_and_skip_unused_params(estimator):
    """A closure may return a Python float when it does not backpropagate, and a group may hold
    a parameter without a gradient: the probe runs, and rho is that of the used parameter."""
    noise = torch.randn(8, generator=torch.Generator().manual_seed(6))
    w = torch.nn.Parameter(0.5 + 1e-4 * noise)  # at the kinks of |x - 0.5|: rho > 0
    unused = torch.nn.Parameter(torch.zeros(3))
    results = {}
    for returns_float in (False, True):
        x = torch.nn.Parameter(w.detach().clone())
        opt = SAdam([x, unused], lr=0.0, weight_decay=0.0, probe="loss", probes=3,
                    probe_estimator=estimator, backend="torch")

        def closure(backward=True, x=x, opt=opt, returns_float=returns_float):
            loss = (x - 0.5).abs().sum()
            if backward:
                opt.zero_grad()
                loss.backward()
                return loss
            return float(loss) if returns_float else loss

        opt.step(closure)
        assert unused.grad is None
        results[returns_float] = opt.lgi()[0].item()
    assert results[True] == results[False] > 0


def test_plain_closure_probes_keep_a_missing_gradient_missing():
    """A closure without the ``backward`` keyword backpropagates in every evaluation: the
    gradients are put back afterwards, and a parameter that had none still has none."""
    x = torch.nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(6)))
    unused = torch.nn.Parameter(torch.zeros(3))
    opt = SAdam([x, unused], lr=0.0, weight_decay=0.0, probe="loss", probes=3, backend="torch")

    def closure():
        opt.zero_grad()
        loss = (x - 0.5).abs().sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert unused.grad is None
    torch.testing.assert_close(x.grad, torch.sign(x.detach() - 0.5), rtol=0, atol=0)


def test_an_error_inside_a_probe_evaluation_reaches_the_caller_and_changes_nothing():
    """The closure's error propagates; the parameters are not stepped and the buffers are those
    of the closure's training forward (the failed evaluation's forward is undone)."""
    model, twin = _bn_model_and_twin()
    x = torch.randn(10, 4)
    opt = SAdam(model.parameters(), lr=1e-2, probe="loss", probes=2, backend="torch")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]

    def closure(backward=True):
        loss = model(x).pow(2).mean()
        if backward:
            opt.zero_grad()
            loss.backward()
            return loss
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    _assert_bn_as_after_forwards(model, twin, x, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_cuda_random_state_continues_as_without_probes(estimator):
    """Dropout on CUDA tensors: after a probing step the CUDA generator is where one training
    forward leaves it."""
    w = torch.nn.Parameter(torch.randn(256, device="cuda"))
    opt = SAdam([w], lr=0.0, weight_decay=0.0, probe="loss", probes=3, probe_estimator=estimator,
                backend="torch")

    closure = _keyword_closure(opt,
                               lambda: torch.nn.functional.dropout(w, 0.5).square().sum())

    torch.cuda.manual_seed(11)
    opt.step(closure)
    after_step = torch.cuda.get_rng_state()
    torch.cuda.manual_seed(11)
    closure()
    assert torch.equal(after_step, torch.cuda.get_rng_state())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_loss_probe_leaves_cuda_uninitialized():
    """On a machine with a GPU, probing a CPU model must not create a CUDA context (a fresh
    process: other tests may have initialized CUDA in this one)."""
    code = ("import torch, sadam\n"
            "w = torch.nn.Parameter(torch.randn(8))\n"
            "opt = sadam.SAdam([w], probe='loss', backend='torch')\n"
            "def closure(backward=True):\n"
            "    loss = w.square().sum()\n"
            "    if backward:\n"
            "        opt.zero_grad(); loss.backward()\n"
            "    return loss\n"
            "opt.step(closure)\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
@pytest.mark.parametrize("keyword", [True, False])
def test_probes_never_move_batch_norm_statistics(keyword, estimator, backend):
    """Without any helper in the closure, plain or with the ``backward`` keyword: after two steps
    the running statistics are those of the closure's two training forwards."""
    model, twin = _bn_model_and_twin()
    x = torch.randn(10, 4)
    opt = SAdam(model.parameters(), lr=0.0, weight_decay=0.0, probe="loss", probes=2,
                probe_estimator=estimator, backend=backend)

    def training_loss():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    if keyword:
        def closure(backward=True):
            return training_loss() if backward else model(x).pow(2).mean()
    else:
        closure = training_loss
    for _ in range(2):
        opt.step(closure)
    _assert_bn_as_after_forwards(model, twin, x, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_non_finite_probe_loss_keeps_the_statistics(estimator, backend):
    """One probing whose evaluations return inf (or NaN) leaves rho and the statistics as they
    were; later probings go on from there and the parameters stay finite."""
    torch.manual_seed(8)
    w = torch.nn.Parameter(torch.randn(12))
    poison = {"value": None}

    def closure(backward=True):
        loss = (w - 1).abs().sum()
        if backward:
            opt.zero_grad()
            loss.backward()
            return loss
        return loss if poison["value"] is None else loss * poison["value"]

    opt = SAdam([w], lr=1e-2, damping=1.0, probe="loss", probes=3, probe_estimator=estimator,
                backend=backend)
    for _ in range(2):
        opt.step(closure)
    stats = opt.state[w]["probe_stats"]
    k = 3
    kept = stats.clone()
    for bad in (float("inf"), float("nan")):
        poison["value"] = bad
        opt.step(closure)
        changed = [c for c in range(stats.shape[1]) if stats[0, c] != kept[0, c]]
        assert changed == [L.epoch_col(k)]  # only the step counter of probe_every moved
        assert opt.lgi()[0].item() == kept[0, L.rho_col(k)].item()
        assert torch.isfinite(w).all()
        kept = stats.clone()
    poison["value"] = None
    opt.step(closure)
    assert math.isfinite(opt.lgi()[0].item()) and torch.isfinite(w).all()
    assert stats[0, L.count_col(k)].item() == 3  # probings 1, 2 and 5 counted


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetric_probe_non_finite_on_one_side_keeps_the_statistics(backend):
    """The symmetric estimator needs both sides of a probe: a loss that is infinite wherever
    the first weight moved down (one side of every probe) skips the probing like a fully
    non-finite one."""
    w = torch.nn.Parameter(torch.randn(12, generator=torch.Generator().manual_seed(5)))
    start = {}

    def closure(backward=True):
        loss = (w - 1).abs().sum()
        if backward:
            start["w"] = w.detach().clone()
            opt.zero_grad()
            loss.backward()
            return loss
        return loss * float("inf") if w[0] < start["w"][0] else loss

    opt = SAdam([w], lr=1e-2, probe="loss", probes=3, backend=backend)
    opt.step(closure)
    stats = opt.state[w]["probe_stats"]
    assert stats[0, L.count_col(3)].item() == 0 and opt.lgi()[0].item() == 0.0
    assert torch.isfinite(stats).all() and torch.isfinite(w).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["symmetric", "directions"])
def test_found_inf_step_changes_nothing_with_the_loss_probe(estimator, backend):
    """A GradScaler overflow step (found_inf set) changes nothing: parameters, moments, step,
    probe statistics and rho stay, and no probe evaluation runs."""
    torch.manual_seed(9)
    w = torch.nn.Parameter(torch.randn(10))
    calls = []
    opt = SAdam([w], lr=1e-2, probe="loss", probes=2, probe_estimator=estimator, backend=backend)
    closure = _closure_for(w, lambda p: (p - 1).abs().sum(), calls)
    opt.step(closure)
    opt.step(closure)
    before = {name: v.clone() for name, v in opt.state[w].items()}
    w0, rho0, calls_before = w.detach().clone(), opt.lgi()[0].clone(), len(calls)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step(closure)
    assert torch.equal(w.detach(), w0)
    for name, value in before.items():
        assert torch.equal(opt.state[w][name], value), name
    assert torch.equal(opt.lgi()[0], rho0)
    assert calls[calls_before:] == [True]  # the closure's own evaluation only
    opt.found_inf = torch.tensor(0.0)
    opt.step(closure)
    assert not torch.equal(w.detach(), w0)  # a finite step goes on


def _readme_block(marker):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"one README python block with {marker!r}"
    return found[0]


def test_readme_loss_probe_snippet_runs_as_written():
    namespace = {}
    exec(compile(_readme_block('probe="loss"'), "README.md", "exec"), namespace)
    opt = namespace["opt"]
    assert isinstance(opt, SAdam) and 0 <= opt.lgi()[0].item() <= 1


def test_loss_probe_signs_are_the_spec_hash_with_the_group_in_the_seed():
    """Group 0 keeps sadam-spec's hash (all 32 bits); group g hashes with
    seed ^ (0x27D4EB2F * g mod 2**32)."""
    from sadam._loss_directions import sign_directions
    p = torch.zeros(3, 333)
    for seed, group in ((0, 0), (12345, 0), (2 ** 32 - 1, 0), (7, 1), (7, 5)):
        ours = sign_directions(p, 32, seed=seed, group_index=group, tensor_index=3, probing=9)
        spec_seed = seed ^ ((0x27D4EB2F * group) & 0xFFFFFFFF)
        assert torch.equal(ours.float(), probe_signs(999, 32, tensor_id=3, epoch=9,
                                                     seed=spec_seed))


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
