"""Tolerances of spec section 6 between a backend (or a sharded run) and the reference.

Parameter errors are relative to the tensor's scale (max |reference|), not element by element:
an element near zero may differ by a rounding of the larger terms it was computed from.
"""
import torch

PARAM_RTOL = 1e-5
RHO_ATOL = 1e-4


def assert_params_close(actual, expected, rtol=PARAM_RTOL, name="tensor"):
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = expected.abs().max().clamp_min(1e-12)
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"


def assert_rho_close(actual, expected, atol=RHO_ATOL):
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    assert actual.shape == expected.shape
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert err <= atol, f"rho differs by {err:.3g} > {atol:g}"
