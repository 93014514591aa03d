"""Cost of one PSS smoothing of every weight matrix of GPT-2 small (124M), beside one AdamW step.

    python -m pytest bench/bench_pss.py -q --benchmark-columns=min,mean,max

Two spectra: "gaussian" weights (stable rank in the hundreds, so every matrix gets the largest
rank k = max_rank = 16: the worst case) and "spiked" ones (Gaussian plus a rank-1 spike holding
40% of the energy, stable rank 2.5, k = 2: closer to trained weights). The AdamW step over the same parameters (foreach on CPU,
fused on CUDA) is measured in the same run as the yardstick.
"""
import pytest
import torch

from sadam import PSS

D, LAYERS, VOCAB, CONTEXT = 768, 12, 50257, 1024


def gpt2_small_matrices(device, spectrum="gaussian"):
    """The weight matrices of GPT-2 small (biases and LayerNorms carry no matrix)."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(VOCAB, D), (CONTEXT, D)]
    shapes += [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * LAYERS
    params = [torch.randn(s, generator=g, device=device) * 0.02 for s in shapes]
    if spectrum == "spiked":
        for W in params:
            u = torch.randn(W.shape[0], 1, generator=g, device=device)
            v = torch.randn(1, W.shape[1], generator=g, device=device)
            scale = (W.square().sum() / 1.5).sqrt() / (u.norm() * v.norm())
            W.add_(scale * u @ v)
    return [torch.nn.Parameter(W) for W in params]


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("spectrum", ["gaussian", "spiked"])
@pytest.mark.parametrize("device", DEVICES)
def test_pss_smoothing_gpt2_small(benchmark, device, spectrum):
    params = gpt2_small_matrices(device, spectrum)
    assert sum(p.numel() for p in params) > 120e6
    pss = PSS(params)
    original = [p.detach().clone() for p in params]

    def restore():  # every round smooths the same weights (a smoothing raises the stable rank)
        torch._foreach_copy_([p.detach() for p in params], original)
        _sync(device)

    def run():
        report = pss.smooth_now()
        _sync(device)
        return report

    report = benchmark.pedantic(run, setup=restore, rounds=3, iterations=1, warmup_rounds=1)
    assert len(report.matrices) == len(params)
    assert all(m.sigma1_after < m.sigma1_before for m in report.matrices)
    benchmark.extra_info["matrices"] = len(params)
    benchmark.extra_info["ranks"] = sorted({m.k for m in report.matrices})


@pytest.mark.parametrize("device", DEVICES)
def test_adamw_step_gpt2_small(benchmark, device):
    params = gpt2_small_matrices(device)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda",
                            foreach=None if device == "cuda" else True)

    def run():
        opt.step()
        _sync(device)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
