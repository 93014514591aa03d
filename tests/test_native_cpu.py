"""The native CPU kernel against the reference backend (the oracle), spec section 6 tolerances."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

from sadam import SAdam
from sadam import _layout as L
from sadam import _ops
from sadam.backends import native, reference

from _native_cases import (assert_d_close, assert_rel, assert_stats_close, assert_within_ulp,
                           clone, copy_grads, make_group, new_grads, require, row_abs_sums,
                           run_functional, step_of)

pytestmark = pytest.mark.usefixtures("cpu_kernels")

# Odd sizes (vector tails, a chunk boundary at 2**15), an empty tensor and a matrix.
SHAPES = [(37,), (0,), (129, 7), (40_000,), (1,)]


@pytest.fixture
def cpu_kernels():
    require("cpu")


def assert_groups_match(ours, ref):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(ours[name], ref[name])):
            if e.dtype in (torch.bfloat16, torch.float16):
                assert_within_ulp(a, e, f"{name}[{i}]")
            else:
                assert_rel(a, e, 1e-5, f"{name}[{i}]")
    for a, e in zip(ours["steps"], ref["steps"]):
        assert torch.equal(a, e)
    assert_stats_close(ours["stats"], ref["stats"], ours["probes"])


def resync(ours, ref):
    """Copy the reference state into ours so each step is compared from identical inputs."""
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        for a, e in zip(ours[name], ref[name]):
            a.copy_(e)
    ours["stats"].copy_(ref["stats"])


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_reference_over_steps(lag, scope, amsgrad):
    ref = make_group(SHAPES, scope=scope, amsgrad=amsgrad, window=4)
    ours = clone(ref)
    gen = torch.Generator().manual_seed(1)
    for _ in range(9):  # redraws before steps 5 and 9
        new_grads(ref, gen)
        for g_ours, g_ref in zip(ours["grads"], ref["grads"]):
            g_ours.copy_(g_ref)
        run_functional(ref, "torch", lag)
        run_functional(ours, "cpu", lag)
        assert_groups_match(ours, ref)
    assert ref["stats"][:, L.epoch_col(8)].min() == 2  # the window did redraw


def test_hundred_steps_fp32_default_config():
    """The spec's tolerance is stated over 100 steps without resynchronizing."""
    ref = make_group([(300,), (33, 3)], damping=1.0)
    ours = clone(ref)
    gen = torch.Generator().manual_seed(2)
    for _ in range(100):
        new_grads(ref, gen)
        copy_grads(ours, ref)
        run_functional(ref, "torch", 1)
        run_functional(ours, "cpu", 1)
    assert_groups_match(ours, ref)


@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_reduced_precision_within_one_ulp(dtype, state_dtype):
    ref = make_group(SHAPES, dtype=dtype, state_dtype=state_dtype)
    ours = clone(ref)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        new_grads(ref, gen)
        copy_grads(ours, ref)
        run_functional(ref, "torch", 1)
        run_functional(ours, "cpu", 1)
        assert_groups_match(ours, ref)
        resync(ours, ref)


@pytest.mark.parametrize("emit", [True, False])
def test_maximize_grad_scale_tensor_hyperparameters(emit):
    hyper = dict(maximize=True, lr=torch.tensor(3e-3), beta1=torch.tensor(0.8),
                 weight_decay=torch.tensor(0.1), damping=torch.tensor(1.5),
                 grad_scale=torch.tensor(64.0))
    ref = make_group(SHAPES, **hyper)
    ref["stats"][:, L.rho_col(8)] = 0.4  # a damping that matters
    ours = clone(ref)
    new_grads(ref, torch.Generator().manual_seed(4), scale=64.0)
    copy_grads(ours, ref)
    d_ref = reference.update(step_of(ref), damped=True, emit_probe=emit)
    d = native.update(step_of(ours), damped=True, emit_probe=emit)
    assert (d is None) == (d_ref is None)
    if emit:
        assert_d_close(d, d_ref, row_abs_sums(ref) / 64.0)
    assert_groups_match(ours, ref)


def test_found_inf_changes_nothing():
    group = make_group(SHAPES, amsgrad=True, found_inf=torch.tensor(1.0))
    gen = torch.Generator().manual_seed(5)
    new_grads(group, gen)
    before = clone(group)
    for lag in (0, 1):
        run_functional(group, "cpu", lag)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        for a, e in zip(group[name], before[name]):
            assert torch.equal(a, e), name
    assert torch.equal(group["stats"], before["stats"])
    # d is still produced (the probe pass runs), equal to the reference's
    d = native.update(step_of(group), damped=True, emit_probe=True)
    d_ref = reference.update(step_of(clone(before)), damped=True, emit_probe=True)
    assert_d_close(d, d_ref, row_abs_sums(group))


def test_non_finite_gradient_keeps_the_row():
    ref = make_group([(100,), (50,)], scope="tensor")
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        new_grads(ref, gen)
        run_functional(ref, "torch", 1)
    ours = clone(ref)
    new_grads(ref, gen)
    ref["grads"][1][7] = float("inf")
    copy_grads(ours, ref)
    run_functional(ref, "torch", 1)
    run_functional(ours, "cpu", 1)
    assert torch.equal(ours["stats"][1, :L.rho_col(8) + 1], ref["stats"][1, :L.rho_col(8) + 1])
    assert_stats_close(ours["stats"], ref["stats"], 8)


@pytest.mark.parametrize("probes", [1, 7, 32])
def test_directional_derivatives_and_hash_above_2_32(probes):
    """Offsets straddling 2**32 take the kernel's slow hash path; all k signs must match."""
    group = make_group([(300,), (1000,), (5,)], probes=probes, scope="tensor", window=2,
                       offsets=[2**32 - 100, 2**33 + 17, 3])
    group["stats"][:, L.count_col(probes)] = torch.tensor([1.0, 2.0, 5.0])  # row 1, 2 redraw
    new_grads(group, torch.Generator().manual_seed(7))
    d = native.directional_derivatives(step_of(group))
    d_ref = reference.directional_derivatives(step_of(group))
    assert_d_close(d, d_ref, row_abs_sums(group))


def test_many_tensors():
    ref = make_group([(i % 13 + 1, 3) for i in range(60)], scope="tensor")
    ours = clone(ref)
    for step in range(3):
        new_grads(ref, torch.Generator().manual_seed(8 + step))
        copy_grads(ours, ref)
        run_functional(ref, "torch", 1)
        run_functional(ours, "cpu", 1)
    assert_groups_match(ours, ref)


def test_thread_count_does_not_change_a_bit():
    shapes = [(200_000,), (70_001,), (3,)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            group = make_group(shapes)
            new_grads(group, torch.Generator().manual_seed(9))
            d = native.update(step_of(group), damped=True, emit_probe=True)
            results.append((group, d))
    finally:
        torch.set_num_threads(threads)
    (a, d_a), (b, d_b) = results
    assert torch.equal(d_a, d_b)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name


def test_adamw_equivalence_without_damping():
    """Independent oracle: SAdam(backend='cpu', damping=0) is torch.optim.AdamW."""
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ours = SAdam(model.parameters(), lr=1e-2, damping=0.0, backend="cpu")
    adamw = torch.optim.AdamW(twin, lr=1e-2)
    for _ in range(30):
        for p, q in zip(model.parameters(), twin):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        adamw.step()
    for p, q in zip(model.parameters(), twin):
        assert_rel(p.detach(), q.detach(), 1e-5, "param")


def test_non_contiguous_and_float64_tensors_match_the_reference():
    """Non-contiguous tensors run through contiguous copies, float64 through the reference."""
    for dtype in (torch.float32, torch.float64):
        ref = make_group([(6, 5), (9,)], dtype=dtype)
        ref["params"][0] = ref["params"][0].t()  # a transposed (non-contiguous) parameter
        ref["exp_avgs"][0] = ref["exp_avgs"][0].t()
        ref["exp_avg_sqs"][0] = ref["exp_avg_sqs"][0].t()
        ref["grads"][0] = torch.zeros(5, 6, dtype=dtype)
        ours = clone(ref)
        for _ in range(3):
            new_grads(ref, torch.Generator().manual_seed(11))
            copy_grads(ours, ref)
            run_functional(ref, "torch", 1)
            run_functional(ours, "cpu", 1)
        assert not ours["params"][0].is_contiguous()
        assert_groups_match(ours, ref)


def test_rejected_arguments_name_themselves_and_change_nothing():
    group = make_group([(10,), (4,)])
    group["exp_avgs"][1] = torch.zeros(5)
    new_grads(group, torch.Generator().manual_seed(12))
    before = clone(group)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[1\] has 5 elements"):
        native.update(step_of(group), damped=True, emit_probe=True)
    for name in ("params", "exp_avg_sqs", "steps"):
        for a, e in zip(group[name], before[name]):
            assert torch.equal(a, e), name


@contextlib.contextmanager
def cpu_capability(name):
    """Run the CPU kernel compiled for `name` ("DEFAULT", "AVX2", "AVX512") inside the block."""
    ext = _ops.load()
    ext.set_cpu_capability(name)
    try:
        assert ext.cpu_capability() == name
        yield
    finally:
        ext.set_cpu_capability("")


def test_dispatch_follows_torch_cpu_capability():
    """The kernel that runs is torch's choice (torch.backends.cpu.get_cpu_capability(), lowered
    by ATEN_CPU_CAPABILITY), among the capabilities this build has."""
    ext = _ops.load()
    available = ext.cpu_capabilities()
    assert available[0] == "DEFAULT"
    torch_choice = torch.backends.cpu.get_cpu_capability()
    if torch_choice in ("AVX2", "AVX512"):
        assert ext.cpu_capability() == torch_choice
    code = ("import torch, sadam, sadam._ops as o; o.load(); "
            "print(torch.backends.cpu.get_cpu_capability(), o.load().cpu_capability())")
    for lowered in available:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env=dict(os.environ, ATEN_CPU_CAPABILITY=lowered.lower()))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [lowered, lowered]


def test_set_cpu_capability_rejects_unknown_and_unavailable_names():
    ext = _ops.load()
    with pytest.raises(ValueError, match="unknown capability 'avx9'"):
        ext.set_cpu_capability("avx9")
    if "AVX512" not in ext.cpu_capabilities():
        with pytest.raises(ValueError, match="not available"):
            ext.set_cpu_capability("AVX512")
    assert ext.cpu_capability() == ext.cpu_capabilities()[-1]


DISPATCH_CASES = [
    dict(lag=1), dict(lag=0), dict(lag=1, dtype=torch.bfloat16), dict(lag=0, amsgrad=True),
    dict(lag=1, probe="off"), dict(lag=0, probes=32, scope="tensor"),
    dict(lag=1, probes=3, state_dtype=torch.bfloat16, maximize=True),
]


DISPATCH_IDS = ["lag1", "lag0", "lag1-bf16", "lag0-amsgrad", "probe-off", "lag0-k32-tensor",
                "lag1-k3-bf16-moments-maximize"]


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=DISPATCH_IDS)
def test_every_cpu_capability_gives_the_same_bits(case):
    """DEFAULT (portable scalar lanes) and the widest build the CPU runs: identical parameters,
    moments and statistics over steps, whatever the vector width (one more capability, AVX2,
    sits between them on AVX-512 machines and is compared too)."""
    case = dict(case)
    lag, probe = case.pop("lag"), case.pop("probe", "gradient")
    capabilities = _ops.load().cpu_capabilities()
    if len(capabilities) < 2:
        pytest.skip(f"only {capabilities} on this CPU / build: nothing to compare")
    # odd sizes, a tile tail, several chunks, and element indices straddling 2**32
    shapes = SHAPES + [(70_001,)]
    offsets = [0, 0, 2**32 - 500, 5, 0, 2**32 + 3]
    results = {}
    for name in capabilities:
        group = make_group(shapes, offsets=offsets, **case)
        with cpu_capability(name):
            for step in range(3):
                new_grads(group, torch.Generator().manual_seed(40 + step))
                run_functional(group, "cpu", lag, probe)
        results[name] = group
    base = results["DEFAULT"]
    for name, group in results.items():
        for field in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
            for i, (x, y) in enumerate(zip(group[field], base[field])):
                assert torch.equal(x, y), f"{name} vs DEFAULT: {field}[{i}]"
        assert torch.equal(group["stats"], base["stats"]), f"{name} vs DEFAULT: stats"
