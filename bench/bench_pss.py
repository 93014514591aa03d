"""Cost of one PSS smoothing of every weight matrix of GPT-2 small (124M), beside one AdamW step.

    python -m pytest bench/bench_pss.py -q --benchmark-columns=min,mean,max

The weights are random Gaussian, whose stable rank is large, so every matrix gets the largest
rank k = max_rank = 16: the worst case. The AdamW step over the same parameters (foreach on CPU,
fused on CUDA) is measured in the same run as the yardstick.
"""
import pytest
import torch

from sadam import PSS

D, LAYERS, VOCAB, CONTEXT = 768, 12, 50257, 1024


def gpt2_small_matrices(device):
    """The weight matrices of GPT-2 small (biases and LayerNorms carry no matrix)."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(VOCAB, D), (CONTEXT, D)]
    shapes += [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * LAYERS
    return [torch.nn.Parameter(torch.randn(s, generator=g, device=device) * 0.02)
            for s in shapes]


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_pss_smoothing_gpt2_small(benchmark, device):
    params = gpt2_small_matrices(device)
    assert sum(p.numel() for p in params) > 120e6
    pss = PSS(params)

    def run():
        report = pss.smooth_now()
        _sync(device)
        return report

    report = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
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
