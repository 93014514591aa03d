"""The study's building blocks against closed forms: STE fake quantizer, oscillation counter,
Prox-SGD's proximal step, data splits."""
import pytest
import torch

from sadam.study import data
from sadam.study.metrics import OscillationMeter
from sadam.study.prox_sgd import ProxSGD
from sadam.study.quant import QuantLinear, fake_quantize, integer_weights


def test_fake_quantize_values_lie_on_the_grid_and_round_to_nearest():
    scale, qmin, qmax = 0.25, -2, 1
    x = torch.linspace(-1.0, 0.6, 101)
    q = fake_quantize(x, torch.tensor(scale), qmin, qmax)
    grid = torch.tensor([qmin, -1, 0, qmax], dtype=torch.float32) * scale
    nearest = grid[(x[:, None] - grid[None]).abs().argmin(1)]  # nearest grid point, by search
    on_grid = (q[:, None] - grid[None]).abs().min(1).values
    assert on_grid.max() == 0
    # ties (x exactly between two points) may round either way; elsewhere: the nearest point
    tie = ((x[:, None] - grid[None]).abs().sort(1).values[:, :2].diff(1).abs() < 1e-6)[:, 0]
    assert torch.equal(q[~tie], nearest[~tie])


def test_fake_quantize_straight_through_gradient_is_one_inside_the_clip_range_and_zero_outside():
    scale, qmin, qmax = 0.5, -4, 3
    x = torch.tensor([-3.0, -2.01, -2.0, -1.3, 0.0, 0.2, 1.49, 1.5, 1.51, 4.0], requires_grad=True)
    upstream = torch.arange(1.0, 11.0)
    fake_quantize(x, torch.tensor(scale), qmin, qmax).backward(upstream)
    lo, hi = qmin * scale, qmax * scale  # closed form: d/dx = 1 on [lo, hi], 0 elsewhere
    expected = torch.where((x.detach() >= lo) & (x.detach() <= hi), upstream, 0.0)
    assert torch.equal(x.grad, expected)
    assert x.grad[0] == 0 and x.grad[-1] == 0 and x.grad[2] == upstream[2]


def test_quant_linear_uses_the_quantized_weight_and_its_integer_view():
    torch.manual_seed(0)
    layer = QuantLinear(6, 3, bits=2)
    ints = integer_weights(layer.weight, layer.w_scale, 2)
    assert set(ints.unique().tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    x = torch.randn(4, 6)
    expected = x @ (ints * layer.w_scale).T + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_oscillation_meter_counts_flips_and_direction_reversals_on_a_crafted_sequence():
    # element 0 oscillates 0,1,0,1; element 1 climbs 0,1,2,3; element 2 never moves;
    # element 3 moves once up, waits, then goes down (a reversal after a pause).
    sequence = [[0, 0, 5, 0], [1, 1, 5, 1], [0, 2, 5, 1], [1, 3, 5, 0]]
    meter = OscillationMeter()
    results = [meter.update(torch.tensor(s, dtype=torch.float32)) for s in sequence]
    assert results[0] == (0.0, 0.0)
    assert results[1] == (3 / 4, 0.0)  # first moves have no earlier direction to reverse
    assert results[2] == (2 / 4, 1 / 4)  # element 0 reverses; element 1 continues
    assert results[3] == (3 / 4, 2 / 4)  # element 0 reverses again, element 3 reverses


def _soft(z, t):
    return torch.where(z > t, z - t, torch.where(z < -t, z + t, torch.zeros_like(z)))


def test_prox_sgd_is_momentum_step_then_soft_thresholding():
    lr, momentum, l1 = 0.1, 0.9, 0.5
    p0 = torch.tensor([1.0, -1.0, 0.02, -0.03, 0.5])
    grads = [torch.tensor([0.5, -0.5, 0.1, 0.0, -2.0]), torch.tensor([-1.0, 0.2, 0.0, 0.3, 1.0])]
    p = torch.nn.Parameter(p0.clone())
    opt = ProxSGD([p], lr=lr, momentum=momentum, l1=l1)
    expected, v = p0.clone(), None
    for g in grads:
        p.grad = g.clone()
        opt.step()
        v = g.clone() if v is None else momentum * v + g
        expected = _soft(expected - lr * v, lr * l1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    assert (p.detach()[2:4] == 0).all()  # small weights are set exactly to zero


@pytest.mark.parametrize("kwargs", [dict(lr=0.0), dict(momentum=1.0), dict(l1=-1.0)])
def test_prox_sgd_rejects_invalid_hyperparameters_naming_them(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        ProxSGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_digits_split_is_disjoint_stratified_and_label_noise_touches_train_only():
    clean, noisy = data.load("digits"), data.load("digits", 0.2)
    n = [len(s.y) for s in (clean.train, clean.val, clean.test)]
    assert sum(n) == 1797 and abs(n[1] - 0.2 * 1797) < 12
    rows = torch.cat([clean.train.x, clean.val.x, clean.test.x]).flatten(1)
    assert torch.unique(rows, dim=0).shape[0] >= 1797 - 20  # digits has a few duplicate images
    assert torch.equal(noisy.test.y, clean.test.y) and torch.equal(noisy.val.y, clean.val.y)
    flipped = (noisy.train.y != clean.train.y).float().mean()
    assert 0.15 < flipped < 0.25
    counts = torch.bincount(clean.val.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38


def test_gamma_response_is_partial_correlation_given_the_current_gamma():
    from sadam.study.report import _response
    g = torch.Generator().manual_seed(0)
    n = 400
    gamma_now = torch.rand(n, generator=g)
    # events caused by the current gamma only (a larger step flips more weights): no response
    caused = (2 * gamma_now + 0.1 * torch.randn(n, generator=g)).tolist()
    noise = torch.randn(n, generator=g)
    trace = [[v] for v in gamma_now.tolist()]
    assert abs(_response(trace, caused)) < 0.2
    # gamma_{t+1} = gamma_t - 0.5 * event_t + small noise: damping that reacts to the event
    events = torch.rand(n, generator=g)
    gammas = [0.5]
    for t in range(n - 1):
        gammas.append(gammas[-1] * 0.5 + 0.4 - 0.5 * float(events[t]) + 0.01 * float(noise[t]))
    assert _response([[v] for v in gammas], events.tolist()) < -0.9
