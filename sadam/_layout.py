"""Layout of the probe statistics: one fp32 row per scope, all rows of a group in one tensor.

A group's statistics are a ``(num_scopes, 2 * probes + 6)`` fp32 tensor (one row for
``scope="group"``, one per parameter for ``scope="tensor"``), so kernels address them with one
pointer and a row index per tensor. Columns, with ``k = probes``:

    [0, k)      a_i   EMA of the directional derivatives d_i, in units of 2**E   (gradient probe)
    [k, 2k)     b_i   EMA of d_i**2, in units of 2**(2E)                         (gradient probe)
    COUNT       c     samples since the last reset (bias correction)
    EPOCH       r     direction epoch (the hash's r)
    RHO         the current LGI estimate: what the next lagged update uses
    RHO_APPLIED the rho the last step applied          -> SAdam.lgi()
    GAMMA_APPLIED exp(-damping * RHO_APPLIED)          -> SAdam.damping_factors()
    SCALE       E     the row's power-of-two scale (an integer held in fp32)

The true statistics are ``a_i * 2**E`` and ``b_i * 2**(2E)``: fp32 squares of the directional
derivatives would overflow near |d| = 1.8e19 and underflow below 1e-19, so every finalize moves E
with the size of this step's d and of the stored b (exact power-of-two rescaling, spec section 3)
and keeps a and b near 1. rho is a ratio of them, so it never needs the true values.

SCALE is the last column so that the other columns sit where they did in the 2k + 5 layout of
older checkpoints; :func:`upgrade_stats` appends E = 0 to such a tensor (exact: the stored values
were the true ones).

In ``probe="loss"`` mode a_0 holds the EMA of rho_raw over probings, COUNT the number of
probings, EPOCH the number of steps taken (it decides when ``probe_every`` is due) and SCALE
stays 0.
"""
import torch

EXTRA = 6
_OLD_EXTRA = 5  # the width before the SCALE column: 2k + 5


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


def scale_col(probes: int) -> int:
    return 2 * probes + 5


def new_stats(num_scopes: int, probes: int, device) -> torch.Tensor:
    stats = torch.zeros(num_scopes, row_width(probes), dtype=torch.float32, device=device)
    stats[:, gamma_applied_col(probes)] = 1.0
    return stats


def upgrade_stats(stats: torch.Tensor, probes: int) -> torch.Tensor:
    """Statistics in the current layout: a ``(scopes, 2k + 5)`` tensor of an older checkpoint
    gets a SCALE column of 0 appended; any other tensor is returned as it is."""
    if stats.dim() == 2 and stats.shape[1] == 2 * probes + _OLD_EXTRA:
        return torch.cat([stats, stats.new_zeros(stats.shape[0], 1)], dim=1)
    return stats


def unscaled(stats: torch.Tensor, probes: int):
    """The true statistics ``(a * 2**E, b * 2**(2E))`` of every row, in float64 (which holds
    them for any E the finalize chooses)."""
    k = probes
    exponent = stats[:, scale_col(k)].double().unsqueeze(1)
    return (stats[:, :k].double() * torch.exp2(exponent),
            stats[:, k:2 * k].double() * torch.exp2(2 * exponent))
