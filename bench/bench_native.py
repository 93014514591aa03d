"""Optimizer step time of SAdam's native kernels against torch's AdamW, on CPU and on a GPU.

Run: ``.venv/bin/python -m pytest bench/bench_native.py --benchmark-json=bench/results/<machine>.json``
(``SADAM_BENCH_SIZES=10M`` limits the sizes, ``SADAM_BENCH_THREADS=1`` sets the CPU threads).
CPU: every optimizer runs with the same ``torch.get_num_threads()``. Shapes are GPT-2 small (d=768) layers plus an embedding that fills the
size: 10M, 50M, and the whole 124M model. ``extra_info`` (bench/plot.py convention):

* ``params`` -- parameter elements one step updates;
* ``ratio_vs_fused_adamw`` -- median step time / median torch fused AdamW step time on the same
  tensors, the latter measured right before each benchmark (on a shared machine the load drifts);
* ``series`` -- ``"<optimizer> (<device>)"``.
"""
import gc
import os
import statistics
import time

import pytest
import torch

from sadam.backends import native

ROUNDS = {"cpu": 7, "cuda": 20}
if os.environ.get("SADAM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SADAM_BENCH_THREADS"]))
SIZES = {"10M": 10_000_000, "50M": 50_000_000, "124M": None}  # None: the whole GPT-2 small


def gpt2_small_shapes(target=None):
    d, layers, vocab, positions = 768, 12, 50257, 1024
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    if target is None:
        return [(vocab, d), (positions, d)] + layer * layers + [(d,), (d,)]
    per_layer = sum(torch.Size(s).numel() for s in layer)
    n = min(layers, target // per_layer)
    rest = target - n * per_layer
    return [(rest // d, d)] + layer * n


def make_params(shapes, device):
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.empty(shape).normal_(0, 0.02, generator=gen).to(device).requires_grad_(True)
        p.grad = torch.empty(shape).normal_(0, 1e-3, generator=gen).to(device)
        params.append(p)
    return params


def sadam(lag):
    def build(params, device):
        from sadam import SAdam
        return SAdam(params, lr=1e-4, weight_decay=0.01, damping=1.0, probe_lag=lag,
                     backend=device)
    return build


def torch_adamw(**flags):
    def build(params, device):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **flags)
    return build


OPTIMIZERS = {
    "sadam-native-lag1": sadam(1),
    "sadam-native-lag0": sadam(0),
    "torch-adamw-fused": torch_adamw(fused=True),
    "torch-adamw-foreach": torch_adamw(foreach=True),
    "torch-adamw-forloop": torch_adamw(foreach=False),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_step_seconds(opt, device):
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(ROUNDS[device]):
        sync(device)
        start = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_params = {}


def shared_params(device, size):
    """One set of parameters per (device, size) for all optimizers, so the ratio compares equals."""
    key = (device, size)
    if key not in _params:
        _params.clear()
        gc.collect()
        _params[key] = make_params(gpt2_small_shapes(SIZES[size]), device)
    return _params[key]


def fused_baseline(device, params):
    """torch fused AdamW's median step time on these tensors, measured now."""
    opt = OPTIMIZERS["torch-adamw-fused"](params, device)
    seconds = median_step_seconds(opt, device)
    del opt
    gc.collect()
    return seconds


def selected_sizes():
    chosen = os.environ.get("SADAM_BENCH_SIZES")
    return chosen.split(",") if chosen else list(SIZES)


@pytest.mark.parametrize("size", selected_sizes())
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_optimizer_step(benchmark, device, name, size):
    ok, why = native.available(torch.device(device))
    if not ok:
        pytest.skip(f"native {device} kernels unavailable: {why}")
    params = shared_params(device, size)
    numel = sum(p.numel() for p in params)
    baseline = fused_baseline(device, params)
    opt = OPTIMIZERS[name](params, device)
    for _ in range(2):  # state allocation outside the timing
        opt.step()

    def step():
        opt.step()
        sync(device)

    benchmark.pedantic(step, rounds=ROUNDS[device], iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        params=numel, series=f"{name} ({device})", device=device, size=size,
        threads=torch.get_num_threads(), fused_adamw_median_s=baseline,
        ratio_vs_fused_adamw=median / baseline)
    del opt
    gc.collect()
