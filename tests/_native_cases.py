"""Shared helpers of the native-kernel tests: a param group as explicit tensor lists, copied so
two backends start from identical states, and the tolerance checks of the specification."""
import copy

import pytest
import torch

from sadam import _layout as L
from sadam import _ops
from sadam.functional import sadam as functional_sadam
from sadam.backends.step import GroupStep


def require(device: str):
    """Skip unless sadam._C was built with kernels for `device` and the device exists."""
    from sadam.backends import native
    ok, why = native.available(torch.device(device))
    if not ok:
        pytest.skip(f"native {device} kernels unavailable: {why}")


def make_group(shapes, *, dtype=torch.float32, state_dtype=torch.float32, probes=8,
               scope="group", amsgrad=False, seed=0, device="cpu", **hyper):
    """A GroupStep-shaped dict of tensors with random params and zero state."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    n = len(shapes)
    group = dict(
        params=params,
        grads=[torch.zeros_like(p) for p in params],
        exp_avgs=[torch.zeros(s, dtype=state_dtype, device=device) for s in shapes],
        exp_avg_sqs=[torch.zeros(s, dtype=state_dtype, device=device) for s in shapes],
        max_exp_avg_sqs=([torch.zeros(s, dtype=state_dtype, device=device) for s in shapes]
                         if amsgrad else []),
        steps=[torch.zeros((), device=device) for _ in shapes],
        stats=L.new_stats(1 if scope == "group" else n, probes, device),
        scope_rows=[0] * n if scope == "group" else list(range(n)),
        tensor_ids=list(range(n)), offsets=[0] * n,
        lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, damping=2.0,
        amsgrad=amsgrad, maximize=False, probes=probes, probe_beta=0.9, window=0, seed=seed)
    group.update(hyper)
    return group


def run_functional(group, backend, lag, probe="gradient"):
    """One step of the group through sadam.functional (the stage order every backend shares)."""
    functional_sadam(group["params"], group["grads"], group["exp_avgs"], group["exp_avg_sqs"],
                     group["max_exp_avg_sqs"], group["steps"], group["stats"],
                     scope_rows=group["scope_rows"], tensor_ids=group["tensor_ids"],
                     offsets=group["offsets"], lr=group["lr"], beta1=group["beta1"],
                     beta2=group["beta2"], eps=group["eps"], weight_decay=group["weight_decay"],
                     damping=group["damping"], amsgrad=group["amsgrad"],
                     maximize=group["maximize"], probe=probe, probes=group["probes"],
                     probe_beta=group["probe_beta"], probe_lag=lag,
                     probe_window=group["window"] or None, seed=group["seed"],
                     grad_scale=group.get("grad_scale"), found_inf=group.get("found_inf"),
                     backend=backend)


def step_of(group) -> GroupStep:
    return GroupStep(**group)


def new_grads(group, gen, scale=1.0):
    for g in group["grads"]:
        g.copy_((torch.randn(g.shape, generator=gen) * scale).to(g.dtype))


def copy_grads(dst, src):
    """Give ``dst`` the gradients of ``src`` (both groups then step from the same inputs)."""
    for a, e in zip(dst["grads"], src["grads"]):
        a.copy_(e)


def clone(group):
    return copy.deepcopy(group)


def assert_rel(actual, expected, rtol=1e-5, what=""):
    """max |a - e| <= rtol * max(|e|) elementwise scale (the spec's relative error)."""
    a, e = actual.double(), expected.double()
    scale = e.abs().clamp_min(e.abs().max() * 1e-3 if e.numel() else 0).clamp_min(1e-12)
    err = ((a - e).abs() / scale).max().item() if e.numel() else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def assert_within_ulp(actual, expected, what=""):
    """Reduced-precision tensors agree within one ulp of the expected rounding."""
    e = expected.float()
    ulp = torch.finfo(expected.dtype).eps * torch.exp2(torch.floor(torch.log2(e.abs())))
    ulp = torch.where(e == 0, torch.finfo(expected.dtype).tiny, ulp)
    bad = (actual.float() - e).abs() > ulp * 1.0001
    assert not bad.any(), f"{what}: {int(bad.sum())} elements more than 1 ulp apart"


def assert_d_close(d, d_ref, grads_abs_sum, what="d"):
    """d within 1e-5 of sum |g| of its row (spec section 6)."""
    err = (d.double() - d_ref.double()).abs()
    assert (err <= 1e-5 * grads_abs_sum.double().unsqueeze(1) + 1e-30).all(), \
        f"{what}: max error {err.max().item():.3g}"


def assert_stats_close(stats, stats_ref, probes):
    """Spec: rho absolute 1e-4. The EMAs a, b inherit d's error (1e-5 of sum |g|, not of d), so
    they are compared against the largest value of their row."""
    k = probes
    for cols in (slice(0, k), slice(k, 2 * k)):
        err = (stats[:, cols].double() - stats_ref[:, cols].double()).abs()
        scale = stats_ref[:, cols].double().abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
        assert (err <= 1e-5 * scale).all(), f"probe EMA columns {cols} differ"
    for col in (L.count_col(k), L.epoch_col(k)):
        assert torch.equal(stats[:, col], stats_ref[:, col]), f"column {col} differs"
    for col in (L.rho_col(k), L.rho_applied_col(k), L.gamma_applied_col(k)):
        assert (stats[:, col] - stats_ref[:, col]).abs().max() <= 1e-4, f"column {col} differs"


def row_abs_sums(group):
    sums = torch.zeros(group["stats"].shape[0], dtype=torch.float64)
    for row, g in zip(group["scope_rows"], group["grads"]):
        sums[row] += g.double().abs().sum().cpu()
    return sums


__all__ = ["require", "make_group", "step_of", "new_grads", "clone", "assert_rel",
           "assert_within_ulp", "assert_d_close", "assert_stats_close", "row_abs_sums", "_ops",
           "run_functional"]
