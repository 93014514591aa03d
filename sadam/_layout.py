"""Layout of the probe statistics: one fp32 row per scope, all rows of a group in one tensor.

A group's statistics are a ``(num_scopes, 2 * probes + 5)`` fp32 tensor (one row for
``scope="group"``, one per parameter for ``scope="tensor"``), so kernels address them with one
pointer and a row index per tensor. Columns, with ``k = probes``:

    [0, k)      a_i   EMA of the directional derivatives d_i          (gradient probe)
    [k, 2k)     b_i   EMA of d_i**2                                   (gradient probe)
    COUNT       c     samples since the last reset (bias correction)
    EPOCH       r     direction epoch (the hash's r)
    RHO         the current LGI estimate: what the next lagged update uses
    RHO_APPLIED the rho the last step applied          -> SAdam.lgi()
    GAMMA_APPLIED exp(-damping * RHO_APPLIED)          -> SAdam.damping_factors()

In ``probe="loss"`` mode a_0 holds the EMA of rho_raw over probings, COUNT the number of
probings, and EPOCH the number of steps taken (it decides when ``probe_every`` is due).
"""
import torch

EXTRA = 5


def row_width(probes: int) -> int:
    return 2 * probes + EXTRA


def count_col(probes: int) -> int:
    return 2 * probes


def epoch_col(probes: int) -> int:
    return 2 * probes + 1


def rho_col(probes: int) -> int:
    return 2 * probes + 2


def rho_applied_col(probes: int) -> int:
    return 2 * probes + 3


def gamma_applied_col(probes: int) -> int:
    return 2 * probes + 4


def new_stats(num_scopes: int, probes: int, device) -> torch.Tensor:
    stats = torch.zeros(num_scopes, row_width(probes), dtype=torch.float32, device=device)
    stats[:, gamma_applied_col(probes)] = 1.0
    return stats
