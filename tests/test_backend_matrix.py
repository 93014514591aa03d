"""Every kernel backend through ``sadam.functional`` (the stage order every backend shares)
against the reference on the same device: maximize on/off, grad_scale none/tensor,
fp32/bf16/fp16 parameters, fp32/bf16 moments, both probe lags; and ``probe="off"``.

Kernels the machine cannot run are recorded skips (``tests/_backends.py``); triton on CPU runs in
the interpreter subprocess of ``test_triton_interpreter.py``, cuda needs a GPU.
"""
import pytest
import torch

import _backends
import sadam
from sadam import _layout as L
from _native_cases import (assert_rel, assert_stats_close, clone, make_group, new_grads,
                           run_functional)
from spec_tolerance import assert_params_close

SHAPES = [(37,), (0,), (129, 7), (1,), (5, 3)]
STEPS = 4


def assert_within_one_ulp(actual, expected, what):
    """Spec section 6 for reduced-precision storage: within one ulp of the reference's rounding
    (subnormals included: their spacing is the smallest normal times eps)."""
    info = torch.finfo(expected.dtype)
    e = expected.float()
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(info.tiny))))
    bad = (actual.float() - e).abs() > ulp * 1.0001
    assert not bad.any(), f"{what}: {int(bad.sum())} elements more than 1 ulp apart"


def assert_same(ours, ref):
    """Spec section 6: fp32 tensors within 1e-5 of the tensor's scale, reduced precision within
    one ulp; the statistics as in the native kernels' tests."""
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(ours[name], ref[name])):
            assert a.dtype == e.dtype and a.shape == e.shape
            if e.numel() == 0:
                continue
            if e.dtype in (torch.bfloat16, torch.float16):
                assert_within_one_ulp(a.cpu(), e.cpu(), f"{name}[{i}]")
            else:
                assert_params_close(a.cpu(), e.cpu(), name=f"{name}[{i}]")
    for a, e in zip(ours["steps"], ref["steps"]):
        assert torch.equal(a.cpu(), e.cpu())
    assert_stats_close(ours["stats"].cpu(), ref["stats"].cpu(), ours["probes"])


def resync(ours, ref):
    """Restart ours from the reference's state: reduced-precision storage is checked per step
    (one ulp from identical inputs); otherwise the roundings would compound."""
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        for a, e in zip(ours[name], ref[name]):
            a.copy_(e)
    ours["stats"].copy_(ref["stats"])


@pytest.mark.parametrize("backend", _backends.kernel_params())
@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["m32", "mbf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["p32", "pbf16", "p16"])
@pytest.mark.parametrize("grad_scale", [None, 64.0], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
def test_functional_matches_reference(backend, lag, state_dtype, dtype, grad_scale, maximize):
    device = _backends.device_of(backend)
    scale = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    ref = make_group(SHAPES, dtype=dtype, state_dtype=state_dtype, device=device,
                     scope="tensor" if lag else "group", amsgrad=lag == 1, window=3,
                     maximize=maximize, grad_scale=scale)
    ours = clone(ref)
    gen = torch.Generator().manual_seed(5)
    exact = dtype == torch.float32 and state_dtype == torch.float32
    for _ in range(STEPS):
        new_grads(ref, gen, scale=grad_scale or 1.0)
        for a, e in zip(ours["grads"], ref["grads"]):
            a.copy_(e)
        run_functional(ref, "torch", lag)
        run_functional(ours, backend, lag)
        assert_same(ours, ref)
        if not exact:
            resync(ours, ref)
    assert float(ref["stats"][:, L.rho_col(8)].abs().max()) > 0  # the statistics moved


@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("amsgrad", [False, True])
def test_probe_off_is_adamw_and_leaves_the_statistics(backend, amsgrad):
    """probe="off": no damping whatever ``damping`` says, AdamW's trajectory, gamma reported 1."""
    device = _backends.device_of(backend)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(6, 5), (7,)]]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = sadam.SAdam(params, lr=1e-2, weight_decay=0.1, damping=5.0, probe="off",
                      amsgrad=amsgrad, backend=backend)
    ref = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        for p, q in zip(params, twins):
            g = (0.3 + torch.randn(p.shape, generator=gen)) * (-1) ** step
            p.grad, q.grad = g.to(device), g.to(device)
        opt.step()
        ref.step()
    for p, q in zip(params, twins):
        assert_rel(p.detach().cpu(), q.detach().cpu(), 1e-5, "param")
    stats = opt.state[params[0]]["probe_stats"]
    k = opt.param_groups[0]["probes"]
    assert not stats[:, :2 * k + 1].any()  # no sample was taken
    assert float(opt.damping_factors()[0]) == 1.0 and float(opt.lgi()[0]) == 0.0



@pytest.mark.parametrize("backend", _backends.params())
def test_the_optimizer_steps_with_the_backend_it_names(backend, monkeypatch):
    """SAdam(backend=b) runs b's update and no other backend's (the reference and the CPU
    kernel agree to the last bit on plain fp32 steps, so values alone cannot tell them apart)."""
    import importlib
    modules = {"torch": "reference", "cpu": "native", "cuda": "native", "triton": "triton"}
    calls = {}
    for module_name in set(modules.values()):
        try:
            module = importlib.import_module(f"sadam.backends.{module_name}")
        except ImportError:  # triton not installed: that backend cannot run either
            continue

        def counted(*args, _update=module.update, _name=module_name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _update(*args, **kwargs)
        monkeypatch.setattr(module, "update", counted)
    device = _backends.device_of(backend)
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in ((257,), (33, 9))]
    opt = sadam.SAdam(params, lr=1e-2, backend=backend)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == {modules[backend]: 2}
