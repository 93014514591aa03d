"""state_dict round trips: a resumed run is bit-identical to an uninterrupted one."""
import copy
import io
import re

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


def _step_both(opt, params, twin, twin_params, steps=2):
    """Step ``opt`` and ``twin`` on the same random gradients (each on its parameter's device)."""
    for _ in range(steps):
        for p, q in zip(params, twin_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.to(q.device, copy=True)
        opt.step()
        twin.step()


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


def _out_of_range(column, hi, value):
    """The whole error for ``value`` outside a column's range [0, hi] (the state of parameter 0
    holds the statistics, one row for scope="group")."""
    return (rf"^probe_stats of parameter 0 \(param group 0\): the {column} column must lie in "
            rf"{re.escape(str([0.0, hi]))}, got {re.escape(str([value]))}$")


def _refused_cases():
    from sadam import _layout as L
    inf = float("inf")
    return dict(REFUSED, **{
        "rho -1": (_stats_col(L.rho_col, -1.0), _out_of_range("rho", 1.0, -1.0)),
        "rho 5": (_stats_col(L.rho_col, 5.0), _out_of_range("rho", 1.0, 5.0)),
        "applied rho 2": (_stats_col(L.rho_applied_col, 2.0),
                          _out_of_range("applied rho", 1.0, 2.0)),
        "applied gamma 3": (_stats_col(L.gamma_applied_col, 3.0),
                            _out_of_range("applied gamma", 1.0, 3.0)),
        # gamma = exp(-damping * rho) with damping, rho >= 0 never exceeds 1
        "applied gamma 1.5": (_stats_col(L.gamma_applied_col, 1.5),
                              _out_of_range("applied gamma", 1.0, 1.5)),
        "negative count": (_stats_col(L.count_col, -2.0), _out_of_range("count", inf, -2.0)),
        "negative epoch": (_stats_col(L.epoch_col, -1.0), _out_of_range("epoch", inf, -1.0)),
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


def _meta_like(params):
    """Meta-device parameters shaped like ``params`` (deferred initialisation: the model is
    built on the meta device and its checkpoint loaded before it is materialised)."""
    return [torch.nn.Parameter(torch.empty(p.shape, device="meta")) for p in params]


def _meta_twin(params, **kw):
    """An SAdam of meta-device parameters shaped like ``params``."""
    meta = _meta_like(params)
    return meta, SAdam(meta, lr=1e-2, backend="torch", **kw)


def test_a_state_dict_loads_onto_meta_parameters_like_adamw():
    """AdamW loads a checkpoint onto meta-device parameters (its moments become meta tensors of
    the same shapes); SAdam does too, checking the saved values where they are. A meta state
    dict, which has no values to check, loads as well."""
    params, opt = _stepped(amsgrad=True)
    sd = opt.state_dict()
    meta, loaded = _meta_twin(params, amsgrad=True)
    loaded.load_state_dict(sd)
    adamw = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params],
                              amsgrad=True)
    for p in adamw.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    adamw.step()
    adamw_meta = _meta_like(params)
    adamw_loaded = torch.optim.AdamW(adamw_meta, amsgrad=True)
    adamw_loaded.load_state_dict(adamw.state_dict())
    for p, q, a in zip(params, meta, adamw_meta):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            got, torch_got = loaded.state[q][key], adamw_loaded.state[a][key]
            assert (got.device, got.shape, got.dtype) == (torch_got.device, p.shape,
                                                          torch_got.dtype)
        assert set(loaded.state[q]) == set(opt.state[p])
    meta_sd = loaded.state_dict()
    meta_sd["state"][1]["step"] = torch.empty(1, dtype=torch.int64, device="meta")  # older form
    _, from_meta = _meta_twin(params, amsgrad=True)
    from_meta.load_state_dict(meta_sd)
    for state in from_meta.state.values():
        assert all(v.device.type == "meta" for v in state.values() if isinstance(v, torch.Tensor))
        assert (state["step"].shape, state["step"].dtype) == ((), torch.float32)
    assert from_meta.state[from_meta.param_groups[0]["params"][0]]["probe_stats"].dtype == \
        torch.float32


@pytest.mark.parametrize("key", ["step", "exp_avg", "exp_avg_sq", "probe_stats"])
def test_a_meta_value_is_refused_by_a_parameter_with_values(key):
    """A meta tensor has no values to give a real parameter's state (AdamW cannot copy out of
    it either): refused, naming the key, before anything changes."""
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0][key] = sd["state"][0][key].to("meta")
    snap = snapshot(opt, params)
    subject = "probe_stats" if key == "probe_stats" else f"state '{key}'"
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(sd)
    assert str(error.value) == (f"{subject} of parameter 0 (param group 0) is a meta tensor, "
                                "which holds no values for a parameter on cpu")
    assert_unchanged(opt, params, snap)


def test_a_broken_state_dict_is_refused_before_meta_parameters_take_it():
    """The checks read the saved values, not the meta copies: a negative second moment is still
    refused, and nothing is loaded."""
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_sq"][0, 0] = -1.0
    _, loaded = _meta_twin(params)
    with pytest.raises(ValueError, match="exp_avg_sq.*negative"):
        loaded.load_state_dict(sd)
    assert not loaded.state


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
    _step_both(opt, params, twin, twin_params)
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


def _assert_equal_nested(actual, expected):
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_equal_nested(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_equal_nested(a, e)
    else:
        assert actual == expected


def test_loaded_state_is_a_copy_of_the_state_dict_extra_keys_included():
    """The optimizer owns what it loads: stepping it, or changing its state in place, leaves the
    loaded state dict as it was, nested values of unknown per-parameter keys included, and those
    keys come back from ``state_dict()``. torch's AdamW copies nested containers but shares
    tensors of a matching dtype and device with the state dict; SAdam copies those too."""
    params, opt = _stepped(amsgrad=True)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["ema_of_grad_norm"] = torch.tensor([0.5, 0.25])
    sd["state"][1]["history"] = [1.0, [2.0, 3.0], {"best": 4.0}]
    saved = copy.deepcopy(sd)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = SAdam(twin_params, lr=1e-2, backend="torch", amsgrad=True)
    twin.load_state_dict(sd)
    _assert_equal_nested(twin.state_dict()["state"], saved["state"])  # extra keys kept as given
    for _ in range(2):
        for p in twin_params:
            p.grad = torch.randn_like(p)
        twin.step()
    twin.state[twin_params[0]]["ema_of_grad_norm"].mul_(2)
    history = twin.state[twin_params[1]]["history"]
    history[1].append(5.0)
    history[2]["best"] = 0.0
    history.append(6.0)
    _assert_equal_nested(sd, saved)


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


def test_rho_above_1_is_refused_for_the_gradient_probe_whatever_the_estimator():
    """``probe_estimator`` only concerns ``probe="loss"``: a gradient-probe rho is a normalized
    variance in [0, 1], also in a group that names the "directions" estimator."""
    from sadam import _layout as L
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SAdam(params, probes=3, probe_estimator="directions", backend="torch")
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0] = {"probe_stats": torch.zeros(1, L.row_width(3))}
    sd["state"][0]["probe_stats"][0, L.rho_col(3)] = 1.0
    opt.load_state_dict(sd)
    sd["state"][0]["probe_stats"][0, L.rho_col(3)] = 1.5
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=_out_of_range("rho", 1.0, 1.5)):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)


def test_state_created_by_distributed_checkpoint_loads_at_step_0():
    """torch.distributed.checkpoint creates a fresh optimizer's state (step 0, zero moments,
    fresh statistics) to save it: that state loads, and the optimizer then steps exactly like one
    that never saw a checkpoint."""
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    saved_model = _model()
    saved = get_optimizer_state_dict(saved_model,
                                     SAdam(saved_model.parameters(), lr=1e-2, backend="torch"))
    assert [float(s["step"]) for s in saved["state"].values()] == [0.0] * 4
    model, straight = _model(), _model()
    opt = SAdam(model.parameters(), lr=1e-2, backend="torch")
    set_optimizer_state_dict(model, opt, saved)
    assert [float(s["step"]) for s in opt.state.values()] == [0.0] * 4
    straight_opt = SAdam(straight.parameters(), lr=1e-2, backend="torch")
    _train(model, opt, 3, 0)
    _train(straight, straight_opt, 3, 0)
    for p, q in zip(model.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_loaded_step_is_fp32_under_a_float64_default_dtype():
    """The step count is a 0-d fp32 tensor, as in a fresh state, also when a number from an
    older checkpoint is loaded while torch's default dtype is float64."""
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    for state in sd["state"].values():
        state["step"] = float(state["step"])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        opt.load_state_dict(sd)
    finally:
        torch.set_default_dtype(default)
    for p in params:
        step = opt.state[p]["step"]
        assert step.dtype == torch.float32 and step.shape == () and float(step) == 3.0


def test_second_moments_with_exact_zeros_load_and_resume_identically():
    """Where a gradient was always zero, exp_avg_sq (and its max) is exactly 0, as in AdamW: a
    valid second moment, so the state loads and the run resumes bit-identically."""
    def grad(gen):
        g = torch.randn(4, 3, generator=gen)
        g[0] = 0.0
        return g

    torch.manual_seed(4)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = SAdam([p], lr=1e-2, amsgrad=True, backend="torch")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        p.grad = grad(gen)
        opt.step()
    assert not opt.state[p]["exp_avg_sq"][0].any() and not opt.state[p]["max_exp_avg_sq"][0].any()
    q = torch.nn.Parameter(p.detach().clone())
    twin = SAdam([q], lr=1e-2, amsgrad=True, backend="torch")
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(2):
        p.grad = grad(gen)
        q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert torch.equal(p, q)


def test_each_parameters_state_is_loaded_onto_that_parameters_device():
    """As in torch's AdamW, load_state_dict moves each saved tensor to the device of its
    parameter, extra per-parameter tensors included; the step too (SAdam keeps it on the
    parameter's device, as AdamW with ``capturable=True``). The meta device stands in for a
    second device; it holds the group's second parameter, since the statistics (in the state of
    the first) are range-checked by value."""
    params, opt = _stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["ema_of_grad_norm"] = torch.tensor([0.5, 0.25])
    mixed = [params[0].detach().clone().requires_grad_(),
             torch.nn.Parameter(torch.empty(params[1].shape, device="meta"))]
    loaded = SAdam(mixed, lr=1e-2, backend="torch")
    loaded.load_state_dict(sd)
    adamw = torch.optim.AdamW(mixed, lr=1e-2, capturable=True)
    adamw.load_state_dict({"state": {k: {n: v for n, v in s.items() if n != "probe_stats"}
                                     for k, s in sd["state"].items()},
                           "param_groups": adamw.state_dict()["param_groups"]})
    for p in mixed:
        assert set(loaded.state[p]) >= set(adamw.state[p])
        for name, value in loaded.state[p].items():
            assert value.device == p.device, name
            if name in adamw.state[p]:
                assert adamw.state[p][name].device == p.device, name
    assert "probe_stats" in loaded.state[mixed[0]] and "ema_of_grad_norm" in loaded.state[mixed[1]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpoint_loads_onto_cuda_parameters_and_resumes():
    """A checkpoint on CPU (saved there, or loaded with map_location="cpu") loaded into an
    optimizer of CUDA parameters puts every state tensor on the parameter's device: step,
    moments, probe statistics and extra tensors; the run then resumes as on CPU."""
    from spec_tolerance import assert_params_close
    params, opt = _stepped(amsgrad=True)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["ema_of_grad_norm"] = torch.tensor([0.5, 0.25])
    cuda_params = [p.detach().cuda().requires_grad_() for p in params]
    other = SAdam(cuda_params, lr=1e-2, amsgrad=True, backend="torch")
    other.load_state_dict(sd)
    for p in cuda_params:
        assert {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"} <= set(other.state[p])
        for name, value in other.state[p].items():
            assert value.device == p.device, name
    assert "probe_stats" in other.state[cuda_params[0]]
    assert "ema_of_grad_norm" in other.state[cuda_params[1]]
    _step_both(opt, params, other, cuda_params)
    for p, q in zip(params, cuda_params):
        assert_params_close(q.cpu(), p)


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
