"""torch's generic optimizer checks, run against SAdam through an ``OptimizerInfo``.

pytorch's ``test/test_optim.py`` drives every optimizer of
``torch.testing._internal.common_optimizers.optim_db`` through the same test bodies; those bodies
are not in the torch wheel, so the ones that apply to SAdam are written again here, each looping
over every config of ``SADAM_INFO`` (AdamW's configs with ``damping=0`` and SAdam's own) on the
``torch`` and ``cpu`` backends. Where the outcome is numeric and the config is AdamW's update
(``damping=0`` or ``probe="off"``), ``torch.optim.AdamW(foreach=False)`` is the oracle.
"""
import copy
import functools
import pickle

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import OneCycleLR, StepLR
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo, OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs, get_error_inputs_for_all_optims,
    optim_inputs_func_adamw)

from sadam import SAdam, backends

RTOL = 1e-5  # spec section 6: params against the oracle, relative to their magnitude
BACKENDS = [b for b in ("torch", "cpu") if b in backends.available_backends("cpu")]


def optim_inputs_func_sadam(device, dtype=None):
    """AdamW's configs for ``device`` with ``damping=0`` (each has an AdamW twin), the tensor
    hyperparameters AdamW's CUDA configs use (they run on any device here), and SAdam's own."""
    adamw = [OptimizerInput(params=None, kwargs=dict(i.kwargs, damping=0.0), desc=i.desc)
             for i in optim_inputs_func_adamw(device, dtype)
             if not i.kwargs.get("capturable")]
    tensors = [
        OptimizerInput(params=None, kwargs=dict(lr=torch.tensor(1e-3), amsgrad=True,
                                                damping=0.0), desc="Tensor lr, amsgrad"),
        OptimizerInput(params=None, kwargs=dict(lr=torch.tensor(1e-3), damping=0.0,
                                                betas=(torch.tensor([[[0.9]]]),
                                                       torch.tensor([[0.99]]))),
                       desc="Tensor lr, one-element Tensor betas of shape (1,1,1) and (1,1)"),
    ]
    own = [
        OptimizerInput(params=None, kwargs={}, desc="S-Adam default (damping=1)"),
        OptimizerInput(params=None, kwargs=dict(probe="off", weight_decay=0.1),
                       desc="probe off"),
        OptimizerInput(params=None, kwargs=dict(damping=2.0, scope="tensor", probe_lag=0,
                                                probe_window=3, probes=5),
                       desc="tensor scope, lag 0, window"),
        OptimizerInput(params=None, kwargs=dict(damping=torch.tensor(0.5), amsgrad=True,
                                                maximize=True, state_dtype=torch.bfloat16),
                       desc="bf16 state, tensor damping, amsgrad, maximize"),
    ]
    return adamw + tensors + own


def optim_error_inputs_func_sadam(device, dtype):
    """torch's errors for every optimizer, plus SAdam's: each names the argument."""
    sample = Parameter(torch.randn(2, 2, device=device, dtype=dtype))

    def construction(kwargs, regex, desc, error=ValueError):
        return ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kwargs, desc=desc),
                                   error_type=error, error_regex=regex)

    sparse_grad = Parameter(torch.randn(3, device=device, dtype=dtype))
    sparse_grad.grad = torch.randn(3, device=device, dtype=dtype).to_sparse()
    return get_error_inputs_for_all_optims(device, dtype) + [
        construction(dict(betas=(1.0, 0.0)), r"betas\[0\]", "beta1 in [0, 1)"),
        construction(dict(weight_decay=-1), "weight_decay", "weight_decay >= 0"),
        construction(dict(damping=float("inf")), "damping", "finite damping"),
        construction(dict(probe_delta=float("nan")), "probe_delta", "finite probe_delta"),
        construction(dict(probe_lag=True), "probe_lag", "probe_lag an int"),
        construction(dict(amsgrad=1), "amsgrad", "amsgrad a bool"),
        ErrorOptimizerInput(OptimizerInput(params=[sample], kwargs=dict(backend="cuda"),
                                           desc="unavailable backend"),
                            error_type=backends.BackendUnavailable, error_regex="cuda"),
        ErrorOptimizerInput(OptimizerInput(params=[sparse_grad], kwargs={},
                                           desc="sparse gradient"),
                            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError,
                            error_regex="sparse"),
    ]


SADAM_INFO = OptimizerInfo(
    SAdam,
    optim_inputs_func=optim_inputs_func_sadam,
    optim_error_inputs_func=optim_error_inputs_func_sadam,
    scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=3)],),
    supported_impls=(),  # no foreach / fused / differentiable flags: every backend is fused
    not_og_supported_flags=(),
    has_capturable_arg=True,
    supports_complex=False,  # complex parameters are refused (optimize view_as_real(p))
    supports_fused_on=(),
)


def _configs():
    """(description, kwargs) of every config on every backend, as pytest params."""
    inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, SADAM_INFO)
    return [pytest.param(dict(i.kwargs, backend=b), id=f"{b}-{i.desc}")
            for i in inputs for b in BACKENDS]


CONFIGS = _configs()
# names do not interact with the hyperparameters: the named variants run on a few configs
NAMED = [(n0, n1) for n0 in (True, False) for n1 in (True, False)]
FEW = [c for c in CONFIGS if c.id.split("-", 1)[1] in ("default", "S-Adam default (damping=1)")]


def _fresh(kwargs):
    return copy.deepcopy(kwargs)  # tensor hyperparameters must not be shared between optimizers


def _adamw_twin(kwargs):
    """AdamW kwargs with the same update, or None where SAdam's damping changes it."""
    kwargs = _fresh(kwargs)
    damping = kwargs.pop("damping", 1.0)
    off = kwargs.pop("probe", "gradient") == "off"
    if not (off or float(damping) == 0.0) or kwargs.get("state_dtype", torch.float32) != \
            torch.float32:
        return None
    for key in ("backend", "scope", "probe_lag", "probe_window", "probes", "state_dtype"):
        kwargs.pop(key, None)
    if isinstance(kwargs.get("betas", (0.0,))[0], torch.Tensor):
        kwargs["betas"] = tuple(b.reshape(()) for b in kwargs["betas"])
    return dict(kwargs, foreach=False)


def _assert_close(actual, expected):
    scale = expected.detach().abs().max().clamp_min(1e-30)
    assert ((actual.detach() - expected.detach()).abs().max() / scale).item() <= RTOL


def _assert_equal_nested(a, b):
    """Equal state dicts: same keys, same non-tensor values, bitwise-equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for key in a:
            _assert_equal_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal_nested(x, y)
    else:
        assert a == b


def _without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


def _weight_bias(seed=0):
    torch.manual_seed(seed)
    return Parameter(torch.randn(2, 3)), Parameter(torch.randn(2)), torch.randn(3)


def _fwd_bwd(optim, w, b, x):
    optim.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


# --------------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("kwargs,named0,named1",
                         [pytest.param(c.values[0], False, False, id=c.id) for c in CONFIGS] +
                         [pytest.param(c.values[0], n0, n1, id=f"{c.id}-named{n0:d}{n1:d}")
                          for c in FEW for n0, n1 in NAMED if n0 or n1])
def test_state_dict_deterministic(kwargs, named0, named1):
    weight, bias, x = _weight_bias()
    optimizer = SAdam(_named([weight, bias], named0), **_fresh(kwargs))
    for _ in range(5):
        optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    optimizer_c = SAdam(_named([weight_c, bias_c], named1), **_fresh(kwargs))
    optimizer_c.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(5):
        optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
        optimizer_c.step(functools.partial(_fwd_bwd, optimizer_c, weight_c, bias_c, x))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    _assert_equal_nested(_without_param_names(optimizer.state_dict()),
                         _without_param_names(optimizer_c.state_dict()))
    # repeated parameters have one representation
    optimizer_c.param_groups.extend(optimizer_c.param_groups)
    _assert_equal_nested(_without_param_names(optimizer.state_dict())["param_groups"][-1],
                         _without_param_names(optimizer_c.state_dict())["param_groups"][-1])


@pytest.mark.parametrize("named0,named1", NAMED)
@pytest.mark.parametrize("kwargs", FEW)
def test_can_load_from_to_named_state_dict(kwargs, named0, named1):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2),
                                torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    x = torch.rand(1, 4, 16, 16)

    def fwd_bwd(optim):
        optim.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss

    optimizer = SAdam(model.named_parameters() if named0 else model.parameters(),
                      **_fresh(kwargs))
    for _ in range(3):
        optimizer.step(functools.partial(fwd_bwd, optimizer))
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer2 = SAdam(model.named_parameters() if named1 else model.parameters(),
                       **_fresh(kwargs))
    optimizer2.load_state_dict(saved)
    optimizer2.step(functools.partial(fwd_bwd, optimizer2))
    if named0 or named1:
        assert optimizer2.state_dict()["param_groups"][0]["param_names"] == [
            "0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_load_nontensor_step(kwargs):
    torch.manual_seed(2)
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    twins = [Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.rand_like(p)
        q.grad = p.grad.clone()
    optimizer, twin = SAdam(params, **_fresh(kwargs)), SAdam(twins, **_fresh(kwargs))
    for _ in range(3):
        optimizer.step()
        twin.step()
    state_dict = copy.deepcopy(optimizer.state_dict())
    for p_state in state_dict["state"].values():
        p_state["step"] = p_state["step"].item()
    optimizer.load_state_dict(state_dict)
    optimizer.step()
    twin.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)  # a float step resumes exactly like the tensor one


def _saved_and_fresh(cls, names=("weight", "bias"), **kwargs):
    """A state_dict of ``cls`` after one step, and a fresh ``cls`` on the same named params."""
    weight, bias, x = _weight_bias(4)
    optimizer = cls(list(zip(names, [weight, bias])), **kwargs)
    optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
    return copy.deepcopy(optimizer.state_dict()), cls(list(zip(("w", "b"), [weight, bias])),
                                                      **kwargs)


@pytest.mark.parametrize("cls", [SAdam, torch.optim.AdamW])
def test_loaded_groups_are_copies_and_keep_the_saved_names(cls):
    """As torch's optimizers: the loaded param groups are deep copies (an in-place change of a
    tensor lr, as schedulers make, does not reach the loaded dict) and keep the saved
    ``param_names`` over the loading optimizer's own."""
    saved, optimizer = _saved_and_fresh(cls, lr=torch.tensor(1e-2))
    optimizer.load_state_dict(saved)
    optimizer.param_groups[0]["lr"].fill_(5e-3)
    assert float(saved["param_groups"][0]["lr"]) == float(torch.tensor(1e-2))
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_older_checkpoints_load_with_this_versions_defaults():
    """A param group saved by an earlier version lacks newer options and may carry
    ``differentiable``: the options take this optimizer's defaults, ``differentiable`` is
    dropped, and the loaded group has exactly a fresh group's keys."""
    saved, optimizer = _saved_and_fresh(SAdam, probe_estimator="symmetric", probe_every=3)
    group = saved["param_groups"][0]
    for key in ("probe_estimator", "probe_every", "state_dtype", "probe_rng"):
        group.pop(key)
    group["differentiable"] = False
    fresh_keys = set(optimizer.param_groups[0])
    optimizer.load_state_dict(saved)
    loaded = optimizer.param_groups[0]
    assert set(loaded) == fresh_keys
    assert (loaded["probe_estimator"], loaded["probe_every"], loaded["state_dtype"],
            loaded["probe_rng"]) == ("symmetric", 3, torch.float32, None)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_deepcopy_and_pickle_step_like_the_original(kwargs):
    weight, bias, x = _weight_bias(3)
    optimizer = SAdam([weight, bias], **_fresh(kwargs))
    for _ in range(2):
        optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
    public = {k for k in optimizer.__dict__ if not k.startswith("_")}
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        assert {k for k in clone.__dict__ if not k.startswith("_")} == public
        _assert_equal_nested(clone.state_dict(), optimizer.state_dict())
        w, b = clone.param_groups[0]["params"]
        for _ in range(2):
            clone.step(functools.partial(_fwd_bwd, clone, w, b, x))
        reference = copy.deepcopy(optimizer)
        rw, rb = reference.param_groups[0]["params"]
        for _ in range(2):
            reference.step(functools.partial(_fwd_bwd, reference, rw, rb, x))
        assert torch.equal(w, rw) and torch.equal(b, rb)


# ------------------------------------------------------------------------------------- errors
def test_errors():
    for error_input in optim_error_inputs_func_sadam("cpu", torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    SAdam(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    SAdam(params, **kwargs)
        else:
            optimizer = SAdam(params, **kwargs)
            before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                optimizer.step()
            after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
            assert all(torch.equal(a, b) for a, b in zip(after, before))


# -------------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("kwargs", CONFIGS[:2] + CONFIGS[-2:])
def test_step_hooks_run_in_order(kwargs):
    weight, bias, x = _weight_bias()
    optimizer = SAdam([weight, bias], **_fresh(kwargs))
    calls = []
    global_pre = register_optimizer_step_pre_hook(
        lambda opt, args, kw: calls.append("global pre"))
    global_post = register_optimizer_step_post_hook(
        lambda opt, args, kw: calls.append("global post"))
    try:
        optimizer.register_step_pre_hook(lambda opt, args, kw: calls.append("pre"))
        optimizer.register_step_post_hook(lambda opt, args, kw: calls.append("post"))
        handle = optimizer.register_step_pre_hook(lambda opt, args, kw: calls.append("gone"))
        handle.remove()
        optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))
    finally:
        global_pre.remove()
        global_post.remove()
    assert calls == ["global pre", "pre", "post", "global post"]


@pytest.mark.parametrize("kwargs", CONFIGS[:2] + CONFIGS[-2:])
def test_state_dict_and_load_state_dict_hooks(kwargs):
    weight, bias, x = _weight_bias()
    optimizer = SAdam([weight, bias], **_fresh(kwargs))
    optimizer.step(functools.partial(_fwd_bwd, optimizer, weight, bias, x))

    def pre(opt):
        opt.state["marker"] = 1  # torch's test: the pre-hook may add state ...

    def post(opt, state_dict):
        state_dict["extra"] = state_dict["state"].pop("marker")  # ... the post-hook move it
        opt.state.pop("marker")
        return state_dict

    optimizer.register_state_dict_pre_hook(pre)
    optimizer.register_state_dict_post_hook(post)
    saved = optimizer.state_dict()
    assert saved["extra"] == 1 and "marker" not in optimizer.state

    seen = []

    def load_pre(opt, state_dict):
        assert opt is loaded  # as torch: the hook is given the optimizer
        seen.append(state_dict.pop("extra"))  # a pre-hook may rewrite what is loaded
        return state_dict

    def load_pre_first(opt, state_dict):
        seen.append("first")

    loaded = SAdam([Parameter(weight.detach().clone()), Parameter(bias.detach().clone())],
                   **_fresh(kwargs))
    loaded.register_load_state_dict_pre_hook(load_pre)
    loaded.register_load_state_dict_pre_hook(load_pre_first, prepend=True)
    loaded.register_load_state_dict_post_hook(lambda opt: seen.append(len(opt.state)))
    loaded.load_state_dict(saved)
    assert seen == ["first", 1, 2] and "extra" in saved  # the caller's dict is not modified


# -------------------------------------------------------- numeric outcomes against AdamW
NUMERIC = [c for c in CONFIGS if _adamw_twin(c.values[0]) is not None]


def _run_pair(kwargs, build_params, steps, schedulers=(), grads=None):
    """SAdam and its AdamW twin on the same parameters and gradients; returns both params."""
    results = []
    for cls, kw in ((SAdam, _fresh(kwargs)), (torch.optim.AdamW, _adamw_twin(kwargs))):
        params, groups = build_params(kw)
        optimizer = cls(groups, **kw)
        scheds = [make(optimizer) for make in schedulers]
        gen = torch.Generator().manual_seed(7)
        for t in range(steps):
            for p in params:
                p.grad = grads(p, t) if grads else torch.randn(p.shape, generator=gen)
            optimizer.step()
            for sched in scheds:
                sched.step()
        results.append((params, optimizer))
    return results


def _two_groups(kw):
    torch.manual_seed(4)
    weight, bias = Parameter(torch.randn(5, 3)), Parameter(torch.randn(5))
    return [weight, bias], [{"params": [weight]},
                            {"params": [bias], "lr": 3e-2, "weight_decay": 0.5}]


@pytest.mark.parametrize("kwargs", NUMERIC)
def test_param_groups_with_their_own_lr_and_weight_decay_match_adamw(kwargs):
    (ours, _), (theirs, _) = _run_pair(kwargs, _two_groups, steps=10)
    for p, q in zip(ours, theirs):
        _assert_close(p, q)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_params_without_grad_are_untouched(kwargs):
    torch.manual_seed(5)
    with_grad, without = Parameter(torch.randn(4)), Parameter(torch.randn(3))
    optimizer = SAdam([with_grad, without], **_fresh(kwargs))
    before = without.detach().clone()
    for _ in range(3):
        with_grad.grad = torch.randn(4)
        optimizer.step()
    assert torch.equal(without, before) and without not in optimizer.state
    assert torch.isfinite(with_grad).all()


@pytest.mark.parametrize("kwargs", NUMERIC)
def test_zero_grads_match_adamw(kwargs):
    """torch's test_step_is_noop_for_zero_grads: with zero gradients only weight decay moves
    the parameters, exactly as in AdamW (and not at all without weight decay)."""
    def build(kw):
        torch.manual_seed(6)
        params = [Parameter(torch.randn(3, 2)), Parameter(torch.randn(4))]
        return params, params

    (ours, opt), (theirs, _) = _run_pair(kwargs, build, steps=3,
                                         grads=lambda p, t: torch.zeros_like(p))
    for p, q in zip(ours, theirs):
        _assert_close(p, q)
    if float(kwargs.get("weight_decay", 1e-2)) == 0.0:
        torch.manual_seed(6)
        assert torch.equal(ours[0], torch.randn(3, 2))


SCHEDULERS = {
    "StepLR": lambda opt: StepLR(opt, gamma=0.5, step_size=2),
    "OneCycleLR": lambda opt: OneCycleLR(opt, max_lr=0.05, total_steps=10),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("kwargs", [c for c in NUMERIC if isinstance(c.values[0].get("lr"),
                                                                      torch.Tensor)])
def test_lr_schedulers_with_tensor_lr_match_adamw(kwargs, scheduler):
    def build(kw):
        torch.manual_seed(8)
        params = [Parameter(torch.randn(4, 2)), Parameter(torch.randn(2))]
        return params, params

    (ours, opt), (theirs, ref) = _run_pair(kwargs, build, steps=10,
                                           schedulers=[SCHEDULERS[scheduler]])
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(ref.param_groups[0]["lr"]))
    for p, q in zip(ours, theirs):
        _assert_close(p, q)
