"""Properties over random hyperparameters, dtypes, shapes and gradient magnitudes (hypothesis).

* finite gradients give finite parameters and rho in [0, 1]; a NaN/Inf gradient spoils only
  its own tensor (as in AdamW) and never rho;
* an input that SAdam rejects changes nothing (every parameter, state tensor and
  hyperparameter is bitwise the same after the exception);
* ``damping=0`` is ``torch.optim.AdamW`` (``foreach=False``) to the tolerance torch's own fused
  AdamW achieves against that same for-loop AdamW, measured on each example.

Backends: ``torch`` (the reference) and ``cpu`` (the C++ kernel) where it is built.
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from sadam import SAdam, backends

BACKENDS = [b for b in ("torch", "cpu") if b in backends.available_backends("cpu")]
# derandomized (the same examples every run) and not shrunk: a failure prints its example as
# drawn, and the module stays within a minute on two cores
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow])

# shapes: 0-element, 1-element, odd sizes, and non-contiguous views (made by `_tensor`)
SHAPES = [(0,), (0, 3), (1,), (1, 1), (7,), (3, 5), (2, 3, 5), "transposed", "strided"]


def _tensor(shape, dtype, gen):
    if shape == "transposed":
        return torch.randn(5, 3, generator=gen).t().to(dtype)  # (3, 5), not contiguous
    if shape == "strided":
        return torch.randn(11, generator=gen)[::2].to(dtype)  # (6,), stride 2
    return torch.randn(shape, generator=gen).to(dtype)


def _like(p, gen):
    """A tensor with p's shape AND strides (non-contiguous gradients for non-contiguous p)."""
    out = torch.empty_strided(p.shape, p.stride(), dtype=torch.float32)
    out.copy_(torch.randn(p.shape, generator=gen))
    return out


hyper = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-4, 1e-3, 3e-2]),
    "betas": st.sampled_from([(0.9, 0.999), (0.0, 0.99), (0.5, 0.9)]),
    "eps": st.sampled_from([1e-8, 1e-6]),  # eps=0 with a zero gradient is 0/0, in AdamW too
    "weight_decay": st.sampled_from([0.0, 1e-2, 0.3]),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
})
probing = st.fixed_dictionaries({
    "damping": st.sampled_from([0.0, 0.5, 2.0, 10.0]),
    "probes": st.integers(1, 8),
    "scope": st.sampled_from(["group", "tensor"]),
    "probe_lag": st.sampled_from([0, 1]),
    "probe_window": st.sampled_from([None, 2, 3]),
})
param_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
state_dtypes = st.sampled_from([torch.float32, torch.bfloat16])
shape_lists = st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3)


def _params(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(_tensor(s, dtype, gen)) for s in shapes]


def _grads(params, scale, gen):
    """fp32 gradients times ``scale`` in each parameter's dtype, the scale capped where the dtype
    cannot hold it (fp16 tops out at 65504): always finite."""
    return [(_like(p, gen) * min(scale, torch.finfo(p.dtype).max / 16)).to(p.dtype)
            for p in params]


def _rho_in_unit_interval(opt):
    for rho in opt.lgi():
        assert bool(((rho >= 0) & (rho <= 1)).all()), rho


# ------------------------------------------------------------ finite in, finite out, rho in [0,1]
def _finite_run(backend, h, probe, dtype, state_dtype, shapes, exponents, spike, seed):
    params = _params(shapes, dtype, seed)
    opt = SAdam(params, backend=backend, state_dtype=state_dtype, **h, **probe)
    gen = torch.Generator().manual_seed(seed + 1)
    for t, exponent in enumerate(exponents):
        scale = 10.0 ** exponent * (10.0 ** spike if t == 1 else 1.0)
        for p, g in zip(params, _grads(params, scale, gen)):
            p.grad = g
        opt.step()
        for p in params:
            assert bool(torch.isfinite(p).all())
        _rho_in_unit_interval(opt)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(h=hyper, probe=probing, dtype=param_dtypes, state_dtype=state_dtypes, shapes=shape_lists,
       exponents=st.lists(st.integers(-15, 15), min_size=3, max_size=4),
       seed=st.integers(0, 2 ** 16))
def test_finite_gradients_give_finite_params_and_rho_in_unit_interval(
        backend, h, probe, dtype, state_dtype, shapes, exponents, seed):
    """Gradient scales 1e-15 .. 1e15, changing from step to step."""
    _finite_run(backend, h, probe, dtype, state_dtype, shapes, exponents, 0, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(h=hyper, probe=probing, shapes=shape_lists,
       exponent=st.integers(-30, 30), spike=st.integers(0, 30), seed=st.integers(0, 2 ** 16))
def test_extreme_gradient_scales_and_spikes_keep_rho_in_unit_interval(
        backend, h, probe, shapes, exponent, spike, seed):
    """fp32 gradients of any finite scale 1e-30 .. 1e30 with a spike of up to 1e30 times more
    on the second step (as long as the gradient is finite in fp32)."""
    _finite_run(backend, h, probe, torch.float32, torch.float32, shapes,
                [exponent] * 4, spike, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(h=hyper, probe=probing, shapes=st.lists(st.sampled_from(SHAPES[2:]), min_size=2,
                                               max_size=3),
       bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       seed=st.integers(0, 2 ** 16))
def test_a_non_finite_gradient_spoils_only_its_tensor(backend, h, probe, shapes, bad, seed):
    params = _params(shapes, torch.float32, seed)
    opt = SAdam(params, backend=backend, **h, **probe)
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(4):
        for p in params:
            p.grad = _like(p, gen)
        if t == 2:
            params[0].grad[(0,) * params[0].dim()] = bad
        opt.step()
        for p in params[1:]:  # the other tensors stay finite, as in AdamW
            assert bool(torch.isfinite(p).all())
        _rho_in_unit_interval(opt)


# ------------------------------------------------------------- rejected input changes nothing
def _snapshot(opt):
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in opt.state.items()}
    return groups, params, state


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                b.contiguous().reshape(-1).view(torch.uint8)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b or (a != a and b != b)


def _bad_state_dict(mutation):
    def apply(opt, params):
        sd = copy.deepcopy(opt.state_dict())
        mutation(sd)
        opt.load_state_dict(sd)
    return apply


def _step_after(prepare):
    def apply(opt, params):
        prepare(params[-1])
        opt.step()
    return apply


def _bad_group(group):
    def apply(opt, params):
        opt.add_param_group(dict(group, params=[torch.nn.Parameter(torch.zeros(2))]))
    return apply


def _stored_rho(value):
    from sadam import _layout as L

    def mutate(sd):
        k = sd["param_groups"][0]["probes"]
        sd["state"][0]["probe_stats"][:, L.rho_col(k)] = value
    return mutate


def _as_float64(p):
    # module.double() after construction: the grad follows the parameter's dtype
    torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().double()))
    p.grad = torch.zeros_like(p)


NEEDS_STATE = ("int64 moment", "stored rho -1", "stored rho 5", "moment of another shape")
REJECTED = {
    "infinite damping in a state_dict": _bad_state_dict(
        lambda sd: sd["param_groups"][0].__setitem__("damping", float("inf"))),
    "probe_lag=True in a state_dict": _bad_state_dict(
        lambda sd: sd["param_groups"][-1].__setitem__("probe_lag", True)),
    "int64 moment": _bad_state_dict(
        lambda sd: sd["state"][0].__setitem__("exp_avg", sd["state"][0]["exp_avg"].long())),
    "stored rho -1": _bad_state_dict(_stored_rho(-1.0)),
    "stored rho 5": _bad_state_dict(_stored_rho(5.0)),
    "moment of another shape": _bad_state_dict(
        lambda sd: sd["state"][0].__setitem__("exp_avg_sq", torch.zeros(99))),
    "sparse gradient": _step_after(
        lambda p: setattr(p, "grad", torch.zeros(p.shape).to_sparse())),
    "parameter turned float64": _step_after(_as_float64),
    "tensor lr of shape (2,) set on the group": lambda opt, params: (
        opt.param_groups[-1].__setitem__("lr", torch.tensor([1e-3, 1e-3])), opt.step()),
    "group with infinite probe_delta": _bad_group({"probe_delta": float("inf")}),
    "group with a backend that cannot run": _bad_group({"backend": "cuda"}),
    "group with a (2,) lr": _bad_group({"lr": torch.tensor([1e-3, 1e-3])}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(h=hyper, probe=probing, shapes=st.lists(st.sampled_from(SHAPES[2:]), min_size=2,
                                               max_size=3),
       case=st.sampled_from(sorted(REJECTED)), steps=st.integers(0, 2),
       seed=st.integers(0, 2 ** 16))
def test_rejected_input_changes_nothing(backend, h, probe, shapes, case, steps, seed):
    params = _params(shapes, torch.float32, seed)
    # two groups: whatever the second rejects, the first must not have been stepped
    opt = SAdam([{"params": params[:-1]}, {"params": params[-1:]}], backend=backend, **h,
                **probe)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = _like(p, gen)
        opt.step()
    assume(steps > 0 or case not in NEEDS_STATE)
    for p in params:
        p.grad = _like(p, gen)
    before = _snapshot(opt)
    with pytest.raises((ValueError, RuntimeError)):
        REJECTED[case](opt, params)
    after = _snapshot(opt)
    if case in ("parameter turned float64", "tensor lr of shape (2,) set on the group"):
        # what the case itself changed, put back: the rest must be untouched
        after[1][-1], after[0][-1]["lr"] = after[1][-1].float(), before[0][-1]["lr"]
    assert _same(after, before)


# ------------------------------------------------------------------- damping=0 is AdamW
def _run(cls, params, grads, **kwargs):
    params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


def _max_diff(a, b):
    """Largest |a - b| over finite positions; inf if the non-finite positions differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.equal(torch.isfinite(x), torch.isfinite(y)) or \
                not torch.equal(torch.isnan(x), torch.isnan(y)):
            return float("inf")
        finite = torch.isfinite(x)
        if finite.any():
            worst = max(worst, (x[finite] - y[finite]).abs().max().item())
    return worst


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(h=hyper, shapes=shape_lists, exponent=st.integers(-30, 30),
       special=st.sampled_from([None, float("nan"), float("inf")]),
       probe_lag=st.sampled_from([0, 1]), eps_zero=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_damping_zero_is_adamw_to_the_tolerance_of_fused_adamw(
        backend, h, shapes, exponent, special, probe_lag, eps_zero, seed):
    """The tolerance is measured on the example itself: 4 times the largest difference between
    torch's fused AdamW and its for-loop AdamW, and at least 4 fp32 ulps of the largest
    parameter (the two torch implementations often agree bitwise; one rounding more or less in
    a kernel is then the smallest difference that can be allowed)."""
    h = dict(h, eps=0.0) if eps_zero else h  # NaN where AdamW has NaN: the same outcome
    params = _params(shapes, torch.float32, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    grads = [[_like(p, gen) * 10.0 ** exponent for p in params] for _ in range(4)]
    if special is not None and grads[0][0].numel():
        grads[2][0][(0,) * grads[2][0].dim()] = special
    loop = _run(torch.optim.AdamW, params, grads, foreach=False, **h)
    fused = _run(torch.optim.AdamW, params, grads, fused=True, **h)
    ours = _run(SAdam, params, grads, damping=0.0, probe_lag=probe_lag, backend=backend, **h)
    largest = max([p.abs().max().item() for p in loop if p.numel() and
                   torch.isfinite(p).all()] + [1.0])
    ulp = torch.finfo(torch.float32).eps * largest
    tolerance = 4 * max(_max_diff(fused, loop), ulp)
    assert _max_diff(ours, loop) <= tolerance
