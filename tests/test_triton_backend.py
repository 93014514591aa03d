"""The Triton backend against the reference backend (the oracle), spec section 6 tolerances.

With a GPU these tests run compiled, on CUDA tensors. Without one they run in Triton's
interpreter on CPU tensors, which needs TRITON_INTERPRET=1 before triton is first imported (its
own library functions are decorated at import). So on CPU they run only inside the subprocess
that ``test_triton_interpreter.py`` starts with that variable set, and are skipped here.
"""
import importlib.util
import os

import pytest
import torch

from sadam import _layout as L
from sadam._hash import probe_hash, probe_key
from sadam.backends import reference
from sadam.backends.step import GroupStep
from sadam.functional import sadam as sadam_step

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not (torch.cuda.is_available() or os.environ.get("SADAM_TRITON_INTERPRETER_RUN") == "1"):
    pytest.skip("no GPU: these tests run in the TRITON_INTERPRET subprocess of "
                "test_triton_interpreter.py", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RHO_TOL = 1e-4
REL_TOL = 1e-5


def triton_backend():
    from sadam.backends import triton as backend
    return backend


# ----------------------------------------------------------------------------------- helpers
class Group:
    """A param group's tensors for the functional API, with grads drawn per step."""

    def __init__(self, shapes, *, dtype=torch.float32, dtypes=None, state_dtype=torch.float32,
                 probes=8, scope="group", amsgrad=False, seed=0, offsets=None):
        gen = torch.Generator().manual_seed(seed)
        dtypes = dtypes or [dtype] * len(shapes)
        self.params = [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dt)
                       for s, dt in zip(shapes, dtypes)]
        zeros = lambda: [torch.zeros_like(p, dtype=state_dtype) for p in self.params]  # noqa
        self.exp_avgs, self.exp_avg_sqs = zeros(), zeros()
        self.max_exp_avg_sqs = zeros() if amsgrad else []
        self.steps = [torch.zeros((), device=DEVICE) for _ in self.params]
        self.stats = L.new_stats(1 if scope == "group" else len(shapes), probes, DEVICE)
        self.scope_rows = [0] * len(shapes) if scope == "group" else list(range(len(shapes)))
        self.offsets = offsets
        self.probes, self.amsgrad = probes, amsgrad

    def clone(self):
        twin = object.__new__(Group)
        twin.__dict__.update({k: ([t.clone() for t in v] if isinstance(v, list) and v
                                  and isinstance(v[0], torch.Tensor) else
                                  v.clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in self.__dict__.items()})
        return twin

    def tensors(self):
        return (self.params + self.exp_avgs + self.exp_avg_sqs + self.max_exp_avg_sqs
                + self.steps + [self.stats])

    def step(self, grads, backend, **hyper):
        kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, damping=2.0,
                      probe_lag=1, seed=1234)
        kwargs.update(hyper)
        sadam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                   self.steps, self.stats, scope_rows=self.scope_rows,
                   tensor_ids=list(range(len(self.params))), offsets=self.offsets,
                   amsgrad=self.amsgrad, probes=self.probes, backend=backend, **kwargs)


def grads_for(group, gen, scale=1.0):
    """Gradients with a consistent drift plus noise, so rho moves away from 0 and 1."""
    return [(0.3 + scale * torch.randn(p.shape, generator=gen)).to(device=DEVICE, dtype=p.dtype)
            for p in group.params]


def assert_bf16_within_ulp(actual, expected):
    """|actual - expected| <= 1 bf16 ulp of the reference value, element-wise."""
    a, e = actual.float(), expected.float()
    ulp = torch.pow(2.0, torch.floor(torch.log2(e.abs().clamp_min(2.0 ** -126))) - 7)
    assert torch.all((a - e).abs() <= ulp), f"max diff {(a - e).abs().max()}"


def assert_matches(actual: Group, expected: Group):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(getattr(actual, name), getattr(expected, name))):
            assert a.dtype == e.dtype and a.shape == e.shape
            if a.dtype == torch.bfloat16:
                assert_bf16_within_ulp(a, e)
            elif a.dtype == torch.float16:
                torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5, msg=f"{name}[{i}]")
            else:
                torch.testing.assert_close(a, e, rtol=REL_TOL, atol=1e-7, msg=f"{name}[{i}]")
    for a, e in zip(actual.steps, expected.steps):
        assert a.item() == e.item()
    assert_stats_match(actual.stats, expected.stats, actual.probes)


def assert_stats_match(actual, expected, k):
    for col in (L.rho_col(k), L.rho_applied_col(k)):
        torch.testing.assert_close(actual[:, col], expected[:, col], rtol=0, atol=RHO_TOL)
    torch.testing.assert_close(actual[:, L.gamma_applied_col(k)],
                               expected[:, L.gamma_applied_col(k)], rtol=0, atol=3 * RHO_TOL)
    for col in (L.count_col(k), L.epoch_col(k)):
        assert torch.equal(actual[:, col], expected[:, col])
    assert_true_moments_close(actual, expected, k)


def assert_true_moments_close(stats, stats_ref, k):
    """a * 2**E and b * 2**(2E) within 1e-5 of the largest of their row, as in the native kernels'
    tests (the stored a, b are scaled by a power of two that d's rounding may move)."""
    for kept, ref in zip(L.unscaled(stats, k), L.unscaled(stats_ref, k)):
        scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        assert ((kept - ref).abs() <= 1e-5 * scale).all(), (kept, ref)


def run_both(group: Group, steps: int, grad_seed=0, lockstep=False, **hyper):
    """``steps`` steps on both backends. ``lockstep`` compares after every step and restarts the
    reference from the kernel's state: the per-step contract of bf16 storage, whose one-ulp
    differences would otherwise compound across steps."""
    expected = group.clone()
    gen = torch.Generator().manual_seed(grad_seed)
    for _ in range(steps):
        grads = grads_for(group, gen)
        group.step(grads, "triton", **hyper)
        expected.step(grads, "torch", **hyper)
        if lockstep:
            assert_matches(group, expected)
            for e, a in zip(expected.tensors(), group.tensors()):
                e.copy_(a)
    assert_matches(group, expected)
    return group, expected


EDGE_SHAPES = [(0,), (1,), (16385,), (3000,), (33, 65), (7, 3, 5)]  # 16385: a full chunk + 1


# --------------------------------------------------------------------------------- the hash
def test_hash_bits_match_reference_including_indices_above_2_pow_32():
    from sadam.triton_kernels import _hash
    index = torch.cat([torch.arange(0, 300), torch.arange(2 ** 32 - 150, 2 ** 32 + 150),
                       torch.tensor([2 ** 40 + 7, 2 ** 62 + 12345])]).to(DEVICE)
    out = torch.empty_like(index)
    for seed, epoch, tensor_id in [(0, 0, 0), (1234, 3, 17), (2 ** 32 - 1, 1000, 2 ** 20)]:
        _hash.probe_hash_kernel[(-(-index.numel() // 256),)](
            index, out, _hash.key_base(seed, tensor_id), epoch, index.numel(), BLOCK=256)
        expected = probe_hash(index, probe_key(seed, epoch, tensor_id))
        assert torch.equal(out, expected)


def test_directional_derivatives_and_signs_match_reference():
    """d of the fused pass and of the probe pass, with a global offset past 2**32."""
    group = Group([(5000,), (3, 700)], probes=32, scope="tensor", offsets=[2 ** 32 - 2000, 7])
    gen = torch.Generator().manual_seed(3)
    grads = grads_for(group, gen)
    step_args = dict(params=group.params, grads=grads, exp_avgs=group.exp_avgs,
                     exp_avg_sqs=group.exp_avg_sqs, max_exp_avg_sqs=[], steps=group.steps,
                     stats=group.stats, scope_rows=group.scope_rows, tensor_ids=[0, 1],
                     offsets=group.offsets, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, damping=1.0, amsgrad=False, maximize=False, probes=32,
                     probe_beta=0.9, window=0, seed=99)
    expected = reference.directional_derivatives(GroupStep(**step_args))
    probe_only = triton_backend().directional_derivatives(GroupStep(**step_args))
    fused = triton_backend().update(GroupStep(**step_args), damped=True, emit_probe=True)
    scale = torch.stack([g.float().abs().sum() for g in grads]).unsqueeze(1)
    for d in (probe_only, fused):
        assert d.shape == expected.shape
        assert torch.all((d - expected).abs() <= REL_TOL * scale)


# ------------------------------------------------------------------------ against reference
@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_edge_shapes_both_lags_both_scopes(lag, scope):
    run_both(Group(EDGE_SHAPES, scope=scope), steps=4, probe_lag=lag)


def test_amsgrad_maximize():
    run_both(Group([(16385,), (31, 7)], amsgrad=True), steps=4, maximize=True)


@pytest.mark.parametrize("dtype,lag,scope", [(torch.bfloat16, 1, "group"),
                                              (torch.float16, 0, "tensor")])
def test_low_precision_params(dtype, lag, scope):
    run_both(Group([(16390,), (17, 33)], dtype=dtype, scope=scope), steps=3, probe_lag=lag,
             lockstep=True)


def test_bf16_states_and_mixed_dtypes_in_one_group():
    """Two dtype buckets (two launches) feeding one scope row, with bf16 moments."""
    group = Group([(300,), (16400,), (5, 9)], dtypes=[torch.float32, torch.bfloat16, torch.float32],
                  state_dtype=torch.bfloat16)
    run_both(group, steps=4, lockstep=True)


def test_many_tensors_in_one_group():
    gen = torch.Generator().manual_seed(5)
    shapes = [(int(n),) for n in torch.randint(1, 300, (24,), generator=gen)]
    run_both(Group(shapes, probes=4, scope="tensor"), steps=3)


@pytest.mark.parametrize("lag", [0, 1])
def test_window_redraws_directions(lag):
    group, _ = run_both(Group([(3000,), (10, 10)], probes=4), steps=8, probe_lag=lag,
                        probe_window=3)
    assert group.stats[0, L.epoch_col(4)].item() == 2


@pytest.mark.parametrize("probes", [1, 32])
def test_probe_count_extremes(probes):
    run_both(Group([(1500,), (4, 5)], probes=probes), steps=4)


def test_default_betas_against_reference():
    run_both(Group([(2000,), (3, 5)]), steps=5, beta1=0.9, beta2=0.999, damping=0.5)


@pytest.mark.parametrize("lr_device", [DEVICE, "cpu"])
def test_tensor_hyperparameters_and_grad_scale(lr_device):
    """Device-scalar hyperparameters (and an lr kept on the CPU, as schedulers may)."""
    scalars = dict(lr=torch.tensor(3e-3, device=lr_device), beta1=torch.tensor(0.8, device=DEVICE),
                   beta2=torch.tensor(0.95, device=DEVICE),
                   weight_decay=torch.tensor(0.05, device=DEVICE),
                   damping=torch.tensor(1.5, device=DEVICE),
                   grad_scale=torch.tensor(8.0, device=DEVICE),
                   found_inf=torch.zeros((), device=DEVICE))
    run_both(Group([(2049,), (3, 3)]), steps=4, **scalars)


def test_non_contiguous_and_unaligned_parameters():
    group = Group([(40, 70), (300,)])
    group.params[0] = group.params[0].t()  # a transposed view: row-major order differs
    group.exp_avgs[0] = torch.zeros_like(group.params[0])
    group.exp_avg_sqs[0] = torch.zeros_like(group.params[0])
    buffer = torch.zeros(301, device=DEVICE)
    buffer[1:] = group.params[1]
    group.params[1] = buffer[1:]  # contiguous, but 4 bytes past an aligned address
    run_both(group, steps=3)


def test_alignment_is_decided_per_tensor():
    """One offset slice must not take the vector path away from the aligned tensors beside it."""
    from sadam.triton_kernels import _tables, update
    group = Group([(16384 * 2,), (16390,), (300,)])
    buffer = torch.zeros(16391, device=DEVICE)
    buffer[1:] = group.params[1]
    group.params[1] = buffer[1:]  # 4 bytes past an aligned address, two chunks long
    step = GroupStep(group.params, [torch.ones_like(p) for p in group.params], group.exp_avgs,
                     group.exp_avg_sqs, [], group.steps, group.stats, group.scope_rows,
                     [0, 1, 2], [0, 0, 0], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                     weight_decay=0.0, damping=0.0, amsgrad=False, maximize=False, probes=8,
                     probe_beta=0.9, window=0, seed=1)
    flags = _tables.addresses_of(step, torch.device(DEVICE))[:, update.ALIGNED.value]
    assert flags.tolist() == [1, 0, 1]
    run_both(group, steps=2)


@pytest.mark.parametrize("probes", [1, 32])
def test_probe_off_launch_does_not_depend_on_k(probes, monkeypatch):
    """probe="off" updates like AdamW whatever k is, with the same launch configuration."""
    from sadam.triton_kernels import update
    launches = []
    kernel = update.multi_tensor_step_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append({k: kwargs[k] for k in ("K", "K_PAD", "BLOCK", "ITERS")})
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(update, "multi_tensor_step_kernel", Spy())
    run_both(Group([(3000,), (5, 7)], probes=probes), steps=2, probe="off")
    assert launches and all(c == dict(K=0, K_PAD=2, BLOCK=512, ITERS=32) for c in launches)


def test_default_betas_match_torch_adamw():
    """damping=0 with the default betas (0.9, 0.999) against torch's AdamW, zero biases included:
    the bias corrections 1 - 0.999**t are where fp32 coefficients lose ~1e-4 relative."""
    from sadam import SAdam
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(700, generator=gen).to(DEVICE), torch.zeros(33, device=DEVICE)]
    twins = [w.clone() for w in weights]
    for w in weights + twins:
        w.requires_grad_(True)
    ours = SAdam(weights, lr=1e-3, weight_decay=1e-2, damping=0.0, backend="triton")
    oracle = torch.optim.AdamW(twins, lr=1e-3, weight_decay=1e-2, foreach=False)
    for _ in range(12):
        for a, b in zip(weights, twins):
            a.grad = torch.randn(a.shape, generator=gen).to(DEVICE)
            b.grad = a.grad.clone()
        ours.step()
        oracle.step()
    for a, b in zip(weights, twins):
        torch.testing.assert_close(a, b, rtol=REL_TOL, atol=1e-7)


def test_reallocated_grads_between_steps():
    """Address tables are rebuilt when grads move; reused when the same tensors come back."""
    group = Group([(3000,), (8, 8)])
    expected = group.clone()
    gen = torch.Generator().manual_seed(11)
    kept = grads_for(group, gen)
    for i in range(4):
        grads = kept if i % 2 == 0 else grads_for(group, gen)
        if i == 2:
            for g, fresh in zip(kept, grads_for(group, gen)):
                g.copy_(fresh)  # same addresses, new values
        group.step(grads, "triton")
        expected.step(grads, "torch")
    assert_matches(group, expected)


@pytest.mark.parametrize("lag", [0, 1])
def test_found_inf_changes_nothing(lag):
    group = Group([(4097,), (5, 5)], amsgrad=True)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        group.step(grads_for(group, gen), "triton", probe_lag=lag)
    before = [t.clone() for t in group.tensors()]
    group.step(grads_for(group, gen), "triton", probe_lag=lag,
               found_inf=torch.ones((), device=DEVICE), grad_scale=torch.tensor(2.0, device=DEVICE))
    for b, a in zip(before, group.tensors()):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_gradient_keeps_its_row():
    group = Group([(100,), (200,)], scope="tensor")
    expected = group.clone()
    gen = torch.Generator().manual_seed(4)
    for i in range(4):
        grads = grads_for(group, gen)
        if i == 3:
            grads[0][5] = float("nan")
        group.step(grads, "triton")
        expected.step(grads, "torch")
    assert_stats_match(group.stats, expected.stats, group.probes)
    assert torch.isfinite(group.stats).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf * 0 and overflows of v = g * g
@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_statistics_range_matches_reference(lag, scope):
    """Spec section 3, Range: gradients from 1e-30 to 1e30 (a spike past the fp32 square) keep
    the statistics finite and rho in [0, 1], as the reference does, and rho does not depend on
    the scale. The 3-element tensor's gradient sums to 0 (a softmax bias): along its all-equal
    sign vectors d is rounding noise, which must count 0 as in the reference."""
    runs = {"unit": (1.0, 1.0), "tiny": (1e-30, 1.0), "huge": (1e30, 1.0), "spike": (1.0, 1e25)}
    traces = {}
    for name, (scale, spike) in runs.items():
        group = Group([(2048,), (37,), (3,)], scope=scope)
        expected = group.clone()
        gen = torch.Generator().manual_seed(6)
        trace = []
        for t in range(6):
            grads = [torch.randn(p.shape, generator=gen) for p in group.params]
            grads[-1] = grads[-1] - grads[-1].mean()
            grads = [(g * scale * (spike if t == 2 else 1.0)).to(DEVICE) for g in grads]
            group.step(grads, "triton", probe_lag=lag)
            expected.step(grads, "torch", probe_lag=lag)
            k = group.probes
            assert torch.isfinite(group.stats).all()
            rho = group.stats[:, L.rho_col(k)]
            assert ((rho >= 0) & (rho <= 1)).all()
            torch.testing.assert_close(rho, expected.stats[:, L.rho_col(k)], rtol=0, atol=RHO_TOL)
            assert torch.equal(group.stats[:, L.count_col(k)], expected.stats[:, L.count_col(k)])
            assert_true_moments_close(group.stats, expected.stats, k)
            trace.append(rho.clone())
        traces[name] = torch.stack(trace)
    for name in ("tiny", "huge"):
        assert (traces[name] - traces["unit"]).abs().max() <= 0.01, name


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf * 0 in the interpreter
def test_bf16_state_rounding_is_nearest_even():
    """beta1 = beta2 = 0 stores g and g*g into bf16 moments: bits must equal torch's rounding."""
    base = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.0e38, 1e-40,
                         float("inf"), 0.1, -7.3e-5, 65504.0, 1.0 + 2 ** -8 + 2 ** -20])
    g = torch.cat([base, torch.randn(2000, generator=torch.Generator().manual_seed(1))])
    group = Group([g.shape], state_dtype=torch.bfloat16)
    group.step([g.to(DEVICE)], "triton", beta1=0.0, beta2=0.0)
    assert torch.equal(group.exp_avgs[0].view(torch.int16), g.to(DEVICE, torch.bfloat16).view(torch.int16))
    assert torch.equal(group.exp_avg_sqs[0].view(torch.int16),
                       (g * g).to(DEVICE, torch.bfloat16).view(torch.int16))


# ------------------------------------------------------------------------ through the front
def test_sadam_optimizer_with_triton_backend_matches_torch_backend():
    from sadam import SAdam
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3))
    model = model.to(DEVICE)
    twin = type(model)(*[type(m)(*([m.in_features, m.out_features] if hasattr(m, "in_features")
                                   else [])) for m in model]).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    opts = [SAdam(m.parameters(), lr=1e-2, damping=1.0, scope="tensor", backend=b)
            for m, b in ((model, "triton"), (twin, "torch"))]
    x = torch.randn(64, 20, device=DEVICE)
    y = torch.randn(64, 3, device=DEVICE)
    for _ in range(4):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=REL_TOL, atol=1e-6)
    for a, b in zip(opts[0].lgi(), opts[1].lgi()):
        torch.testing.assert_close(a, b, rtol=0, atol=RHO_TOL)


def test_available_reasons(monkeypatch):
    backend = triton_backend()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = backend.available(torch.device("cpu"))
    assert not ok and "TRITON_INTERPRET" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.available(torch.device("cpu")) == (True, "")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_step_captures_in_a_cuda_graph():
    group = Group([(4097,), (33, 65)])
    expected = group.clone()
    gen = torch.Generator().manual_seed(8)
    grads = grads_for(group, gen)
    lr = torch.tensor(1e-2, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles and fills the table caches
        group.step(grads, "triton", lr=lr)
    torch.cuda.current_stream().wait_stream(stream)
    expected.step(grads, "torch", lr=lr)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        group.step(grads, "triton", lr=lr)
    for _ in range(3):
        fresh = grads_for(group, gen)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        expected.step(grads, "torch", lr=lr)
    torch.cuda.synchronize()
    assert_matches(group, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="'auto' picks Triton only for CUDA tensors")
def test_auto_picks_triton_on_cuda():
    from sadam import backends
    assert backends.resolve("auto", torch.device("cuda")) is triton_backend()
