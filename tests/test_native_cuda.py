"""The native CUDA kernels against the reference backend on the same GPU (skipped without one).

Steps run through :func:`sadam.functional.sadam`, the code path of the optimizer, so the order of
the stages of each probe lag is the library's own, not a copy of it here.
"""
import pytest
import torch


from _capture_case import capture_against_eager, step_twice_second_without_sync
from _native_cases import (assert_d_close, assert_groups_match, assert_rel, clone, copy_grads,
                           make_group, new_grads, require, resync, row_abs_sums, run_functional,
                           step_of)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda_kernels():
    require("cuda")


def step_both(ref, ours, gen, steps, lag=1, scale=1.0, reduced=False):
    """`steps` steps of the reference and of the CUDA kernels from the same gradients, compared
    after each; reduced-precision groups continue from the reference's state (one rounding per
    step)."""
    for _ in range(steps):
        new_grads(ref, gen, scale=scale)
        copy_grads(ours, ref)
        run_functional(ref, "torch", lag)
        run_functional(ours, "cuda", lag)
        assert_groups_match(ours, ref)
        if reduced:
            resync(ours, ref)


# 30 tensors and a 70k-element one: several multi-tensor tables, chunks and vector tails
SHAPES = [(37,), (0,), (70_001,)] + [(i + 1, 3) for i in range(27)]


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype,state_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("maximize,scale", [(False, None), (True, 8.0)])
def test_matches_reference(lag, scope, amsgrad, dtype, state_dtype, maximize, scale):
    grad_scale = None if scale is None else torch.tensor(scale, device="cuda")
    ref = make_group(SHAPES, device="cuda", dtype=dtype, state_dtype=state_dtype, scope=scope,
                     amsgrad=amsgrad, window=3, maximize=maximize, grad_scale=grad_scale)
    reduced = dtype != torch.float32 or state_dtype != torch.float32
    step_both(ref, clone(ref), torch.Generator().manual_seed(0), 5, lag, scale or 1.0, reduced)


def test_probe_counts_of_every_bucket():
    """k = 1, 9, 17, 32 fall into the 8, 16 and 32 accumulator buckets and the last's edge."""
    for k in (1, 9, 17, 32):
        ref = make_group([(5000,), (3, 7)], device="cuda", probes=k, scope="tensor")
        step_both(ref, clone(ref), torch.Generator().manual_seed(k), 3)


def test_misaligned_tensor_beside_aligned_ones():
    """Alignment is decided per tensor: a slice starting one element into its storage takes the
    scalar path, its neighbours the vector path, and all match the reference."""
    ref = make_group([(4099,), (4099,), (8192,)], device="cuda")
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        t = ref[name][1]
        shifted = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:]
        shifted.copy_(t)
        assert shifted.data_ptr() % 16 != 0
        ref[name][1] = shifted
    ours = clone(ref)
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        assert ours[name][1].data_ptr() % 16 != 0, name
    step_both(ref, ours, torch.Generator().manual_seed(3), 3)


@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_reduction_is_deterministic_over_many_chunks(scope):
    """Thousands of chunks over several rows: d matches the reference and is bitwise the same on
    every run (fixed-order reduction, no atomics)."""
    from sadam.backends import native, reference
    group = make_group([(21_000_000,), (5,), (3_000_001,)], device="cuda", scope=scope)
    new_grads(group, torch.Generator().manual_seed(1))
    first = native.directional_derivatives(step_of(group))
    ref = reference.directional_derivatives(step_of(group))
    assert_d_close(first.cpu(), ref.cpu(), row_abs_sums(group))
    for _ in range(3):
        assert torch.equal(native.directional_derivatives(step_of(group)), first)


def test_found_inf_changes_nothing():
    group = make_group([(1000,), (3, 3)], device="cuda", amsgrad=True,
                       found_inf=torch.tensor(1.0, device="cuda"))
    new_grads(group, torch.Generator().manual_seed(2))
    before = clone(group)
    for lag in (0, 1):
        run_functional(group, "cuda", lag)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        for a, e in zip(group[name], before[name]):
            assert torch.equal(a, e), name
    assert torch.equal(group["stats"], before["stats"])


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("lr", ["float", "tensor"])
def test_step_never_syncs(lag, lr):
    """After the first step (state creation), step() runs under sync debug mode 'error'."""
    rate = 1e-3 if lr == "float" else torch.tensor(1e-3, device="cuda")
    step_twice_second_without_sync("cuda", lag, rate)


@pytest.mark.parametrize("lag", [0, 1])
def test_capture_with_gradients_allocated_inside_the_capture(lag):
    """Forward, backward and step in one CUDA graph: replays match the same steps taken eagerly
    (parameters to the spec's 1e-5, step counts exactly, rho to 1e-4)."""
    result = capture_against_eager("cuda", probe_lag=lag)
    assert result["max_rel_error"] <= 1e-5, result
    assert result["steps_agree"], result
    assert abs(result["lgi"] - result["lgi_eager"]) <= 1e-4, result
