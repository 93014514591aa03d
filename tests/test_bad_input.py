"""Bad input: clear errors naming the argument, and nothing modified by a rejected step."""
import copy

import pytest
import torch

from _unchanged import assert_unchanged, snapshot
from sadam import BackendUnavailable, SAdam


INVALID = [
    ("lr", -1.0), ("lr", float("nan")), ("lr", torch.tensor([1e-3, 1e-3])), ("lr", "fast"),
    ("betas", (0.9,)), ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("eps", -1e-8),
    ("weight_decay", -0.1), ("damping", -1.0), ("probes", 0), ("probes", 33), ("probes", 2.5),
    ("probe", "hessian"), ("probe_beta", 1.0), ("scope", "layer"), ("probe_lag", 2),
    ("probe_window", 1), ("probe_window", 0), ("probe_delta", 0.0), ("probe_every", 0),
    ("probe_estimator", "median"), ("state_dtype", torch.float16), ("seed", -1),
    ("seed", 2 ** 32), ("amsgrad", 1), ("maximize", "yes"), ("backend", "jax"),
    ("capturable", None), ("probe_rng", "sometimes"), ("probe_rng", True),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_hyperparameter_names_the_argument(name, value):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SAdam([torch.nn.Parameter(torch.zeros(2))], **{name: value})


GROUPS = ("('gradient', 'loss', 'off')", "('group', 'tensor')", "('symmetric', 'directions')")
EXACT_MESSAGES = [  # the documented form: "<argument> <requirement>, got <value>"
    (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "Tensor lr must be 1-element, got shape (2,)"),
    (dict(lr=torch.tensor(1.0, dtype=torch.complex64)),
     "lr as a Tensor must be real, got torch.complex64"),
    (dict(lr="fast"), "lr must be a real number or a one-element Tensor, got 'fast'"),
    (dict(betas=(0.9,)), "betas must be a pair, got (0.9,)"),
    (dict(betas=0.9), "betas must be a pair, got 0.9"),
    (dict(betas=("fast", 0.9)), "betas[0] must be a real number or a one-element Tensor, got 'fast'"),
    (dict(betas=(1.0, 0.999)), "betas[0] must be in [0, 1), got 1.0"),
    (dict(betas=(0.9, -0.1)), "betas[1] must be in [0, 1), got -0.1"),
    (dict(eps=-1e-8), "eps must be >= 0, got -1e-08"),
    (dict(eps="tiny"), "eps must be a real number or a one-element Tensor, got 'tiny'"),
    (dict(weight_decay=[0.1]),
     "weight_decay must be a real number or a one-element Tensor, got [0.1]"),
    (dict(eps=torch.tensor(0.5)), "eps must be a float, got tensor(0.5000)"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(damping=float("inf")), "damping must be a finite number >= 0, got inf"),
    (dict(damping="strong"),
     "damping must be a real number or a one-element Tensor, got 'strong'"),
    (dict(probe_beta=None), "probe_beta must be a real number or a one-element Tensor, got None"),
    (dict(probe_delta="small"),
     "probe_delta must be a real number or a one-element Tensor, got 'small'"),
    (dict(probes=0), "probes must be an integer in [1, 32], got 0"),
    (dict(probe="hessian"), f"probe must be one of {GROUPS[0]}, got 'hessian'"),
    (dict(probe_beta=1.0), "probe_beta must be a float in [0, 1), got 1.0"),
    (dict(scope="layer"), f"scope must be one of {GROUPS[1]}, got 'layer'"),
    (dict(probe_lag=2), "probe_lag must be an integer in [0, 1], got 2"),
    (dict(probe_window=1), "probe_window must be an integer >= 2, got 1"),
    (dict(probe_delta=0.0), "probe_delta must be a finite number > 0, got 0.0"),
    (dict(probe_every=0), "probe_every must be an integer >= 1, got 0"),
    (dict(probe_estimator="median"),
     f"probe_estimator must be one of {GROUPS[2]}, got 'median'"),
    (dict(probe_rng="sometimes"),
     "probe_rng must be one of (None, 'replay', 'fresh'), got 'sometimes'"),
    (dict(probe="loss", scope="tensor"),
     "scope must be 'group' with probe='loss' (the loss probe measures one rho for the model), "
     "got 'tensor'"),
    (dict(probe="loss", probe_estimator="directions", probes=1),
     "probes must be an integer in [2, 32], got 1"),
    (dict(state_dtype=torch.float16),
     "state_dtype must be one of (torch.float32, torch.bfloat16), got torch.float16"),
    (dict(seed=2 ** 32), "seed must be an integer in [0, 4294967295], got 4294967296"),
    (dict(amsgrad=1), "amsgrad must be a bool, got 1"),
    (dict(maximize="yes"), "maximize must be a bool, got 'yes'"),
    (dict(capturable=None), "capturable must be a bool, got None"),
    (dict(backend="jax"),
     "backend must be one of ('auto', 'torch', 'triton', 'cuda', 'cpu'), got 'jax'"),
]


@pytest.mark.parametrize("kwargs,message", EXACT_MESSAGES,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items())
                              for kw, _ in EXACT_MESSAGES])
def test_invalid_hyperparameter_message_is_exact(kwargs, message):
    with pytest.raises(ValueError) as error:
        SAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert str(error.value) == message


def test_invalid_parameters_and_loss_groups_messages_are_exact():
    def message(*args, **kwargs):
        with pytest.raises(ValueError) as error:
            SAdam(*args, **kwargs)
        return str(error.value)

    ok = torch.nn.Parameter(torch.zeros(1))
    assert message([ok, torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]) == (
        "SAdam does not support complex parameters (param 1 of group 0); optimize "
        "torch.view_as_real(p) as a real parameter instead")
    assert message([ok, torch.zeros(3, dtype=torch.float64, requires_grad=True)]) == (
        "SAdam supports parameters of dtype (torch.float32, torch.bfloat16, torch.float16) "
        "(param 1 of group 0 is torch.float64)")
    assert message([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                    {"params": [ok], "probe_delta": 0.5}], probe="loss") == (
        "probe_delta must be the same in every param group with probe='loss' (they are probed "
        "together), got 0.01 and 0.5")


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, damping=0.0, probe_beta=0.0,
         probes=1, seed=0, probe_window=2),
    dict(probes=32, seed=2 ** 32 - 1, probe_lag=0),
    dict(probe="loss", probes=1, probe_every=1),
], ids=["lower", "upper", "loss-lower"])
def test_the_closed_ends_of_every_range_are_accepted(kwargs):
    """Each range's closed end is a setting like any other (AdamW takes lr=0, betas=(0, 0) and
    eps=0): construction and a step succeed, with a finite result."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = SAdam([p], backend="torch", **kwargs)
    p.grad = torch.ones(3)
    opt.step((lambda: p.sum()) if kwargs.get("probe") == "loss" else None)
    assert torch.isfinite(p).all() and float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("bad_grad,message", [
    (torch.zeros(4), "gradient of param 0 of group 0 has shape (4,), the parameter (3,)"),
    (torch.zeros(3, dtype=torch.int64),
     "gradient of param 0 of group 0 must be real floating point, got torch.int64"),
    (torch.zeros(3, dtype=torch.complex64),
     "gradient of param 0 of group 0 must be real floating point, got torch.complex64"),
    pytest.param("cuda", "gradient of param 0 of group 0 is on cuda:0, the parameter on cpu",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                          reason="needs a CUDA device for the gradient")),
], ids=["shape", "integer", "complex", "device"])
def test_a_gradient_that_does_not_fit_is_named_before_anything_changes(bad_grad, message):
    p = torch.nn.Parameter(torch.randn(3))
    opt = SAdam([p], backend="torch")
    p.grad = torch.zeros(3)
    if isinstance(bad_grad, str):  # a device: the gradient lives there
        bad_grad = torch.zeros(3, device="cuda")
    p.grad.data = bad_grad  # what autograd would never produce, a buggy hook might
    snap = snapshot(opt, [p])
    with pytest.raises(RuntimeError) as error:
        opt.step()
    assert str(error.value) == message
    assert_unchanged(opt, [p], snap)


def test_a_0d_tensor_lr_is_kept_as_given_like_adamw():
    """A 0-d tensor lr is the group's lr itself (a scheduler may hold and fill it), as in
    torch's AdamW."""
    lr = torch.tensor(1e-3)
    for cls in (SAdam, torch.optim.AdamW):
        opt = cls([torch.nn.Parameter(torch.zeros(2))], lr=lr)
        assert opt.param_groups[0]["lr"] is lr


def test_invalid_hyperparameter_in_a_param_group():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = SAdam([p])
    with pytest.raises(ValueError, match="damping"):
        opt.add_param_group({"params": [q], "damping": -2.0})
    assert len(opt.param_groups) == 1


def test_loss_probe_constraints():
    with pytest.raises(ValueError, match="scope"):
        SAdam([torch.nn.Parameter(torch.zeros(2))], probe="loss", scope="tensor")
    with pytest.raises(ValueError, match="probes"):
        SAdam([torch.nn.Parameter(torch.zeros(2))], probe="loss", probe_estimator="directions",
              probes=1)
    with pytest.raises(ValueError, match="probe_delta"):
        SAdam([{"params": [torch.nn.Parameter(torch.zeros(2))]},
               {"params": [torch.nn.Parameter(torch.zeros(2))], "probe_delta": 0.5}],
              probe="loss")


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match="complex"):
        SAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


def test_sparse_gradient_is_rejected_before_anything_changes():
    dense = torch.nn.Parameter(torch.randn(4))
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = SAdam([dense, emb.weight], backend="torch")
    dense.grad = torch.ones(4)
    emb(torch.tensor([1, 2])).sum().backward()
    params = [dense, emb.weight]
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_nan_gradient_behaves_like_adamw_and_spares_the_damping():
    """Documented: a non-finite gradient makes that tensor's update non-finite (as in AdamW),
    while the probe statistics skip the non-finite sample, so other tensors' damping and every
    later step stay finite."""
    torch.manual_seed(0)
    good, bad = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    opt = SAdam([good, bad], backend="torch", probe_lag=0)
    for _ in range(3):
        good.grad, bad.grad = torch.randn(8), torch.randn(8)
        opt.step()
    rho_before = opt.lgi()[0].clone()
    good.grad, bad.grad = torch.randn(8), torch.full((8,), float("nan"))
    opt.step()
    assert torch.isfinite(good).all() and torch.isnan(bad).all()
    assert torch.equal(opt.lgi()[0], rho_before)  # the NaN sample did not enter the statistics
    good.grad = torch.randn(8)
    bad.grad = None
    opt.step()
    assert torch.isfinite(good).all() and torch.isfinite(opt.lgi()[0])


def test_found_inf_changes_nothing_at_all():
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = SAdam(params, backend="torch", amsgrad=True)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    snap = snapshot(opt, params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e4
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    assert_unchanged(opt, params, snap)


def test_grad_scale_divides_the_gradient():
    torch.manual_seed(2)
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    b.data.copy_(a.data)
    oa, ob = SAdam([a], backend="torch"), SAdam([b], backend="torch")
    for _ in range(5):
        g = torch.randn(6)
        a.grad, b.grad = g, g * 512
        ob.grad_scale, ob.found_inf = torch.tensor(512.0), torch.tensor(0.0)
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(oa.lgi()[0], ob.lgi()[0], rtol=1e-5, atol=1e-6)


def test_state_dict_of_another_layout_is_rejected_and_nothing_changes():
    src = SAdam([torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(3))],
                backend="torch")
    for p in src.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    src.step()
    sd = src.state_dict()

    params = [torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(5))]
    opt = SAdam(params, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)

    fewer = SAdam([params[0]], backend="torch")
    with pytest.raises(ValueError, match="parameters"):
        fewer.load_state_dict(sd)
    two_groups = SAdam([{"params": [params[0]]}, {"params": [params[1]]}], backend="torch")
    with pytest.raises(ValueError, match="param groups"):
        two_groups.load_state_dict(sd)


def test_corrupted_probe_state_is_rejected():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SAdam(params, backend="torch")
    params[0].grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["probe_stats"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="probe_stats"):
        opt.load_state_dict(sd)
    sd["state"][0]["probe_stats"] = torch.zeros(2, 7)
    with pytest.raises(ValueError, match="probe_stats"):
        opt.load_state_dict(sd)


def test_unknown_backend_names_and_unavailable_backends_say_why():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(BackendUnavailable, match="cuda.*cpu"):
        opt = SAdam([p], backend="cuda")
        p.grad = torch.ones(2)
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(2))


def test_auto_picks_the_first_available_backend_in_order():
    from sadam import backends

    available = backends.available_backends("cpu")
    assert "torch" in available
    expected = "cpu" if "cpu" in available else "torch"
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu) is backends.resolve(expected, cpu)


# ------------------------------------------------------------ non-finite damping and probe_delta
NON_FINITE = [float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("name", ["damping", "probe_delta"])
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["float", "tensor"])
def test_non_finite_damping_or_probe_delta_names_the_argument(name, value, as_tensor):
    value = torch.tensor(value) if as_tensor else value
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SAdam([torch.nn.Parameter(torch.zeros(2))], **{name: value})


@pytest.mark.parametrize("name", ["damping", "probe_delta"])
def test_non_finite_damping_or_probe_delta_in_a_state_dict_is_refused(name):
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SAdam(params, backend="torch")
    params[0].grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0][name] = float("inf")
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)
    assert opt.param_groups[0][name] != float("inf")


# ------------------------------------------------------------------------- half-applied steps
def test_unavailable_backend_of_a_later_group_fails_at_construction():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(BackendUnavailable, match="backend='cuda'"):
        SAdam([{"params": [a]}, {"params": [b], "backend": "cuda"}])
    opt = SAdam([a])
    with pytest.raises(BackendUnavailable, match="backend='cuda'"):
        opt.add_param_group({"params": [b], "backend": "cuda"})
    assert len(opt.param_groups) == 1  # the rejected group was not kept


def _cpu_kernel_or_skip():
    from sadam import backends
    if "cpu" not in backends.available_backends("cpu"):
        pytest.skip("sadam._C (the cpu backend) is not built")


@pytest.mark.parametrize("backend,moved", [("cpu", 0), ("cpu", 1), ("auto", 1)])
def test_a_group_that_cannot_step_is_found_before_any_group_steps(backend, moved):
    """A parameter moved after construction, before it has state (``module.to()`` swaps the
    tensors; here to the meta device): its group cannot run on its backend, and the first
    group must not be updated either."""
    _cpu_kernel_or_skip()
    torch.manual_seed(0)
    first = torch.nn.Parameter(torch.randn(4))
    second = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(5))]
    opt = SAdam([{"params": [first]}, {"params": second, "backend": backend}])
    torch.utils.swap_tensors(second[moved], torch.nn.Parameter(second[moved].to("meta")))
    for p in [first] + second:
        p.grad = torch.ones_like(p)
    before = first.detach().clone()
    with pytest.raises((ValueError, BackendUnavailable), match="meta"):
        opt.step()
    assert torch.equal(first.detach(), before) and not opt.state


@pytest.mark.parametrize("lr, grad", [(1e-3, 1.0), (0.0, 0.0)], ids=["training", "zero-lr-and-grads"])
def test_tensor_hyperparameter_reshaped_after_construction_is_found_before_any_step(lr, grad):
    """Also on a first step with zero gradients and lr 0 (the form of the state-creating step
    of torch.distributed.checkpoint), where reading lr as a number would fail first."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = SAdam([{"params": [a]}, {"params": [b]}], lr=lr, backend="torch")
    opt.param_groups[1]["lr"] = torch.tensor([lr, lr])
    a.grad, b.grad = torch.full((2,), grad), torch.full((2,), grad)
    with pytest.raises(ValueError, match=r"\blr\b.*param group 1"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2)) and not opt.state


# ----------------------------------------------- one-element tensor hyperparameters of any shape
ONE_ELEMENT = {
    "lr": dict(lr=torch.tensor([[1e-2]])),
    "betas-(1,)": dict(betas=(torch.tensor([0.8]), torch.tensor([0.99]))),
    "betas-(1,1,1)": dict(betas=(torch.tensor([[[0.8]]]), 0.99)),
    "weight_decay": dict(weight_decay=torch.tensor([0.1])),
    "damping": dict(damping=torch.tensor([[2.0]])),
}
SCALAR = {
    "lr": dict(lr=torch.tensor(1e-2)),
    "betas-(1,)": dict(betas=(torch.tensor(0.8), torch.tensor(0.99))),
    "betas-(1,1,1)": dict(betas=(torch.tensor(0.8), 0.99)),
    "weight_decay": dict(weight_decay=torch.tensor(0.1)),
    "damping": dict(damping=torch.tensor(2.0)),
}


def _backends_here():
    from sadam import backends
    return [b for b in ("torch", "cpu") if b in backends.available_backends("cpu")]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", list(ONE_ELEMENT))
def test_one_element_tensor_hyperparameters_act_as_their_scalar(case, backend):
    if backend not in _backends_here():
        pytest.skip(f"backend {backend!r} is not available here")
    results = []
    for hyper in (ONE_ELEMENT[case], SCALAR[case]):
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        opt = SAdam(params, backend=backend, **copy.deepcopy(hyper))
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append(([p.detach().clone() for p in params], opt.lgi()[0]))
    (ps, rho), (qs, rho_q) = results
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    assert torch.equal(rho, rho_q)


def test_one_element_lr_still_follows_a_scheduler_that_fills_it():
    """The 0-d form is a view of the tensor the user passed: an in-place update reaches it."""
    lr = torch.tensor([[1e-2]])
    opt = SAdam([torch.nn.Parameter(torch.zeros(2))], lr=lr, backend="torch")
    lr.fill_(2.0 ** -8)
    assert float(opt.param_groups[0]["lr"]) == 2.0 ** -8 and opt.param_groups[0]["lr"].dim() == 0


def test_one_element_tensor_hyperparameters_in_a_state_dict_become_0d():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SAdam(params, lr=torch.tensor(1e-2), backend="torch")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = torch.tensor([1e-2])
    sd["param_groups"][0]["betas"] = (torch.tensor([[0.9]]), 0.999)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"].dim() == 0 and opt.param_groups[0]["betas"][0].dim() == 0
    params[0].grad = torch.ones(3)
    opt.step()
    assert torch.isfinite(params[0]).all()


# ------------------------------------------------------------------------------ empty groups
def test_empty_param_group_has_an_lgi_and_a_damping_factor():
    p = torch.nn.Parameter(torch.randn(3))
    opt = SAdam([{"params": [p]}, {"params": []}, {"params": [], "scope": "tensor"}],
                backend="torch")
    p.grad = torch.ones(3)
    opt.step()
    rho, gamma = opt.lgi(), opt.damping_factors()
    assert len(rho) == len(gamma) == 3
    assert rho[1].shape == () and float(rho[1]) == 0.0 and float(gamma[1]) == 1.0
    assert rho[2].shape == (0,) and gamma[2].shape == (0,)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # and it round-trips


# -------------------------------------------------------------------- flags: bool, int, tensor
@pytest.mark.parametrize("value", [True, False, 1.0, 0.0])
def test_probe_lag_must_be_an_int_as_amsgrad_must_be_a_bool(value):
    with pytest.raises(ValueError, match="probe_lag"):
        SAdam([torch.nn.Parameter(torch.zeros(2))], probe_lag=value)


def test_requires_grad_tensor_lr_raises_no_warning_as_in_adamw():
    import warnings

    p = torch.nn.Parameter(torch.randn(3))
    opt = SAdam([p], lr=torch.tensor(1e-3, requires_grad=True), backend="torch")
    p.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        opt.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_a_kernel_backend_names_a_group_on_two_devices_before_anything_changes():
    """The kernels take one device per group (the reference any mix, as AdamW)."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="cuda"))]
    opt = SAdam(params, backend="cpu")
    for p in params:
        p.grad = torch.ones_like(p)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError) as error:
        opt.step()
    assert str(error.value) == (
        "param group 0 has parameters on ['cpu', 'cuda:0']; backend 'cpu' runs one device per "
        "group: put each device's parameters in their own group, or use backend='torch'")
    assert_unchanged(opt, params, snap)


def test_a_step_resolves_no_backend(monkeypatch):
    """Backends are resolved when a group is added (a backend that cannot run fails there), so a
    step, compiled or not, never runs the resolution."""
    import sadam.backends
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    opt = SAdam(params, backend="torch")

    def refuse(*args):
        raise AssertionError(f"backend resolved during a step: {args}")
    monkeypatch.setattr(sadam.backends, "resolve", refuse)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 2.0]
