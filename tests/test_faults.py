"""Fault and bad-input matrix: each input gets a clear error or a documented behaviour, and a
rejected step or load leaves parameters and state exactly as they were."""
import copy

import pytest
import torch

import _backends
from _unchanged import assert_unchanged, snapshot
import sadam
from sadam import _layout as L
from spec_tolerance import assert_params_close, assert_rho_close

BACKENDS = _backends.params()


def _params(dtypes=(torch.float32,) * 3, device="cpu"):
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    return [torch.nn.Parameter(torch.randn(s).to(device=device, dtype=d))
            for s, d in zip(shapes, dtypes)]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype) for p in params]


def _cpu(tensors):
    return [t.detach().cpu() for t in tensors]


def _run(opt, params, steps, first_seed=0):
    for s in range(steps):
        for p, g in zip(params, _grads(params, first_seed + s)):
            p.grad = g
        opt.step()


# ----------------------------------------------------------------------------- non-finite grads
def _statistics_columns(width, probes=8):
    """Every column but the applied rho and gamma (those record each step, bad or not)."""
    applied = (L.rho_applied_col(probes), L.gamma_applied_col(probes))
    return [c for c in range(width) if c not in applied]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_grad_in_one_tensor_scope_tensor(backend, bad):
    """Like AdamW the poisoned tensor goes non-finite; its probe row keeps its statistics and the
    other tensors step exactly as if the bad value had never been there."""
    params, twin = _params(device=_backends.device_of(backend)), _params()
    opt = sadam.SAdam(params, lr=1e-2, scope="tensor", backend=backend)
    twin_opt = sadam.SAdam(twin, lr=1e-2, scope="tensor", backend="torch")
    _run(opt, params, 3)
    _run(twin_opt, twin, 3)
    stats_before = opt.state[params[0]]["probe_stats"].clone()
    grads = _grads(params, 99)
    for p, q, g in zip(params, twin, grads):
        p.grad, q.grad = g.clone(), g.cpu()
    params[1].grad[2] = bad
    opt.step()
    twin_opt.step()
    stats = opt.state[params[0]]["probe_stats"].cpu()
    stats_before = stats_before.cpu()
    assert not torch.isfinite(params[1]).all()  # as torch.optim.AdamW
    # the bad row was not folded in (only the applied-rho columns record this step)
    kept = _statistics_columns(stats.shape[1])
    assert torch.equal(stats[1, kept], stats_before[1, kept])
    assert stats[1, L.rho_applied_col(8)] == stats_before[1, L.rho_col(8)]
    twin_stats = twin_opt.state[twin[0]]["probe_stats"]
    for i in (0, 2):
        assert_params_close(params[i].cpu(), twin[i])
        assert_rho_close(opt.lgi()[0][i].cpu(), twin_opt.lgi()[0][i])
        assert_params_close(stats[i], twin_stats[i])
    assert torch.isfinite(stats).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("probe_lag", [0, 1])
def test_nonfinite_grad_scope_group_keeps_the_damping(backend, probe_lag):
    params = _params(device=_backends.device_of(backend))
    opt = sadam.SAdam(params, lr=1e-2, damping=2.0, probe_lag=probe_lag, backend=backend)
    _run(opt, params, 4)
    stats_before = opt.state[params[0]]["probe_stats"].clone()
    rho_before = stats_before[0, L.rho_col(8)]  # the current estimate
    for p, g in zip(params, _grads(params, 50)):
        p.grad = g
    params[0].grad[0, 0] = float("nan")
    opt.step()
    stats = opt.state[params[0]]["probe_stats"]
    assert torch.isfinite(stats).all()
    kept = _statistics_columns(stats.shape[1])
    assert torch.equal(stats[0, kept], stats_before[0, kept])  # a, b, count, epoch, rho, scale
    assert torch.equal(opt.lgi()[0], rho_before)  # this step applied the pre-NaN rho
    assert torch.isfinite(params[1]).all() and torch.isfinite(params[2]).all()


# ------------------------------------------------------------------------ missing / new grads
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_untouched_and_get_no_moments(backend):
    params = _params(device=_backends.device_of(backend))
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = sadam.SAdam(params, lr=1e-2, damping=0.0, backend=backend)
    adamw = torch.optim.AdamW([ref[0], ref[2]], lr=1e-2)
    frozen = params[1].detach().clone()
    for s in range(3):
        grads = _grads(params, s)
        params[0].grad, params[2].grad = grads[0], grads[2]
        ref[0].grad, ref[2].grad = grads[0].clone(), grads[2].clone()
        opt.step()
        adamw.step()
    assert torch.equal(params[1], frozen)
    assert "exp_avg" not in opt.state[params[1]]
    assert_params_close(params[0], ref[0])
    assert_params_close(params[2], ref[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_reallocated_between_steps_equal_grads_reused(backend):
    """Backends must not cache gradient addresses across steps."""
    device = _backends.device_of(backend)
    a, b = _params(device=device), _params(device=device)
    opt_a = sadam.SAdam(a, lr=1e-2, backend=backend)
    opt_b = sadam.SAdam(b, lr=1e-2, backend=backend)
    for p in b:
        p.grad = torch.zeros_like(p)
    for s in range(4):
        for p, q, g in zip(a, b, _grads(a, s)):
            p.grad = g.clone()  # a fresh tensor every step
            q.grad.copy_(g)  # the same storage every step
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert torch.equal(opt_a.lgi()[0], opt_b.lgi()[0])


# ----------------------------------------------------------------- params changing dtype/device
def test_module_converted_to_unsupported_dtype_is_rejected_unchanged():
    model = torch.nn.Linear(3, 2)
    opt = sadam.SAdam(model.parameters(), backend="torch")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    snap = snapshot(opt, list(model.parameters()))
    with pytest.raises(ValueError, match=r"\(param 0 of group 0 is torch\.float64\)$"):
        opt.step()
    assert_unchanged(opt, list(model.parameters()), snap)


def test_module_converted_to_bf16_keeps_fp32_moments():
    """A supported dtype change is fine: the moments keep their dtype (state_dtype)."""
    model = torch.nn.Linear(3, 2)
    opt = sadam.SAdam(model.parameters(), lr=0.1, backend="torch")
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.bfloat16()
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 3, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    for p, old in zip(model.parameters(), before):
        assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
        assert not torch.equal(p, old)


def test_params_moved_to_another_device_are_rejected_unchanged():
    """The meta device stands in for a GPU: state left on the old device is a clear error, not
    a half-applied step."""
    params = _params()
    opt = sadam.SAdam(params, lr=1e-2, backend="torch")
    _run(opt, params, 2)
    kept = [p.detach().clone() for p in params[1:]]
    snap_state = copy.deepcopy(opt.state_dict())
    # the Parameter object stays, its data moves (as module.to("cuda") does)
    torch.utils.swap_tensors(params[0], torch.nn.Parameter(params[0].detach().to("meta")))
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="moved or resized"):
        opt.step()
    assert all(torch.equal(p, k) for p, k in zip(params[1:], kept))
    for key, values in snap_state["state"].items():
        for name, value in values.items():
            assert torch.equal(opt.state_dict()["state"][key][name], value)


def test_a_parameter_resized_after_its_state_was_made_is_named_in_full_unchanged():
    """Same device, another shape (a module's weight replaced by a larger one): the state no
    longer fits, and nothing is stepped."""
    params = _params()
    opt = sadam.SAdam(params, lr=1e-2, backend="torch")
    _run(opt, params, 2)
    shape = tuple(params[0].shape)
    torch.utils.swap_tensors(params[0], torch.nn.Parameter(torch.zeros(shape[0] + 1, *shape[1:])))
    kept = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError) as error:
        opt.step()
    assert str(error.value) == (
        f"state 'exp_avg' of param 0 of group 0 is a {shape} tensor on cpu, the parameter a "
        f"{(shape[0] + 1, *shape[1:])} one on cpu: the parameter was moved or resized after the "
        "optimizer state was created. Move the state with "
        "optimizer.load_state_dict(optimizer.state_dict()), or build a new optimizer")
    assert all(torch.equal(p, k) for p, k in zip(params, kept))


def test_state_with_a_non_tensor_entry_first_is_still_checked_after_a_move():
    """Extra state entries are kept on load, in their saved order; a non-tensor one before the
    moments must not end the check of the tensors after it."""
    params = _params()
    opt = sadam.SAdam(params, lr=1e-2, backend="torch")
    _run(opt, params, 2)
    sd = opt.state_dict()
    sd["state"][0] = {"note": "saved first", **sd["state"][0]}
    opt.load_state_dict(sd)
    assert next(iter(opt.state[params[0]])) == "note"
    torch.utils.swap_tensors(params[0], torch.nn.Parameter(params[0].detach().to("meta")))
    for p in params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError,
                       match="state 'step' of param 0 of group 0 .* moved or resized"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move to")
def test_module_moved_to_cuda_needs_the_state_moved_too():
    model = torch.nn.Linear(3, 2)
    opt = sadam.SAdam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.cuda()
    model(torch.randn(4, 3, device="cuda")).sum().backward()
    with pytest.raises(RuntimeError, match="moved or resized"):
        opt.step()
    opt.load_state_dict(opt.state_dict())  # re-homes the state on the params' device
    opt.step()
    assert all(float(s["step"]) == 2 for s in opt.state.values())


# ------------------------------------------------------------------------------- mixed dtypes
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_group_step_in_fp32_and_round_once(backend):
    """One step with damping=0 is AdamW in fp32 on upcast copies, rounded to each dtype."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    params = _params(dtypes, device=_backends.device_of(backend))
    opt = sadam.SAdam(params, lr=1e-2, damping=0.0, backend=backend)
    ref = [p.detach().float().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(ref, lr=1e-2)
    for p, q, g in zip(params, ref, _grads(params, 0)):
        p.grad, q.grad = g, g.float()
    opt.step()
    adamw.step()
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
    for p, q in zip(params, ref):
        if p.dtype == torch.float32:
            assert_params_close(p, q)
        else:  # within one ulp of the rounded fp32 result
            torch.testing.assert_close(p.float(), q.to(p.dtype).float(), rtol=ulp[p.dtype], atol=0)
        assert opt.state[p]["exp_avg"].dtype == torch.float32


# ------------------------------------------------------------------------------- state_dicts
def _trained():
    params = _params()
    opt = sadam.SAdam(params, lr=1e-2, scope="tensor", backend="torch")
    _run(opt, params, 3)
    return params, opt


def _corrupt(mutate):
    params, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    return params, opt, sd


def _where(key):
    """How a load error names parameter ``key`` of the one param group."""
    return rf"parameter {key} \(param group 0\)"


# (corruption, regex of the error): the regexes anchored with ^...$ pin the whole message
BAD_STATE_DICTS = {
    "extra parameter state": (lambda sd: sd["state"].__setitem__(7, {}), "no param group lists"),
    "moment of another shape": (
        lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3, 4)), "shape"),
    "exp_avg_sq of another shape": (
        lambda sd: sd["state"][1].__setitem__("exp_avg_sq", torch.zeros(4)), "exp_avg_sq"),
    "max_exp_avg_sq of another shape": (
        lambda sd: sd["state"][2].__setitem__("max_exp_avg_sq", torch.zeros(8)),
        "max_exp_avg_sq"),
    "exp_avg of an integer dtype": (
        lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].long()),
        rf"^state 'exp_avg' of {_where(0)} must be a floating-point tensor, got torch\.int64$"),
    "exp_avg not a tensor": (
        lambda sd: sd["state"][1].__setitem__("exp_avg", [0.0] * 5),
        rf"^state 'exp_avg' of {_where(1)} must be a floating-point tensor, got list$"),
    "negative exp_avg_sq": (
        lambda sd: sd["state"][2]["exp_avg_sq"].__setitem__((0, 1, 0), -1e-30),
        rf"^state 'exp_avg_sq' of {_where(2)} holds negative values \(a second moment is "
        r">= 0\)$"),
    "moment missing": (
        lambda sd: sd["state"][1].pop("exp_avg_sq"),
        rf"^state of {_where(1)} has \['step', 'exp_avg'\] but lacks \['exp_avg_sq'\]$"),
    "param group missing": (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])),
                            "param groups"),
    "parameter missing from group": (lambda sd: sd["param_groups"][0]["params"].pop(),
                                     "parameters"),
    "probe_stats of another shape": (
        lambda sd: sd["state"][0].__setitem__("probe_stats", torch.zeros(1, 21)), "probe_stats"),
    "probe_stats of an integer dtype": (
        lambda sd: sd["state"][0].__setitem__("probe_stats", sd["state"][0]["probe_stats"].long()),
        rf"^probe_stats of {_where(0)} must be a floating-point tensor, got torch\.int64$"),
    "probe_stats not a tensor": (
        lambda sd: sd["state"][0].__setitem__("probe_stats", [0.0] * 22),
        rf"^probe_stats of {_where(0)} must be a floating-point tensor, got list$"),
    "probe_stats with NaN": (
        lambda sd: sd["state"][0]["probe_stats"].__setitem__((1, 0), float("nan")), "non-finite"),
    "probe_stats with Inf": (
        lambda sd: sd["state"][0]["probe_stats"].__setitem__((0, 2), float("inf")), "non-finite"),
    "invalid hyperparameter": (lambda sd: sd["param_groups"][0].__setitem__("probes", 0),
                               "probes"),
    "step not a tensor": (
        lambda sd: sd["state"][2].__setitem__("step", [3]),
        rf"^state 'step' of {_where(2)} must be a number or a one-element tensor, got \[3\]$"),
    # torch's AdamW loads a bool step and then fails at its next step; refused at load here
    "step a bool tensor": (
        lambda sd: sd["state"][2].__setitem__("step", torch.tensor(True)),
        rf"^state 'step' of {_where(2)} must be a number or a one-element real tensor, got a "
        r"torch\.bool tensor of shape \(\)$"),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_bad_state_dict_is_rejected_and_nothing_changes(case):
    mutate, message = BAD_STATE_DICTS[case]
    params, opt, sd = _corrupt(mutate)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)


def test_state_dict_missing_a_parameter_state_starts_it_fresh():
    """As in torch: a parameter without saved state starts from zero moments and step 0."""
    params, opt, sd = _corrupt(lambda sd: sd["state"].pop(1))
    opt.load_state_dict(sd)
    assert params[1] not in opt.state
    _run(opt, params, 1)
    assert float(opt.state[params[1]]["step"]) == 1 and float(opt.state[params[0]]["step"]) == 4


def test_state_dict_of_another_backend_keeps_this_optimizers_backend():
    params, opt, sd = _corrupt(lambda sd: sd["param_groups"][0].__setitem__("backend", "cuda"))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["backend"] == "torch"
    _run(opt, params, 1)


@pytest.mark.parametrize("backend", _backends.kernel_params())
def test_checkpoint_of_the_reference_resumes_on_another_backend(backend):
    params, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    twin = [p.detach().to(_backends.device_of(backend)).requires_grad_() for p in params]
    other = sadam.SAdam(twin, lr=1e-2, scope="tensor", backend=backend)
    other.load_state_dict(sd)
    _run(opt, params, 3, first_seed=10)
    _run(other, twin, 3, first_seed=10)
    for p, q in zip(params, twin):
        assert_params_close(q.cpu(), p)
    assert_rho_close(other.lgi()[0].cpu(), opt.lgi()[0])


# --------------------------------------------------------------------- bad inputs at step time
def test_sparse_gradient_is_rejected_before_any_change():
    params, opt = _trained()
    for p in params:
        p.grad = torch.ones_like(p)
    snap = snapshot(opt, params)
    params[2].grad = torch.ones_like(params[2]).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_tensor_hyperparameters_on_the_params_device_work_like_floats():
    a, b = _params(), _params()
    opt_a = sadam.SAdam(a, lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)),
                        weight_decay=torch.tensor(0.1), damping=torch.tensor(1.5),
                        backend="torch")
    opt_b = sadam.SAdam(b, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, damping=1.5,
                        backend="torch")
    _run(opt_a, a, 3)
    _run(opt_b, b, 3)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
@pytest.mark.parametrize("lr_device", ["cpu", "cuda"])
def test_lr_tensor_on_another_device_than_the_params(lr_device):
    """Documented: a Tensor hyperparameter on another device is copied to the params' device on
    each step (correct, with a copy per step; keep it on the params' device)."""
    param_device = "cuda" if lr_device == "cpu" else "cpu"
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, device=param_device))
    q = torch.nn.Parameter(p.detach().clone())
    opt = sadam.SAdam([p], lr=torch.tensor(1e-2, device=lr_device))
    ref = sadam.SAdam([q], lr=1e-2, backend=opt.param_groups[0]["backend"])
    for _ in range(2):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        opt.step()
        ref.step()
    torch.testing.assert_close(p, q)
