"""Batched linear algebra of PSS on fp32 stacks of same-shaped matrices ``(B, m, n)``.

sigma_1 by power iteration (for the stable rank), a rank-l factorization by randomized subspace
iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4), the smoothing functions, and the rank-k
correction. Everything is batched over B with bmm / batched QR, so a stack of a transformer's
same-shaped layers costs one set of launches.
"""
import torch

SMOOTHERS = ("log", "clip", "sqrt")
SIGMA1_ITERS = 10  # power iterations for sigma_1; only the floor of the stable rank depends on it
_TINY = 1e-30


def top_singular_value(W: torch.Tensor, generator: torch.Generator,
                       iters: int = SIGMA1_ITERS) -> torch.Tensor:
    """sigma_1 of each matrix of ``W`` (B, m, n) by power iteration on W^T W; shape (B,)."""
    # v is kept as a row (B, 1, n) so both products read W in its own layout (v W^T, (W v)^T W)
    v = torch.randn(W.shape[0], 1, W.shape[2], generator=generator, device=W.device,
                    dtype=W.dtype)
    for _ in range(iters):
        v = v / torch.linalg.vector_norm(v, dim=2, keepdim=True).clamp_min(_TINY)
        v = torch.bmm(torch.bmm(v, W.mT), W)
    v = v / torch.linalg.vector_norm(v, dim=2, keepdim=True).clamp_min(_TINY)
    return torch.linalg.vector_norm(torch.bmm(v, W.mT), dim=(1, 2))


def dominant_rank(W: torch.Tensor, sigma1: torch.Tensor, max_rank: int) -> torch.Tensor:
    """k = min(max_rank, max(1, floor(srank)), min(m, n) - 1), srank = ||W||_F^2 / sigma_1^2.

    A zero matrix has no dominant direction; it gets k = 1 and is left alone later because its
    reference level sigma_2 is 0.
    """
    fro2 = torch.linalg.vector_norm(W, dim=(1, 2)).square()
    srank = torch.where(sigma1 > 0, fro2 / sigma1.square().clamp_min(_TINY),
                        torch.ones_like(fro2))
    cap = min(max_rank, min(W.shape[1], W.shape[2]) - 1)
    return srank.floor().clamp(1, cap).to(torch.int64)


def randomized_svd(W: torch.Tensor, rank: int, power_iters: int, generator: torch.Generator):
    """Top ``rank`` singular triplets of each matrix: U (B, m, l), S (B, l), Vh (B, l, n).

    Range finder with a Gaussian test matrix, re-orthonormalized after every multiplication
    (subspace iteration keeps the small singular directions from drowning in round-off), then the
    exact SVD of the small projected matrix Q^T W.
    """
    omega = torch.randn(W.shape[0], W.shape[2], rank, generator=generator, device=W.device,
                        dtype=W.dtype)
    Q = torch.linalg.qr(torch.bmm(W, omega)).Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(_t_times(Q, W)).Q
        Q = torch.linalg.qr(torch.bmm(W, Z)).Q
    # SVD of the thin (n, l) matrix W^T Q = (Q^T W)^T through its QR: only the l x l factor R
    # goes to the SVD (in fp64, it is tiny). LAPACK's SVD of the thin or wide matrix itself is
    # erratic on CPU (up to seconds for l = 6).
    Q_b, R = torch.linalg.qr(_t_times(Q, W))
    U_r, S, Vh_r = torch.linalg.svd(R.double())
    U_r, S, Vh_r = U_r.to(W.dtype), S.to(W.dtype), Vh_r.to(W.dtype)
    # W^T Q = (Q_b U_r) S Vh_r  =>  Q^T W = Vh_r^T S (Q_b U_r)^T
    return torch.bmm(Q, Vh_r.mT), S, torch.bmm(Q_b, U_r).mT


def _t_times(Q: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """W^T Q as the transpose of Q^T W, which reads W in its own (row-major) layout."""
    return torch.bmm(Q.mT, W).mT


def smooth_values(S: torch.Tensor, k: torch.Tensor, smooth: str, strength: float) -> torch.Tensor:
    """New singular values: f blended by ``strength`` on the top k values above s_ref = S[k].

    ``S`` (B, l) is sorted descending with l > k; values from index k on are returned unchanged.
    """
    s_ref = S.gather(1, k[:, None])
    active = (torch.arange(S.shape[1], device=S.device)[None, :] < k[:, None])
    active &= (S > s_ref) & (s_ref > 0)
    safe_ref = torch.where(s_ref > 0, s_ref, torch.ones_like(s_ref))
    ratio = torch.where(active, S / safe_ref, torch.ones_like(S))
    if smooth == "log":
        target = safe_ref * (1 + torch.log(ratio))
    elif smooth == "sqrt":
        target = safe_ref * torch.sqrt(ratio)
    elif smooth == "clip":
        target = safe_ref.expand_as(S)
    else:
        raise ValueError(f"smooth must be one of {SMOOTHERS}, got {smooth!r}")
    return torch.where(active, S + strength * (target - S), S)


def correct_(W: torch.Tensor, U: torch.Tensor, delta: torch.Tensor, Vh: torch.Tensor):
    """W += U diag(delta) Vh for each matrix of the batch, in place (a rank-l correction)."""
    return W.baddbmm_(U * delta[:, None, :], Vh)


def subspace_width(k_max: int, oversample: int, m: int, n: int) -> int:
    """Columns of the range finder: k + oversample, at most min(m, n) (then the SVD is exact)."""
    return min(k_max + oversample, min(m, n))

