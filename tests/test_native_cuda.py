"""The native CUDA kernels against the reference backend on the same GPU (skipped without one)."""
import pytest
import torch

from sadam.backends import native, reference

from _native_cases import (assert_d_close, assert_rel, assert_stats_close, assert_within_ulp,
                           clone, make_group, new_grads, require, row_abs_sums, step_of)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda_kernels():
    require("cuda")


def run_step(group, impl, lag):
    step = step_of(group)
    if lag == 0:
        d = impl.directional_derivatives(step)
        impl.finalize(step, d, lag=0)
        impl.update(step, damped=True, emit_probe=False)
    else:
        d = impl.update(step, damped=True, emit_probe=True)
        impl.finalize(step, d, lag=1)
    return d


def compare(ours, ref):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for i, (a, e) in enumerate(zip(ours[name], ref[name])):
            if e.dtype in (torch.bfloat16, torch.float16):
                assert_within_ulp(a.cpu(), e.cpu(), f"{name}[{i}]")
            else:
                assert_rel(a.cpu(), e.cpu(), 1e-5, f"{name}[{i}]")
    for a, e in zip(ours["steps"], ref["steps"]):
        assert torch.equal(a, e)
    assert_stats_close(ours["stats"].cpu(), ref["stats"].cpu(), ours["probes"])


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("scope", ["group", "tensor"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(lag, scope, amsgrad, dtype):
    # 30 tensors and a 70k-element one: several multi-tensor tables and chunks
    shapes = [(37,), (0,), (70_000,)] + [(i + 1, 3) for i in range(27)]
    ref = make_group(shapes, device="cuda", dtype=dtype, scope=scope, amsgrad=amsgrad, window=3,
                     maximize=True, grad_scale=torch.tensor(8.0, device="cuda"))
    ours = clone(ref)
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        new_grads(ref, gen, scale=8.0)
        for a, e in zip(ours["grads"], ref["grads"]):
            a.copy_(e)
        d_ref = run_step(ref, reference, lag)
        d = run_step(ours, native, lag)
        assert_d_close(d.cpu(), d_ref.cpu(), row_abs_sums(ref) / 8.0)
        compare(ours, ref)
        if dtype != torch.float32:  # 1 ulp per step, from identical inputs
            for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
                for a, e in zip(ours[name], ref[name]):
                    a.copy_(e)
            ours["stats"].copy_(ref["stats"])


def test_more_chunks_than_one_table_and_deterministic():
    group = make_group([(21_000_000,), (5,)], device="cuda", scope="tensor")
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
        run_step(group, native, lag)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"):
        for a, e in zip(group[name], before[name]):
            assert torch.equal(a, e), name
    assert torch.equal(group["stats"], before["stats"])
