"""The batched linear algebra of PSS against torch.linalg.svd and plain-Python readings."""
import math

import pytest
import torch

from sadam import pss_linalg as LA


def matrix(m, n, s, seed=0):
    """An m x n fp32 matrix with singular values ``s`` (len(s) == min(m, n)), random vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return ((U * torch.tensor(s, dtype=torch.float64)) @ V.T).float()


# ------------------------------------------------------------------------------ sigma_1
def test_sigma1_of_each_matrix_whatever_the_scales_in_the_batch():
    """Each matrix's power-iteration vector is normalized on its own: a batch that mixes
    scales 1e-4, 1 and 1e4 gets every sigma_1 right (a normalization shared by the batch would
    flush the smaller matrices' vectors to zero in fp32)."""
    s = [10.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    W = torch.stack([matrix(12, 6, s, seed=i) * scale
                     for i, scale in enumerate((1e-4, 1.0, 1e4))])
    got = LA.top_singular_value(W, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, torch.linalg.svdvals(W)[:, 0], rtol=1e-4, atol=0)


def test_sigma1_depends_on_its_generator_not_on_the_global_rng():
    """The start vector is drawn from the generator passed in: the same seed gives the same
    bits whatever state the global RNG is in (what makes a seeded smoothing reproducible)."""
    # sigma_1 and sigma_2 close: ten power iterations leave the estimate on its start vector
    W = matrix(12, 6, [10.0, 9.8, 6.0, 3.0, 2.0, 1.0])[None]
    with torch.random.fork_rng():
        results = []
        for global_seed in (0, 1, 2):
            torch.manual_seed(global_seed)
            results.append(LA.top_singular_value(W, torch.Generator().manual_seed(3)))
    assert all(torch.equal(r, results[0]) for r in results)
    other = LA.top_singular_value(W, torch.Generator().manual_seed(4))
    assert not torch.equal(other, results[0])   # the start vector matters for this W


# ------------------------------------------------------------------------- dominant rank
def rank_formula(W, sigma1, max_rank):
    """k = min(max_rank, max(1, floor(srank)), min(m, n) - 1), srank = ||W||_F^2 / sigma_1^2
    (1 for a zero matrix), in plain Python."""
    fro2, s1 = float(W.double().square().sum()), float(sigma1)
    srank = fro2 / s1 ** 2 if s1 > 0 else 1.0
    assert srank == 1.0 or 0.05 < srank % 1 < 0.95, "test case too close to an integer srank"
    return min(max_rank, max(1, math.floor(srank)), min(W.shape) - 1)


TAIL = [1.0, 0.9, 0.8]
RANK_CASES = {
    # name: (m, n, singular values, sigma_1 as a multiple of the true one, max_rank)
    "typical": (12, 6, [10.0, 9.0, 8.0] + TAIL, 1.0, 16),
    "max_rank binds": (12, 6, [10.0, 9.0, 8.0] + TAIL, 1.0, 2),
    "one dominant value": (12, 6, [10.0, 2.0, 1.5] + TAIL, 1.0, 16),
    "sigma_1 below 1": (12, 6, [0.1, 0.09, 0.08, 0.01, 0.009, 0.008], 1.0, 16),
    "two rows": (2, 7, [3.0, 2.9], 1.0, 16),
    # the power iteration's estimate is at most sigma_1: srank may pass min(m, n)
    "flat, square": (4, 4, [2.0, 2.0, 2.0, 2.0], 0.9, 16),
    "flat, wide": (3, 6, [1.0, 1.0, 1.0], 0.8, 16),
    "flat, tall": (6, 3, [1.0, 1.0, 1.0], 0.8, 16),
    "nearly flat, the side binds": (8, 5, [2.0, 2.0, 1.99, 1.98, 1.5], 1.0, 16),
    # and round-off may put it above sigma_1, srank below 1
    "sigma_1 overestimated": (12, 6, [10.0, 9.0, 8.0] + TAIL, 4.0, 16),
    "zero matrix": (5, 4, [0.0] * 4, 0.0, 16),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
def test_dominant_rank_follows_the_formula(case):
    m, n, s, factor, max_rank = RANK_CASES[case]
    W = matrix(m, n, s)[None]
    sigma1 = torch.linalg.svdvals(W.double())[:, 0].float() * factor
    k = LA.dominant_rank(W, sigma1, max_rank)
    assert k.dtype == torch.int64
    assert k.tolist() == [rank_formula(W[0], sigma1[0], max_rank)]


def test_dominant_rank_per_matrix_of_a_batch():
    """Each matrix of a stack gets its own k (the cap is common, the stable ranks are not)."""
    cases = [RANK_CASES[c] for c in ("typical", "one dominant value", "sigma_1 below 1")]
    W = torch.stack([matrix(m, n, s, seed=i) for i, (m, n, s, _, _) in enumerate(cases)])
    sigma1 = torch.linalg.svdvals(W.double())[:, 0].float()
    k = LA.dominant_rank(W, sigma1, 16)
    assert k.tolist() == [rank_formula(w, s1, 16) for w, s1 in zip(W, sigma1)]


# ---------------------------------------------------------------------------- smoothing
def smoothed_row(row, k, smooth, strength):
    """Plain-Python reading: values i < k strictly above s_ref = row[k] > 0 go to f, blended."""
    s_ref, out = row[k], list(row)
    for i in range(k):
        if row[i] > s_ref > 0:
            f = {"log": s_ref * (1 + math.log(row[i] / s_ref)),
                 "sqrt": s_ref * math.sqrt(row[i] / s_ref), "clip": s_ref}[smooth]
            out[i] = row[i] + strength * (f - row[i])
    return out


SPECTRA = [  # (descending values, k)
    ([12.0, 9.0, 4.0, 4.0, 1.0], 2),
    ([0.5, 0.3, 0.2, 0.1, 0.05], 3),     # s_ref below 1
    ([6.0, 5.0, 2.0, 2.0, 2.0], 3),      # a top-k value tied with s_ref stays
    ([3.0, 3.0, 3.0, 3.0, 1.0], 2),      # all top-k values tied with s_ref: nothing to do
    ([3.0, 0.0, 0.0, 0.0, 0.0], 1),      # rank exactly k: s_ref = 0, f is undefined, left alone
    ([0.0, 0.0, 0.0, 0.0, 0.0], 1),      # zero matrix
    ([7.0, 6.0, 5.0, 4.0, 3.0], 1),
]


@pytest.mark.parametrize("smooth", LA.SMOOTHERS)
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_smooth_values_match_the_plain_python_reading(smooth, strength):
    S = torch.tensor([row for row, _ in SPECTRA])
    k = torch.tensor([k for _, k in SPECTRA])
    got = LA.smooth_values(S, k, smooth, strength)
    expected = torch.tensor([smoothed_row(row, k_i, smooth, strength) for row, k_i in SPECTRA])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_smooth_values_rejects_an_unknown_smoother_by_name():
    with pytest.raises(ValueError,
                       match=r"^smooth must be one of \('log', 'clip', 'sqrt'\), got 'tanh'$"):
        LA.smooth_values(torch.tensor([[2.0, 1.0]]), torch.tensor([1]), "tanh", 1.0)
