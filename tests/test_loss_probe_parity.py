"""probe_estimator="directions" against an independent re-implementation of the authors' estimator.

The oracle is written from the estimator's description only: per probe, every tensor moved by
``delta`` along its own unit Gaussian direction (``torch.randn``, normalised per tensor), a
one-sided difference of the loss, and rho = unbiased variance of the k differences over
(their mean square + 1e-6), clipped to [0, 10]. Both draw many probings at the same fixed points of
a 2-bit straight-through quantized MLP on sklearn's digits; a two-sample Kolmogorov-Smirnov test
(fixed seeds, so the verdict is deterministic) compares the two rho distributions. A sign-direction
version of the oracle, which the quantized loss tells apart, shows the test has the power to fail.
"""
import math

import pytest
import torch
from torch import nn

from sadam import SAdam

K, DELTA, PROBINGS = 8, 0.01, 300


class _FakeQuantize(torch.autograd.Function):
    """2 bits, scale 1.5 / max|x|, round, clamp to [-2, 1]; straight-through gradient."""

    @staticmethod
    def forward(ctx, x):
        scale = 1.5 / x.detach().abs().max().clamp_min(1e-12)
        return torch.clamp(torch.round(x * scale), -2, 1) / scale

    @staticmethod
    def backward(ctx, grad):
        return grad


class QuantMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(nn.functional.linear(x, _FakeQuantize.apply(self.fc1.weight), self.fc1.bias))
        return nn.functional.linear(h, _FakeQuantize.apply(self.fc2.weight), self.fc2.bias)


def _digits():
    datasets = pytest.importorskip("sklearn.datasets", reason="the parity test uses sklearn digits")
    x, y = datasets.load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)


def ks_2samp(a, b):
    """Two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value (Numerical Recipes'
    Q_KS with the small-sample correction)."""
    a, b = sorted(a), sorted(b)
    n, m = len(a), len(b)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        x = min(a[i], b[j])
        while i < n and a[i] == x:
            i += 1
        while j < m and b[j] == x:
            j += 1
        d = max(d, abs(i / n - j / m))
    en = math.sqrt(n * m / (n + m))
    return d, q_ks((en + 0.12 + 0.11 / en) * d)


def q_ks(lam):
    """The Kolmogorov distribution's tail P(K > lam)."""
    if lam == 0:
        return 1.0
    if lam < 1.18:  # the series in this form converges fast for small lambda
        y = math.exp(-math.pi ** 2 / (8 * lam * lam))
        p = 1 - math.sqrt(2 * math.pi) / lam * sum(y ** ((2 * t - 1) ** 2) for t in range(1, 6))
    else:
        p = 2 * sum((-1) ** (t - 1) * math.exp(-2 * t * t * lam * lam) for t in range(1, 101))
    return min(max(p, 0.0), 1.0)


def test_ks_2samp_on_known_cases():
    assert ks_2samp([1, 2, 3], [1, 2, 3]) == (0.0, 1.0)
    d, p = ks_2samp(list(range(100)), list(range(100, 200)))
    assert d == 1.0 and p < 1e-20
    g = torch.Generator().manual_seed(0)
    same = ks_2samp(torch.randn(400, generator=g).tolist(), torch.randn(400, generator=g).tolist())
    shifted = ks_2samp(torch.randn(400, generator=g).tolist(),
                       (torch.randn(400, generator=g) + 0.5).tolist())
    assert same[1] > 0.05 and shifted[1] < 1e-6
    # Q_KS(1.0) = 0.27, Q_KS(1.36) = 0.049, Q_KS(2.0) = 0.00067 (tabulated values)
    assert q_ks(1.0) == pytest.approx(0.2700, abs=1e-3)
    assert q_ks(1.36) == pytest.approx(0.0494, abs=1e-3)
    assert q_ks(2.0) == pytest.approx(0.00067, abs=2e-5)



def _loss_fn(model, x, y):
    return lambda: nn.functional.cross_entropy(model(x), y)


def _oracle_rhos(model, loss, probings, generator, signs=False):
    """The authors' estimator, re-implemented from its description."""
    params = [p for p in model.parameters()]
    backup = [p.detach().clone() for p in params]
    rhos = []
    with torch.no_grad():
        f0 = float(loss())
        for _ in range(probings):
            values = []
            for _ in range(K):
                for p, b in zip(params, backup):
                    if signs:
                        d = torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1
                    else:
                        d = torch.randn(p.shape, generator=generator)
                    p.copy_(b + DELTA * d / d.norm())
                values.append((float(loss()) - f0) / DELTA)
            v = torch.tensor(values, dtype=torch.float64)
            rhos.append(float((v.var(unbiased=True) / (v.pow(2).mean() + 1e-6)).clamp(0, 10)))
        for p, b in zip(params, backup):
            p.copy_(b)
    return rhos


def _our_rhos(model, loss, probings, seed):
    opt = SAdam(model.parameters(), lr=0.0, weight_decay=0.0, probe="loss",
                probe_estimator="directions", probes=K, probe_delta=DELTA, seed=seed,
                backend="torch")

    def closure(backward=True):
        if not backward:
            return loss()
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    before = [p.detach().clone() for p in model.parameters()]
    rhos = []
    for _ in range(probings):
        opt.step(closure)
        rhos.append(opt.lgi()[0].item())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # a fixed point
    return rhos


def _checkpoints():
    """The model at initialization and after 100 AdamW steps, with a fixed batch of 32."""
    x, y = _digits()
    torch.manual_seed(0)
    model = QuantMLP()
    batch = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:32]
    yield "init", model, x[batch], y[batch]
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(2)
    for _ in range(100):
        idx = torch.randint(0, len(x), (32,), generator=order)
        adamw.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        adamw.step()
    yield "step100", model, x[batch], y[batch]


@pytest.fixture
def one_thread():
    """Thousands of tiny forwards: one thread avoids the pool's overhead on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_directions_estimator_matches_the_authors_statistically(one_thread):
    report = {}
    for name, model, xb, yb in _checkpoints():
        loss = _loss_fn(model, xb, yb)
        ours = _our_rhos(model, loss, PROBINGS, seed=11)
        theirs = _oracle_rhos(model, loss, PROBINGS, torch.Generator().manual_seed(12))
        signs = _oracle_rhos(model, loss, PROBINGS, torch.Generator().manual_seed(13), signs=True)
        report[name] = dict(ours=sum(ours) / PROBINGS, theirs=sum(theirs) / PROBINGS,
                            signs=sum(signs) / PROBINGS, p=ks_2samp(ours, theirs)[1],
                            p_signs=ks_2samp(signs, theirs)[1])
    print(report)
    for name, r in report.items():
        assert r["p"] > 0.01, (name, report)
    # the power check: sign directions give a different rho on the quantized loss, and KS sees it
    assert min(r["p_signs"] for r in report.values()) < 1e-3, report
