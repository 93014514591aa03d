"""PSS against independent oracles: torch.linalg.svd, a plain-Python trigger, an uninterrupted run."""
import copy
import math
import re

import pytest
import torch

from sadam.pss import PSS
from sadam.pss_trigger import SpikeTrigger
from _single_rank import single_rank_mesh, single_rank_world  # noqa: F401 (fixtures)

TAIL = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def with_spectrum(m, n, top, seed=0, dtype=torch.float32):
    """An m x n matrix with singular values ``top`` followed by a small tail (random vectors)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    s = torch.tensor((list(top) + TAIL * r)[:r], dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.T, s


def oracle_rank(s, max_rank):
    srank = float((s ** 2).sum() / s[0] ** 2)
    assert 0.1 < srank % 1 < 0.9, "test spectrum too close to an integer stable rank"
    return min(max_rank, max(1, math.floor(srank)), len(s) - 1)


def smoothed(s, s_ref, smooth, strength):
    f = {"log": s_ref * (1 + math.log(s / s_ref)), "sqrt": s_ref * math.sqrt(s / s_ref),
         "clip": s_ref}[smooth]
    return s + strength * (f - s)


# ------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("smooth", ["log", "sqrt", "clip"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("shape,max_rank", [((24, 14), 16), ((14, 24), 2), ((6, 3, 2, 2), 16),
                                            ((9, 2), 16)])
def test_smoothing_matches_svd_oracle(smooth, strength, shape, max_rank):
    m, n = shape[0], math.prod(shape[1:])
    W0, s = with_spectrum(m, n, [10, 9, 8, 7, 6])
    param = torch.nn.Parameter(W0.float().reshape(shape).clone())
    report = PSS([param], max_rank=max_rank, smooth=smooth, strength=strength).smooth_now()

    k = oracle_rank(s, max_rank)
    expected = s.clone()
    for i in range(k):
        expected[i] = smoothed(float(s[i]), float(s[k]), smooth, strength)
    W1 = param.detach().double().reshape(m, n)
    got = torch.linalg.svdvals(W1)
    assert report.matrices[0].k == k
    torch.testing.assert_close(got, expected.sort(descending=True).values, rtol=1e-3, atol=1e-4)
    # singular vectors kept: the change lives in span(U_k) x span(V_k) and is diagonal there
    U, _, Vh = torch.linalg.svd(W0, full_matrices=False)
    Uk, Vk = U[:, :k], Vh[:k].T
    torch.testing.assert_close(Uk.T @ W1 @ Vk, torch.diag(expected[:k]), rtol=1e-3, atol=1e-4)
    rest = W1 - (Uk * expected[:k]) @ Vk.T
    torch.testing.assert_close(rest, W0 - (Uk * s[:k]) @ Vk.T, rtol=0, atol=1e-4)
    assert report.matrices[0].sigma1_before == pytest.approx(float(s[0]), rel=1e-4)
    assert report.matrices[0].sigma1_after == pytest.approx(float(expected[0]), rel=1e-3)


def test_vectors_and_degenerate_matrices_are_left_alone():
    bias = torch.nn.Parameter(torch.randn(5))
    row = torch.nn.Parameter(torch.randn(1, 8))           # min side 1: no sigma_{k+1}
    zero = torch.nn.Parameter(torch.zeros(6, 4))
    before = [t.detach().clone() for t in (bias, row, zero)]
    report = PSS([bias, row, zero]).smooth_now()
    assert [r.name for r in report.matrices] == ["param2"]
    for t, b in zip((bias, row, zero), before):
        assert torch.equal(t.detach(), b)


def test_batched_equals_unbatched():
    layers = [torch.nn.Parameter(with_spectrum(20, 12, [10, 8, 7], seed=i)[0].float())
              for i in range(3)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in layers]
    PSS(layers, smooth="log").smooth_now()
    for p in alone:
        PSS([p], smooth="log").smooth_now()
    for p, q in zip(layers, alone):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


def test_bf16_weights_are_smoothed_in_place_in_their_dtype():
    W0, s = with_spectrum(32, 16, [10, 9, 8, 7, 6])
    p16 = torch.nn.Parameter(W0.to(torch.bfloat16))
    p32 = torch.nn.Parameter(p16.detach().float())
    ptr = p16.data_ptr()
    PSS([p16]).smooth_now()
    PSS([p32]).smooth_now()
    assert p16.dtype == torch.bfloat16 and p16.data_ptr() == ptr
    torch.testing.assert_close(torch.linalg.svdvals(p16.detach().float()),
                               torch.linalg.svdvals(p32.detach()), rtol=2e-2, atol=2e-2)
    assert float(torch.linalg.svdvals(p16.detach().float())[0]) < float(s[0]) - 0.5


def test_optimizer_state_is_untouched():
    model = torch.nn.Linear(12, 20)
    with torch.no_grad():
        model.weight.copy_(with_spectrum(20, 12, [10, 9, 8])[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 12)).square().sum().backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    w = model.weight.detach().clone()
    PSS(model).smooth_now()
    assert not torch.equal(model.weight.detach(), w)
    for key, value in opt.state_dict()["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(value[name], state["state"][key][name])


# --------------------------------------------------------------------------------- trigger
def oracle_spikes(series, tau, beta, warmup):
    """Plain-Python reading of the trigger: which steps (1-based) spike, and their ratios."""
    ema, count, out = 0.0, 0, {}
    for t, g in enumerate(series, start=1):
        prev = ema / (1 - beta ** count) if count else math.inf
        finite = math.isfinite(g)
        if t > warmup and (not finite or g > tau * prev):
            out[t] = g / prev if finite else math.inf
        if finite:
            ema, count = beta * ema + (1 - beta) * g, count + 1
    return out


def grad_series(seed=0, n=90):
    g = torch.Generator().manual_seed(seed)
    series = (1.0 + 0.1 * torch.rand(n, generator=g)).tolist()
    series[19] = 20.0    # last warm-up step: must not fire
    series[34] = 4.0     # spikes
    series[35] = 3.5     # right after a spike that entered the EMA: below tau * n
    series[59] = 6.0
    series[74] = float("nan")
    series[80] = float("inf")
    return series


def drive(pss, params, norms, due=None):
    """Give ``params`` gradients whose global norm is ``norms[t]``; yield step()'s result.

    ``due`` collects what observe() returned, read after the step (a sync, test only)."""
    for g in norms:
        for p in params:
            p.grad = torch.full_like(p, g / math.sqrt(sum(q.numel() for q in params)))
        flag = pss.observe()
        yield pss.step()
        if due is not None:
            due.append(bool(flag))


def spiky_params():
    return [torch.nn.Parameter(with_spectrum(10, 6, [5, 4])[0].float()),
            torch.nn.Parameter(torch.zeros(4))]


def test_trigger_fires_exactly_on_spikes_never_in_warmup():
    series = grad_series()
    expected = oracle_spikes(series, tau=2.5, beta=0.9, warmup=20)
    assert set(expected) == {35, 60, 75, 81}   # the series is built for this
    params = spiky_params()
    pss = PSS(params, tau=2.5, beta=0.9, warmup=20)
    due = []
    fired = {t: r for t, r in enumerate(drive(pss, params, series, due), start=1)
             if r is not None}
    assert set(fired) == set(expected)
    assert [t for t, d in enumerate(due, start=1) if d] == sorted(expected)
    for t, report in fired.items():
        assert report.reason == "spike" and report.spike_step == t and report.step == t
        assert report.ratio == pytest.approx(expected[t], rel=1e-5)
    assert pss.history == list(fired.values())


def test_non_finite_norm_stays_out_of_the_ema():
    params = spiky_params()
    pss = PSS(params, beta=0.9, warmup=0)
    list(drive(pss, params, [1.0, 2.0, 3.0]))
    before = pss._trigger.average().clone()
    list(drive(pss, params, [float("nan"), float("inf")]))
    assert torch.equal(pss._trigger.average(), before)
    expected = (0.9 * 0.1 * 2 + 0.81 * 0.1 * 1 + 0.1 * 3) / (1 - 0.9 ** 3)
    assert float(before) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta,series,spikes", [
    (0.0, [1.0, 3.0, 3.0, 6.0, float("nan"), 13.0], {2, 5, 6}),
    (0.5, [1.0, 1.2, 3.0], {3}),
])
def test_trigger_edges_match_the_plain_python_reading(beta, series, spikes):
    """The edges the long series does not reach: beta = 0 (the average is the last finite
    norm), a spike at the first averaged step, a first step that is no spike with a warmup of
    0 (nothing averaged yet), and a norm of exactly tau * n (no spike: the rule is strict)."""
    expected = oracle_spikes(series, tau=2.0, beta=beta, warmup=0)
    assert set(expected) == spikes   # the series is built for this
    trigger = SpikeTrigger(torch.device("cpu"), tau=2.0, beta=beta, warmup=0)
    fired = {}
    for t, g in enumerate(series, start=1):
        if bool(trigger.observe(torch.tensor(g))):
            fired[t] = float(trigger.last_ratio)
    assert fired == pytest.approx(expected, rel=1e-6)


def test_every_mode_fires_on_its_period_besides_spikes():
    params = spiky_params()
    pss = PSS(params, tau=1e6, warmup=20, every=10)
    due = []
    reports = list(drive(pss, params, [1.0] * 35, due))
    fired = [t for t, r in enumerate(reports, start=1) if r is not None]
    assert fired == [10, 20, 30]
    assert [t for t, d in enumerate(due, start=1) if d] == [10, 20, 30]
    assert all(r.reason == "every" for r in pss.history)


def test_every_one_smooths_from_the_first_step():
    """every = 1: a periodic smoothing on every step, the first one included."""
    params = spiky_params()
    pss = PSS(params, tau=1e6, warmup=0, every=1)
    assert [r.reason for r in drive(pss, params, [1.0] * 3)] == ["every"] * 3


def test_a_periodic_smoothing_fires_once_per_step_and_manual_says_so():
    params = spiky_params()
    pss = PSS(params, tau=1e6, warmup=0, every=2)
    assert [r is None for r in drive(pss, params, [1.0, 1.0])] == [True, False]
    assert pss.step() is None    # a second step() on the same observation: already smoothed
    report = pss.smooth_now()
    assert report.reason == "manual" and report.step == 2
    assert [r.reason for r in pss.history] == ["every", "manual"]


# ---------------------------------------------------------------------------- host syncs
def test_no_host_read_of_device_state_when_nothing_fires(monkeypatch):
    """observe() reads nothing on the host; step() reads only the flag's host mirror."""
    params = spiky_params()
    pss = PSS(params, warmup=2)
    list(drive(pss, params, [1.0, 1.0, 1.0]))
    reads = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            reads.append((name, self))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy"):
        spy(name)
    for p in params:
        p.grad = torch.full_like(p, 0.1)
    pss.observe()
    assert reads == []
    assert pss.step() is None
    assert [(n, t is pss._trigger.mirror.host) for n, t in reads] == [("__bool__", True)]
    reads.clear()
    for p in params:
        p.grad = torch.full_like(p, 100.0)
    pss.observe()
    assert reads == []
    assert pss.step() is not None           # a firing step reads device values (the spy works)
    assert any(t is not pss._trigger.mirror.host for _, t in reads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_when_nothing_fires():
    model = torch.nn.Linear(16, 32).cuda()
    pss = PSS(model, warmup=2)
    x = torch.randn(8, 16, device="cuda")
    for _ in range(3):
        model(x).square().mean().backward()
        pss.observe()
        pss.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            model.zero_grad()
            model(x).square().mean().backward()
            pss.observe()
            assert pss.step() is None
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spikes_fire_on_cuda_once_the_flag_has_landed():
    """On CUDA the flag reaches the host by a non-blocking copy: once it has landed, step()
    must act on it (the CPU tests cannot see the mirror's event)."""
    series = grad_series()
    expected = oracle_spikes(series, tau=2.5, beta=0.9, warmup=20)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in spiky_params()]
    n = sum(p.numel() for p in params)
    pss = PSS(params, tau=2.5, beta=0.9, warmup=20)
    fired = []
    for t, g in enumerate(series, start=1):
        for p in params:
            p.grad = torch.full_like(p, g / math.sqrt(n))
        pss.observe()
        torch.cuda.synchronize()
        if pss.step() is not None:
            fired.append(t)
    assert fired == sorted(expected)


# --------------------------------------------------------------------------------- state
def test_state_dict_round_trip_continues_like_an_uninterrupted_run():
    series = grad_series(seed=1)
    params = spiky_params()
    pss = PSS(params, tau=2.5, beta=0.9, warmup=20, every=25)
    gen = drive(pss, params, series)
    for _ in range(50):
        next(gen)
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(pss.state_dict())
    list(gen)

    params2 = [torch.nn.Parameter(p) for p in saved_params]
    resumed = PSS(params2, tau=2.5, beta=0.9, warmup=20, every=25)
    resumed.load_state_dict(saved)
    list(drive(resumed, params2, series[50:]))
    assert [r.step for r in resumed.history] == [r.step for r in pss.history]
    assert resumed.history == pss.history
    for p, q in zip(params, params2):
        assert torch.equal(p.detach(), q.detach())
    with pytest.raises(ValueError, match="hparams"):
        PSS(params2, tau=3.0).load_state_dict(saved)
    for key in saved:
        partial = {k: v for k, v in saved.items() if k != key}
        with pytest.raises(ValueError, match=f"^state_dict is missing '{key}'$"):
            PSS(params2, tau=2.5, beta=0.9, warmup=20, every=25).load_state_dict(partial)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,name", [
    (dict(tau=0), "tau"), (dict(tau=float("inf")), "tau"), (dict(beta=1.0), "beta"),
    (dict(warmup=-1), "warmup"), (dict(max_rank=0), "max_rank"), (dict(oversample=0),
                                                                   "oversample"),
    (dict(power_iters=1.5), "power_iters"), (dict(smooth="tanh"), "smooth"),
    (dict(strength=1.5), "strength"), (dict(every=0), "every"), (dict(seed=-1), "seed"),
    (dict(tau="2"), "tau"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PSS(torch.nn.Linear(4, 4), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tau="2"), "tau must be a real number or a one-element Tensor, got '2'"),
    (dict(tau=0), "tau must be a finite number > 0, got 0"),
    (dict(beta="x"), "beta must be a real number or a one-element Tensor, got 'x'"),
    (dict(beta=1.0), "beta must be in [0, 1), got 1.0"),
    (dict(warmup=-1), "warmup must be an integer >= 0, got -1"),
    (dict(max_rank=0), "max_rank must be an integer >= 1, got 0"),
    (dict(oversample=0), "oversample must be an integer >= 1, got 0"),
    (dict(power_iters=1.5), "power_iters must be an integer >= 0, got 1.5"),
    (dict(smooth="tanh"), "smooth must be one of ('log', 'clip', 'sqrt'), got 'tanh'"),
    (dict(strength="x"), "strength must be a real number or a one-element Tensor, got 'x'"),
    (dict(strength=1.5), "strength must be in [0, 1], got 1.5"),
    (dict(every=0), "every must be an integer >= 1, got 0"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
])
def test_bad_argument_messages_give_the_rule_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PSS(torch.nn.Linear(4, 4), **kwargs)


def test_arguments_on_the_edges_of_their_ranges_are_accepted():
    """Values at the low ends of the valid ranges: tau below 1, beta = 0, strength = 0,
    warmup = 0, max_rank = 1, oversample = 1, power_iters = 0, every = 1, seed = 0."""
    pss = PSS(torch.nn.Linear(4, 4), tau=0.5, beta=0.0, strength=0.0, warmup=0, max_rank=1,
              oversample=1, power_iters=0, every=1, seed=0)
    assert pss.hparams == dict(tau=0.5, beta=0.0, warmup=0, max_rank=1, oversample=1,
                               power_iters=0, smooth="log", strength=0.0, every=1, seed=0)


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="params_or_module"):
        PSS([])
    with pytest.raises(ValueError, match="params_or_module"):
        PSS(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="params_or_module"):
        PSS([torch.zeros(3, 3, dtype=torch.int64)])
    with pytest.raises(RuntimeError, match=r"^PSS\.observe\(\) found no gradients; "
                                           r"call it after backward\(\)$"):
        PSS(torch.nn.Linear(3, 3)).observe()


# --------------------------------------------------------------------------- FSDP2 layout
def test_sharded_parameters_match_plain_ones(single_rank_mesh):
    """Shard(0) DTensors (the FSDP2 layout): all-reduced norm and gathered smoothing."""
    from torch.distributed.tensor import Replicate, Shard
    assert_mesh_layout_matches_plain(single_rank_mesh, [[Shard(0)], [Replicate()], [Shard(0)]],
                                     top=[10, 9, 8])


def assert_mesh_layout_matches_plain(mesh, placements, top):
    """PSS over DTensors laid out on ``mesh`` as ``placements`` (two matrices and a vector)
    observes the same gradient norm and smooths to the same weights as over plain tensors."""
    from torch.distributed.tensor import distribute_tensor
    plain = [torch.nn.Parameter(with_spectrum(20, 12, top, seed=i)[0].float())
             for i in range(2)] + [torch.nn.Parameter(torch.randn(12))]
    on_mesh = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, pl))
               for p, pl in zip(plain, placements)]
    for p, q in zip(plain, on_mesh):
        p.grad = torch.randn_like(p)
        q.grad = distribute_tensor(p.grad.clone(), mesh, q.placements)
    a, b = PSS(plain, warmup=0), PSS(on_mesh, warmup=0)
    a.observe(), b.observe()
    torch.testing.assert_close(b._trigger.ema, a._trigger.ema)
    a.smooth_now(), b.smooth_now()
    for p, q in zip(plain, on_mesh):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- demo
def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from sadam import pss_demo
    rows = pss_demo.main(["--seeds", "1", "--steps", "8", "--warmup", "2", "--every", "3",
                          "--out", str(tmp_path)])
    assert [r["config"] for r in rows] == ["AdamW", "AdamW+PSS", "SAdam", "SAdam+PSS"]
    with_pss = [r for r in rows if "PSS" in r["config"]]
    assert all(r["fired_fraction"] >= 2 / 8 for r in with_pss)   # every=3: steps 3 and 6
    assert (tmp_path / "pss_demo.png").stat().st_size > 10_000


# -------------------------------------------------------------------- inputs and defaults
def test_default_hyperparameters():
    """The documented defaults."""
    assert PSS(torch.nn.Linear(4, 4)).hparams == dict(
        tau=2.5, beta=0.98, warmup=20, max_rank=16, oversample=4, power_iters=2, smooth="log",
        strength=1.0, every=None, seed=0)


def test_parameters_are_named_and_all_count_in_the_gradient_norm():
    """Names come from named_parameters, from (name, tensor) pairs, as group{i}.{j} for
    param-group dicts and as param{i} for bare tensors (0-d ones included); the gradient norm
    covers every parameter given (beta = 0: the average is the latest norm)."""
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    scalar = torch.nn.Parameter(torch.tensor(0.5))
    linear = torch.nn.Linear(3, 4)
    cases = [
        ([a], ["param0"], [a]),
        ([scalar, a], ["param0", "param1"], [scalar, a]),
        ([("w1", a), ("w2", b)], ["w1", "w2"], [a, b]),
        ([{"params": [a, b]}, {"params": [c]}], ["group0.0", "group0.1", "group1.0"], [a, b, c]),
        (linear, ["weight", "bias"], [linear.weight, linear.bias]),
    ]
    for given, names, tensors in cases:
        for t in tensors:
            t.grad = torch.randn_like(t)
        pss = PSS(given, beta=0.0, warmup=0)
        assert [n for n, _ in pss.params] == names
        assert all(p is t for (_, p), t in zip(pss.params, tensors))
        pss.observe()
        expected = math.sqrt(sum(float(t.grad.double().square().sum()) for t in tensors))
        assert float(pss._trigger.average()) == pytest.approx(expected, rel=1e-6)


def test_a_parameter_given_twice_is_managed_once():
    """A tied parameter listed twice counts once in the gradient norm and is smoothed once."""
    W0, _ = with_spectrum(20, 12, [10, 9, 8])
    p, q = torch.nn.Parameter(W0.float()), torch.nn.Parameter(torch.zeros(5))
    pss = PSS([p, q, p], beta=0.0, warmup=0)
    p.grad, q.grad = torch.full_like(p, 0.1), torch.ones_like(q)
    pss.observe()
    assert float(pss._trigger.average()) == pytest.approx(math.sqrt(p.numel() * 0.01 + 5),
                                                          rel=1e-6)
    alone = torch.nn.Parameter(W0.float())
    PSS([alone]).smooth_now()
    assert [m.name for m in pss.smooth_now().matrices] == ["param0"]
    assert torch.equal(p.detach(), alone.detach())


@pytest.mark.parametrize("given,message", [
    (torch.zeros(3, 3), r"^params_or_module must be an nn\.Module or an iterable of parameters, "
                        r"got a single Tensor$"),
    ([], r"^params_or_module holds no parameters$"),
    ([torch.zeros(3, 3, dtype=torch.int64)],
     r"^params_or_module: param0 must be a floating-point Tensor, got torch\.int64$"),
    ([("w", [1.0, 2.0])], r"^params_or_module: w must be a floating-point Tensor, got list$"),
])
def test_bad_params_messages_say_what_was_given(given, message):
    with pytest.raises(ValueError, match=message):
        PSS(given)


# ------------------------------------------------------------------ batching and numerics
def test_matrices_of_different_shapes_are_each_smoothed_like_alone():
    """Matrices are batched by shape, in first-seen order; each ends up as a PSS of it alone
    leaves it."""
    shapes = [(20, 12), (12, 20), (20, 12), (6, 3, 2, 2)]
    params = []
    for i, shape in enumerate(shapes):
        W0, _ = with_spectrum(shape[0], math.prod(shape[1:]), [10, 8, 7, 6], seed=i)
        params.append(torch.nn.Parameter(W0.float().reshape(shape)))
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    report = PSS(params).smooth_now()
    assert [m.name for m in report.matrices] == ["param0", "param2", "param1", "param3"]
    for p, q in zip(alone, params):
        PSS([p]).smooth_now()
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("smooth", ["log", "sqrt", "clip"])
def test_small_weights_are_smoothed_like_large_ones(smooth):
    """Smoothing commutes with scaling the weights: a matrix whose singular values are all
    below 1 (sigma_1 and s_ref too) is smoothed like the same matrix 100 times larger."""
    W0, s = with_spectrum(24, 14, [10, 9, 8, 7, 6])
    small, large = torch.nn.Parameter((W0 / 100).float()), torch.nn.Parameter(W0.float())
    k_small = PSS([small], smooth=smooth).smooth_now().matrices[0].k
    k_large = PSS([large], smooth=smooth).smooth_now().matrices[0].k
    assert k_small == k_large == oracle_rank(s, 16)
    torch.testing.assert_close(small.detach() * 100, large.detach(), rtol=1e-4, atol=1e-5)


def test_smoothing_depends_on_the_seed_not_on_the_global_rng():
    """The start vector and the test matrices come from PSS's own seeded generator: whatever
    the global RNG's state, the same seed smooths to the same bits."""
    # sigma_1 and sigma_2 close and srank just under 3: the power iteration's start vector
    # decides whether k is 2 or 3, so a draw from another random stream shows in k
    W0, _ = with_spectrum(20, 12, [10, 9.8, 6, 6, 5.05])

    def smooth(seed):
        p = torch.nn.Parameter(W0.float())
        report = PSS([p], seed=seed).smooth_now()
        return p.detach(), report

    assert {smooth(seed)[1].matrices[0].k for seed in range(6)} == {2, 3}  # built for this
    with torch.random.fork_rng():
        runs = []
        for global_seed in range(5):
            torch.manual_seed(global_seed)
            torch.randn(100)
            runs.append(smooth(0))
    for W, report in runs[1:]:
        assert report == runs[0][1] and torch.equal(W, runs[0][0])


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_results_do_not_depend_on_the_default_dtype(default):
    """PSS sets its own dtypes (fp32 factorization; fp32, int64 and bool trigger state): in a
    process whose default dtype is float64 or bfloat16, the same run gives bit-identical
    weights, reports and saved state."""
    series = grad_series()[:70]
    params = spiky_params()
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    pss = PSS(params, tau=2.5, beta=0.9, warmup=20, every=40)
    list(drive(pss, params, series))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        pss2 = PSS(params2, tau=2.5, beta=0.9, warmup=20, every=40)
        list(drive(pss2, params2, series))
    finally:
        torch.set_default_dtype(previous)
    assert [r.reason for r in pss.history] == ["spike", "every", "spike"]  # built for this
    assert pss2.history == pss.history
    for p, q in zip(params, params2):
        assert q.dtype == p.dtype and torch.equal(q.detach(), p.detach())
    saved, saved2 = pss.state_dict()["trigger"], pss2.state_dict()["trigger"]
    for name in SpikeTrigger.STATE:
        assert saved2[name].dtype == saved[name].dtype and torch.equal(saved2[name], saved[name])


# ------------------------------------------------------------------------- trigger extras
def test_the_due_flag_is_a_bool_tensor():
    """observe() returns a bool tensor, on a spike step and on a periodic one: it can mask a
    torch.where and be negated."""
    params = spiky_params()
    pss = PSS(params, warmup=0, every=3)
    flags = []
    for g in (1.0, 100.0, 1.0):
        for p in params:
            p.grad = torch.full_like(p, g)
        flags.append(pss.observe())
    assert [f.dtype for f in flags] == [torch.bool] * 3
    assert [bool(f) for f in flags] == [False, True, True]
    assert torch.where(flags[1], 1, 0).item() == 1 and not bool(~flags[2])


def test_spike_step_is_exact_beyond_two_to_the_24_steps():
    """The step of a spike is an integer count: past 2**24 steps (where fp32 stops counting by
    one) the report still names the exact step of the spike."""
    params = spiky_params()
    pss = PSS(params, beta=0.9, warmup=0)
    list(drive(pss, params, [1.0]))
    state = pss.state_dict()
    state["trigger"]["step"] = 2 ** 24 + 2
    pss.load_state_dict(state)
    report, = drive(pss, params, [10.0])
    assert report.reason == "spike" and report.step == report.spike_step == 2 ** 24 + 3


def test_saved_generator_states_are_keyed_by_device():
    """A checkpoint keeps one generator state per device, under the device's name."""
    params = spiky_params()
    pss = PSS(params)
    pss.smooth_now()
    generators = pss.state_dict()["generators"]
    assert list(generators) == ["cpu"]
    assert not torch.equal(generators["cpu"], torch.Generator().manual_seed(0).get_state())


# ------------------------------------------------------------------ DTensor layouts, CUDA
def test_gradients_on_a_two_dimensional_mesh_use_dtensor_reduction(single_rank_mesh):
    """A DTensor on a 2-D mesh is not a 1-D shard, whatever its first placement: its norm comes
    from DTensor's own reduction and equals the plain one; the smoothing matches too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    placements = [[Shard(0), Replicate()], [Replicate(), Shard(0)], [Shard(0), Replicate()]]
    assert_mesh_layout_matches_plain(mesh, placements, top=[10, 8, 7])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("smooth", ["log", "sqrt", "clip"])
def test_smoothing_on_cuda_matches_svd_oracle(smooth):
    """The factorization runs on the weights' device with that device's generator."""
    W0, s = with_spectrum(24, 14, [10, 9, 8, 7, 6])
    param = torch.nn.Parameter(W0.float().cuda())
    report = PSS([param], smooth=smooth).smooth_now()
    k = oracle_rank(s, 16)
    expected = s.clone()
    for i in range(k):
        expected[i] = smoothed(float(s[i]), float(s[k]), smooth, 1.0)
    assert param.device.type == "cuda" and report.matrices[0].k == k
    torch.testing.assert_close(torch.linalg.svdvals(param.detach().cpu().double()),
                               expected.sort(descending=True).values, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parameters_on_a_gpu_and_on_the_cpu():
    """Parameters split between a GPU and the CPU, with the same shape on both: the gradient norm
    covers both devices (it lands on the first gradient's device), and each matrix is smoothed
    in its own device's batch with its own device's generator, as a PSS of it alone would."""
    W0, _ = with_spectrum(10, 6, [5, 4])
    W1, _ = with_spectrum(10, 6, [5, 4], seed=1)
    params = [torch.nn.Parameter(W0.float().cuda()), torch.nn.Parameter(torch.zeros(4)),
              torch.nn.Parameter(W1.float())]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad.to(p.device)
    alone = [torch.nn.Parameter(params[i].detach().clone()) for i in (0, 2)]
    pss = PSS(params, beta=0.0, warmup=0)
    pss.observe()
    assert pss._trigger.ema.device == params[0].device
    expected = math.sqrt(sum(float(grad.double().square().sum()) for grad in grads))
    assert float(pss._trigger.average()) == pytest.approx(expected, rel=1e-5)
    assert [m.name for m in pss.smooth_now().matrices] == ["param0", "param2"]
    for p, q in zip(alone, (params[0], params[2])):
        PSS([p]).smooth_now()
        assert q.device == p.device
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_observe_returns_while_the_device_is_still_busy():
    """observe() only queues work: with the stream held by a long kernel, it returns before
    that kernel ends (the flag goes to pinned host memory by an asynchronous copy; a copy into
    pageable memory, or a blocking one, would make the host wait for the stream)."""
    params = [torch.nn.Parameter(p.detach().cuda()) for p in spiky_params()]
    pss = PSS(params, warmup=2)
    for p in params:
        p.grad = torch.ones_like(p)
    pss.observe()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)   # about a second of GPU clock cycles
    pss.observe()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_norm_of_dtensor_gradients_on_a_gpu_mesh_beside_cpu_ones(single_rank_mesh):
    """The squares of sharded (1-D mesh) and otherwise laid out DTensor gradients move to the
    first gradient's device before they are summed, whatever device their mesh is on."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from sadam.pss_trigger import grad_norm
    mesh = init_device_mesh("cuda", (1,))
    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(5, generator=g), torch.randn(6, 4, generator=g),
             torch.randn(3, 4, generator=g)]
    grads = [plain[0], DTensor.from_local(plain[1].cuda(), mesh, [Shard(0)]),
             DTensor.from_local(plain[2].cuda(), mesh, [Replicate()])]
    norm = grad_norm(grads)
    assert norm.device.type == "cpu"
    expected = math.sqrt(sum(float(t.double().square().sum()) for t in plain))
    assert float(norm) == pytest.approx(expected, rel=1e-6)
