"""A default device other than the parameters' (``torch.set_default_device``) changes nothing.

Large-model scripts often call ``torch.set_default_device("cuda")``, and AdamW steps the same under
it. So every tensor SAdam and PSS make names its device: the parameters' own, or the CPU for what
lives on the host (the CPU kernel's hyperparameters, the loss probe's Gaussian draws, PSS's host
copy of its flag). Here the other default device is ``meta`` (the one other device a machine
without a GPU has, and a strict stand-in: a tensor made on it has no values, so one made on the
default device fails the step or changes its result), and ``cuda`` too where there is a GPU. Each
run is compared bit for bit with the same run under the CPU default.
"""
import pytest
import torch

import sadam
from sadam._loss_directions import gaussian_directions, sign_directions
from sadam.pss import PSS

from _backends import device_of, params as backend_params

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
OTHER_DEFAULTS = ["meta", pytest.param("cuda", marks=NEEDS_GPU)]

CONFIGS = {
    "gradient-lag1": dict(),
    "gradient-lag0-tensor-amsgrad-window-maximize": dict(probe_lag=0, scope="tensor", amsgrad=True,
                                                         probe_window=2, maximize=True),
    "tensor-hyperparameters": dict(lr=torch.tensor(1e-2), betas=(torch.tensor(0.8), 0.99),
                                   weight_decay=torch.tensor(0.1), damping=torch.tensor(2.0)),
    "grad-scaler": dict(amp=True),
    "loss-symmetric": dict(probe="loss", probes=3),
    "loss-directions": dict(probe="loss", probes=3, probe_estimator="directions"),
    "off": dict(probe="off"),
}


def _data(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=gen).to(device)
    w = torch.randn(6, 5, generator=gen).to(device)
    return x, w


def _train(backend, config, default):
    """Four steps of a small ReLU model, the optimizer made, stepped, saved and restored with
    ``default`` as the default device; the values a step leaves behind."""
    device = device_of(backend)
    config = dict(config)
    amp = config.pop("amp", False)
    x, w0 = _data(device)
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(torch.zeros(5, device=device))
    with torch.device(default):
        opt = sadam.SAdam([w, b], **{"lr": 1e-2, "backend": backend, **config})
        for step in range(4):
            def closure(backward=True):
                loss = ((x @ w + b).relu() - 0.5).abs().sum() * (4.0 if amp else 1.0)
                if backward:  # a probe evaluation (backward=False) leaves the gradients alone
                    opt.zero_grad()
                    loss.backward()
                return loss
            if config.get("probe") == "loss":
                opt.step(closure)
                continue
            closure()
            if amp:  # what GradScaler hands a step of an optimizer that unscales itself
                opt.grad_scale = torch.full((), 4.0, device=device)
                opt.found_inf = torch.full((), float(step == 2), device=device)
            opt.step()
            opt.__dict__.pop("grad_scale", None)
            opt.__dict__.pop("found_inf", None)
        saved = opt.state_dict()
        again = sadam.SAdam([w, b], **{"lr": 1e-2, "backend": backend, **config})
        again.load_state_dict(saved)
        values = [w.detach(), b.detach(), *opt.lgi(), *opt.damping_factors(), *again.lgi()]
        values += [v for p in (w, b) for v in again.state[p].values()]
    # the run stepped: the weights moved and every parameter has its moments
    assert not torch.equal(w.detach(), w0)
    assert all({"step", "exp_avg", "exp_avg_sq"} <= again.state[p].keys() for p in (w, b))
    return [v.cpu().clone() for v in values]


@pytest.mark.parametrize("default", OTHER_DEFAULTS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", backend_params())
def test_a_step_under_another_default_device_is_the_same(backend, config, default):
    expected = _train(backend, CONFIGS[config], "cpu")
    got = _train(backend, CONFIGS[config], default)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"value {i} differs"


@pytest.mark.parametrize("default", OTHER_DEFAULTS)
@pytest.mark.parametrize("backend", backend_params())
def test_a_first_step_at_lr_0_from_zero_gradients_under_another_default_device(backend, default):
    """The step torch.distributed.checkpoint takes to create the state: it asks whether any
    gradient is nonzero, an answer made on the host."""
    device = device_of(backend)
    w = torch.nn.Parameter(torch.ones(4, 3, device=device))
    with torch.device(default):
        opt = sadam.SAdam([w], lr=0.0, backend=backend)
        w.grad = torch.zeros_like(w)
        opt.step()
    assert float(opt.state[w]["step"]) == 0.0 and opt.state[w]["exp_avg"].device == w.device
    assert torch.equal(w.detach().cpu(), torch.ones(4, 3))


@pytest.mark.parametrize("make", [sign_directions, gaussian_directions])
def test_loss_probe_directions_lie_on_their_tensors_device(make):
    """Drawn on the CPU or not, the directions end on the tensor's device (the meta device here,
    a GPU in training), and a default device plays no part in them."""
    kwargs = dict(seed=3, group_index=1, tensor_index=2, probing=5)
    on_meta = make(torch.empty(4, 3, device="meta"), 6, **kwargs)
    assert on_meta.device.type == "meta" and on_meta.shape == (6, 12)
    expected = make(torch.empty(4, 3), 6, **kwargs)
    with torch.device("meta"):
        got = make(torch.empty(4, 3, device="cpu"), 6, **kwargs)
    assert got.device.type == "cpu" and got.dtype == expected.dtype
    assert torch.equal(got, expected)


def _smooth(device, default):
    """Six observed steps with a spike at step 5 and a period of 3, then a state_dict round trip,
    all with ``default`` as the default device: the reports and the weights."""
    gen = torch.Generator().manual_seed(1)
    weights = [torch.nn.Parameter(torch.randn(*shape, generator=gen).to(device))
               for shape in ((10, 12), (12,), (3, 10), (10, 12))]
    with torch.device(default):
        pss = PSS(weights, warmup=1, tau=1.5, every=3)
        reports = []
        for t in range(6):
            for p in weights:
                p.grad = torch.full_like(p, 10.0 if t == 4 else 1.0)
            pss.observe()
            if device == "cuda":
                torch.cuda.synchronize()  # the flag has landed: step() acts on it now
            reports.append(pss.step())
        reports.append(pss.smooth_now())
        again = PSS(weights, warmup=1, tau=1.5, every=3)
        again.load_state_dict(pss.state_dict())
        reports.append(again.smooth_now())
    return reports, [p.detach().cpu().clone() for p in weights]


@pytest.mark.parametrize("default", OTHER_DEFAULTS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
def test_pss_under_another_default_device_is_the_same(device, default):
    expected_reports, expected = _smooth(device, "cpu")
    reports, got = _smooth(device, default)
    assert [r and r.reason for r in expected_reports] == [None, None, "every", None, "spike",
                                                          "every", "manual", "manual"]
    assert reports == expected_reports
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
