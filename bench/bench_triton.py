"""Optimizer step time of SAdam's Triton backend against torch's AdamW (fused and foreach).

Run (GPU): ``.venv/bin/python -m pytest bench/bench_triton.py --benchmark-json=bench/results/<gpu>.json``

Shapes: GPT-2 Large (774M parameters) and a Llama-style stack (4 decoder layers of a 7B model
plus its embedding, 940M). fp32 and bf16 parameters. torch's AdamW and optimi keep their moments
in the parameter dtype; SAdam keeps fp32 moments (its default), so with bf16 parameters it moves
22 bytes per parameter where torch's AdamW moves 14.

Every optimizer, the baseline included, is timed the same way: CUDA events around one ``step()``
(no host clock), median over ROUNDS steps after warm-up. ``extra_info`` holds:

* ``median_s`` and ``ratio_vs_torch_fused`` -- the event median, and it over torch fused AdamW's
  event median measured in this run on the same tensors;
* ``bytes_per_param`` -- the traffic this configuration moves per parameter, counted exactly
  (``bytes_per_param()``), and ``gbps`` -- that traffic over the median time;
* ``peak_extra_bytes`` -- peak memory allocated during one step beyond what was live before it.
"""
import statistics

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="benchmarks need a CUDA GPU (GPU numbers are pending)")

ROUNDS = 20


def gpt2_large_shapes():
    d, layers, vocab, positions = 1280, 36, 50257, 1024
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)] + layer * layers + [(d,), (d,)]


def llama_stack_shapes():
    d, ff, layers, vocab = 4096, 11008, 4, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d)] + layer * layers + [(d,)]


MODELS = {"gpt2-large": gpt2_large_shapes, "llama-stack": llama_stack_shapes}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_params(shapes, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.empty(shape, device="cuda", dtype=dtype).normal_(0, 0.02, generator=gen)
        p.requires_grad_(True)
        p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)
        params.append(p)
    return params


def sadam(lag):
    def build(params, dtype):
        from sadam import SAdam
        return SAdam(params, lr=1e-4, weight_decay=0.01, damping=1.0, probe_lag=lag,
                     backend="triton")
    return build


def torch_adamw(**flags):
    def build(params, dtype):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)
    return build


def optimi_adamw(params, dtype):
    optimi = pytest.importorskip("optimi", reason="optimi is not installed")
    return optimi.AdamW(params, lr=1e-4, weight_decay=0.01)


OPTIMIZERS = {
    "sadam-triton-lag1": sadam(1),
    "sadam-triton-lag0": sadam(0),
    "torch-adamw-fused": torch_adamw(fused=True),
    "torch-adamw-foreach": torch_adamw(foreach=True),
    "optimi-adamw": optimi_adamw,
}


def bytes_per_param(name: str, dtype: torch.dtype) -> int:
    """Global traffic of one step per parameter: p, g, m, v read and p, m, v written, in each
    optimizer's dtypes, plus what the variant adds (lag 0 reads g a second time in its probe
    pass; optimi's Kahan summation reads and writes a compensation buffer for low-precision
    parameters). The k probe partials per 16384-element chunk are below a byte."""
    p = g = torch.finfo(dtype).bits // 8
    state = 4 if name.startswith("sadam") else p
    moved = 2 * p + g + 4 * state
    if name == "sadam-triton-lag0":
        moved += g
    if name == "optimi-adamw" and dtype != torch.float32:
        moved += 2 * p
    return moved


def timed_step(opt) -> float:
    """One step between two CUDA events, in seconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    opt.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_step_seconds(opt, rounds=ROUNDS):
    """Median of CUDA-event timed steps (after two warm-up steps)."""
    for _ in range(2):
        opt.step()
    return statistics.median(timed_step(opt) for _ in range(rounds))


_baseline = {}


def fused_baseline(model, dtype_name, params):
    """torch fused AdamW's median step time on these tensors, measured once per run."""
    key = (model, dtype_name)
    if key not in _baseline:
        opt = OPTIMIZERS["torch-adamw-fused"](params, DTYPES[dtype_name])
        _baseline[key] = median_step_seconds(opt)
        del opt
        torch.cuda.empty_cache()
    return _baseline[key]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_step(benchmark, name, model, dtype_name):
    dtype = DTYPES[dtype_name]
    params = make_params(MODELS[model](), dtype)
    numel = sum(p.numel() for p in params)
    baseline = fused_baseline(model, dtype_name, params)
    opt = OPTIMIZERS[name](params, dtype)
    for _ in range(2):  # state allocation and compilation outside the timing
        opt.step()
    torch.cuda.synchronize()

    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - before

    times = []
    benchmark.pedantic(lambda: times.append(timed_step(opt)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    median = statistics.median(times[-ROUNDS:])  # the warm-up round appended one too
    moved = bytes_per_param(name, dtype)
    benchmark.extra_info.update(
        model=model, dtype=dtype_name, params=numel, device=torch.cuda.get_device_name(),
        median_s=median, torch_fused_median_s=baseline, ratio_vs_torch_fused=median / baseline,
        bytes_per_param=moved, gbps=moved * numel / median / 1e9, peak_extra_bytes=peak_extra)
