"""state_dict round trips: a resumed run is bit-identical to an uninterrupted one."""
import copy
import io

import pytest
import torch

import _backends
from sadam import SAdam

MODES = {
    "gradient-lag1": dict(probe="gradient", probe_lag=1),
    "gradient-lag0-tensor-window": dict(probe="gradient", probe_lag=0, scope="tensor",
                                        probe_window=7),
    "loss-symmetric": dict(probe="loss", probes=3, probe_every=2),
    "loss-directions": dict(probe="loss", probes=3, probe_estimator="directions"),
}


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(10, 2)).to(device)


def _train(model, opt, steps, start):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(12, 6, generator=gen), torch.randint(0, 2, (12,), generator=gen)
        device = next(model.parameters()).device
        x, y = x.to(device), y.to(device)

        def closure(backward=True):
            if not backward:
                return torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        torch.manual_seed(10_000 + t)  # dropout draws depend on the step only
        opt.step(closure)


def _through_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_resume_is_bit_identical(mode, backend):
    device = _backends.device_of(backend)
    steps = 50 if backend == "torch" else 12  # the kernels: a shorter run, one window redraw
    straight = _model(device=device)
    opt = SAdam(straight.parameters(), lr=1e-2, backend=backend, **mode)
    _train(straight, opt, 2 * steps, 0)

    first = _model(device=device)
    opt1 = SAdam(first.parameters(), lr=1e-2, backend=backend, **mode)
    _train(first, opt1, steps, 0)
    saved = _through_bytes({"model": first.state_dict(), "optim": opt1.state_dict()})

    resumed = _model(seed=123, device=device)  # everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = SAdam(resumed.parameters(), lr=1e-2, backend=backend, **mode)
    opt2.load_state_dict(saved["optim"])
    _train(resumed, opt2, steps, steps)

    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(opt.lgi(), opt2.lgi()):
        assert torch.equal(a, b)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_state_keeps_fp32_moments_beside_bf16_params():
    p = torch.nn.Parameter(torch.randn(9).to(torch.bfloat16))
    opt = SAdam([p], backend="torch")
    p.grad = torch.randn(9).to(torch.bfloat16)
    opt.step()
    p2 = torch.nn.Parameter(p.detach().clone())
    opt2 = SAdam([p2], backend="torch")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert opt2.state[p2][key].dtype == torch.float32
        assert torch.equal(opt2.state[p2][key], opt.state[p][key])


def test_loaded_state_does_not_alias_the_state_dict():
    p = torch.nn.Parameter(torch.randn(4))
    opt = SAdam([p], backend="torch")
    p.grad = torch.ones(4)
    opt.step()
    sd = opt.state_dict()
    opt2 = SAdam([torch.nn.Parameter(torch.randn(4))], backend="torch")
    opt2.load_state_dict(sd)
    next(iter(opt2.state.values()))["exp_avg"].add_(1)
    assert torch.equal(sd["state"][0]["exp_avg"], opt.state[p]["exp_avg"])
