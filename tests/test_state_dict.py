"""state_dict round trips: a resumed run is bit-identical to an uninterrupted one."""
import copy
import io

import pytest
import torch

import _backends
from _unchanged import assert_unchanged, snapshot
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


# --------------------------------------------------- what a loaded state may hold, and becomes
def _stepped(backend="torch", steps=3, **kw):
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = SAdam(params, lr=1e-2, backend=backend, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def _set(index, key, value):
    return lambda sd: sd["state"][index].__setitem__(key, value)


def _stats_col(column, value):

    def mutate(sd):
        sd["state"][0]["probe_stats"][0, column(sd["param_groups"][0]["probes"])] = value
    return mutate


REFUSED = {
    "bool step": (_set(0, "step", True), "step"),
    "negative step": (_set(0, "step", -1.0), "step"),
    "nan step": (_set(0, "step", torch.tensor(float("nan"))), "step"),
    "two-element step": (_set(0, "step", torch.tensor([3.0, 3.0])), "step"),
    "int64 exp_avg": (lambda sd: sd["state"][0].__setitem__(
        "exp_avg", sd["state"][0]["exp_avg"].long()), "exp_avg"),
    "complex exp_avg": (lambda sd: sd["state"][1].__setitem__(
        "exp_avg", sd["state"][1]["exp_avg"].to(torch.complex64)), "exp_avg"),
    "bool exp_avg_sq": (lambda sd: sd["state"][1].__setitem__(
        "exp_avg_sq", sd["state"][1]["exp_avg_sq"] > 0), "exp_avg_sq"),
    "exp_avg_sq of another shape": (_set(1, "exp_avg_sq", torch.zeros(6)), "exp_avg_sq.*shape"),
    "max_exp_avg_sq of another shape": (_set(0, "max_exp_avg_sq", torch.zeros(3, 4)),
                                        "max_exp_avg_sq.*shape"),
    "negative exp_avg_sq": (lambda sd: sd["state"][0]["exp_avg_sq"].__setitem__((0, 0), -1.0),
                            "exp_avg_sq.*negative"),
    "int32 probe_stats": (lambda sd: sd["state"][0].__setitem__(
        "probe_stats", sd["state"][0]["probe_stats"].int()), "probe_stats"),
    "probe_stats beyond fp32": (lambda sd: sd["state"][0].__setitem__(
        "probe_stats", sd["state"][0]["probe_stats"].double() * 1e300), "probe_stats"),
}


def _refused_cases():
    from sadam import _layout as L
    return dict(REFUSED, **{
        "rho -1": (_stats_col(L.rho_col, -1.0), "rho"),
        "rho 5": (_stats_col(L.rho_col, 5.0), "rho"),
        "applied rho 2": (_stats_col(L.rho_applied_col, 2.0), "applied rho"),
        "applied gamma 3": (_stats_col(L.gamma_applied_col, 3.0), "applied gamma"),
        "negative count": (_stats_col(L.count_col, -2.0), "count"),
        "negative epoch": (_stats_col(L.epoch_col, -1.0), "epoch"),
    })


@pytest.mark.parametrize("case", list(_refused_cases()))
def test_broken_state_is_refused_naming_the_key_before_anything_changes(case):
    mutate, message = _refused_cases()[case]
    params, opt = _stepped(amsgrad=True)
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)


CONVERTED_STEPS = {"float": 3.0, "int": 3, "int64 tensor": torch.tensor(3),
                   "float64 tensor": torch.tensor(3.0, dtype=torch.float64),
                   "1-element tensor": torch.tensor([3.0])}


@pytest.mark.parametrize("kind", list(CONVERTED_STEPS))
def test_old_step_forms_load_as_the_fp32_tensor_and_resume_identically(kind):
    params, opt = _stepped()
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = SAdam(twin_params, lr=1e-2, backend="torch")
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        state["step"] = copy.deepcopy(CONVERTED_STEPS[kind])
    twin.load_state_dict(sd)
    for p in twin_params:
        step = twin.state[p]["step"]
        assert step.dtype == torch.float32 and step.shape == () and float(step) == 3.0
    for _ in range(2):
        for p, q in zip(params, twin_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_moments_become_the_state_dtype_and_statistics_fp32():
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        state["exp_avg"] = state["exp_avg"].double()
        state["exp_avg_sq"] = state["exp_avg_sq"].half()
    sd["state"][0]["probe_stats"] = sd["state"][0]["probe_stats"].double()
    opt.load_state_dict(sd)
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    assert opt.state[params[0]]["probe_stats"].dtype == torch.float32

    bf16 = SAdam([p.detach().clone().requires_grad_() for p in params], lr=1e-2,
                 backend="torch", state_dtype=torch.bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["state_dtype"] = torch.bfloat16
    bf16.load_state_dict(saved)
    for p in bf16.param_groups[0]["params"]:
        assert bf16.state[p]["exp_avg"].dtype == torch.bfloat16


def test_loss_probe_directions_rho_up_to_10_loads():
    """The "directions" estimator's rho is clipped to [0, 10], not [0, 1]: such a state loads."""
    from sadam import _layout as L
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SAdam(params, probe="loss", probes=3, probe_estimator="directions", backend="torch")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = {"probe_stats": torch.zeros(1, L.row_width(3))}
    sd["state"][0]["probe_stats"][0, L.rho_col(3)] = 7.5
    opt.load_state_dict(sd)
    sd["state"][0]["probe_stats"][0, L.rho_col(3)] = 11.0
    with pytest.raises(ValueError, match="rho"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------- round trips as torch's optimizers
def test_state_dict_is_the_same_after_load_deepcopy_and_pickle():
    import pickle

    params, opt = _stepped()
    keys = set(opt.state_dict()["param_groups"][0])
    opt.load_state_dict(opt.state_dict())
    for other in (opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert set(other.state_dict()["param_groups"][0]) == keys
    assert "differentiable" not in keys


@pytest.mark.parametrize("named_saved", [True, False])
@pytest.mark.parametrize("named_loaded", [True, False])
def test_param_names_survive_a_load_and_named_groups_can_be_added(named_saved, named_loaded):
    def build():
        torch.manual_seed(5)
        model = torch.nn.Linear(3, 2)
        params = model.named_parameters() if named_saved else model.parameters()
        return model, params

    model, params = build()
    opt = SAdam(params, backend="torch")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = SAdam(model.named_parameters() if named_loaded else model.parameters(),
                 backend="torch")
    opt2.load_state_dict(sd)
    names = opt2.state_dict()["param_groups"][0].get("param_names")
    if named_saved or named_loaded:
        assert names == ["weight", "bias"]
        extra = torch.nn.Parameter(torch.zeros(2))
        opt2.add_param_group({"params": [("extra", extra)]})
        assert opt2.state_dict()["param_groups"][1]["param_names"] == ["extra"]
    else:
        assert names is None
