"""Optimizer step time of SAdam's native kernels against torch's AdamW (and DeepSpeed's CPUAdam),
on CPU and on a GPU.

Run: ``make bench``, or ``.venv/bin/python -m pytest bench/bench_native.py --benchmark-only
--benchmark-json=bench/results/<machine>.json``. ``SADAM_BENCH_SIZES=10M,50M`` limits the sizes,
``SADAM_BENCH_THREADS=1,2`` sets the CPU thread counts (default: 1 and 2). Shapes are GPT-2
small (d=768) fp32 layers plus an embedding that fills the size: 10M, 50M, and the whole 124M
model. Every optimizer runs with the same thread count.

The anchor is in the same run and interleaved: each timed step of an optimizer follows one step
of torch's fused AdamW on the same tensors (the ``setup`` of every round), so load changes on a
shared machine hit both alike. ``extra_info`` (bench/plot.py convention):

* ``params`` -- parameter elements one step updates;
* ``ratio_vs_fused_adamw`` -- median step time / median of the interleaved fused AdamW steps;
* ``series`` -- ``"<optimizer> (<device>, <threads>t)"``.

DeepSpeed's ``DeepSpeedCPUAdam`` (adamw_mode) is an optional dependency (``make bench`` installs
``deepspeed``); it JIT-builds its C++ op with ninja on first use and is skipped, with the reason,
when it cannot be imported or built.
"""
import ctypes
import gc
import os
import statistics
import time

import pytest
import torch

from sadam.backends import native

ROUNDS = {"cpu": 15, "cuda": 30}
SIZES = {"10M": 10_000_000, "50M": 50_000_000, "124M": None}  # None: the whole GPT-2 small
LR, WEIGHT_DECAY = 1e-4, 0.01


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


def sadam(**kwargs):
    def build(params, device):
        from sadam import SAdam
        return SAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, damping=1.0, backend=device,
                     **kwargs)
    return build


def torch_adamw(**flags):
    def build(params, device):
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **flags)
    return build


_deepspeed_error = None


def deepspeed_cpu_adam(params, device):
    """DeepSpeed's CPUAdam in AdamW mode; pytest.skip with the reason when it is unavailable."""
    global _deepspeed_error
    if device != "cpu":
        pytest.skip("DeepSpeedCPUAdam is a CPU optimizer")
    if _deepspeed_error is None:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            return DeepSpeedCPUAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, adamw_mode=True)
        except Exception as exc:  # import error, or its JIT build failed
            _deepspeed_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    pytest.skip(f"DeepSpeedCPUAdam unavailable (pip install deepspeed; it JIT-builds with "
                f"ninja): {_deepspeed_error}")


OPTIMIZERS = {
    "torch-adamw-fused": torch_adamw(fused=True),
    "sadam-native-lag1": sadam(probe_lag=1),
    "sadam-native-lag0": sadam(probe_lag=0),
    "sadam-native-probe-off": sadam(probe="off"),
    "deepspeed-cpu-adam": deepspeed_cpu_adam,
    "torch-adamw-foreach": torch_adamw(foreach=True),
}


def _openmp_runtimes():
    """OpenMP runtimes loaded beside torch's (DeepSpeed's op links the system one)."""
    libs = []
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        try:
            libs.append(ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL))
        except OSError:
            pass
    return libs


def set_threads(threads):
    torch.set_num_threads(threads)
    for lib in _openmp_runtimes():
        lib.omp_set_num_threads(threads)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(opt, device):
    sync(device)
    start = time.perf_counter()
    opt.step()
    sync(device)
    return time.perf_counter() - start


_params = {}


def shared_params(device, size):
    """One set of parameters per (device, size) for all optimizers, so the ratio compares equals."""
    key = (device, size)
    if key not in _params:
        _params.clear()
        gc.collect()
        _params[key] = make_params(gpt2_small_shapes(SIZES[size]), device)
    return _params[key]


def _env_list(name, default):
    chosen = os.environ.get(name)
    return chosen.split(",") if chosen else default


def cases():
    """Sizes outermost (tensors are built once per size), then threads, then optimizers."""
    out = []
    for device in ("cpu", "cuda"):
        threads = [int(t) for t in _env_list("SADAM_BENCH_THREADS", ["1", "2"])]
        for size in _env_list("SADAM_BENCH_SIZES", list(SIZES)):
            for t in threads if device == "cpu" else [0]:
                out += [pytest.param(device, size, t, name, id=f"{device}-{size}-{t}t-{name}")
                        for name in OPTIMIZERS]
    return out


@pytest.mark.parametrize("device,size,threads,name", cases())
def test_optimizer_step(benchmark, device, size, threads, name):
    ok, why = native.available(torch.device(device))
    if not ok:
        pytest.skip(f"native {device} kernels unavailable: {why}")
    if device == "cpu":
        set_threads(threads)
    params = shared_params(device, size)
    numel = sum(p.numel() for p in params)
    opt = OPTIMIZERS[name](params, device)
    anchor = OPTIMIZERS["torch-adamw-fused"](params, device)
    for _ in range(2):  # state allocation and first-use builds outside the timing
        opt.step()
        anchor.step()
    anchor_times = []

    def step_anchor_first():  # pedantic's untimed setup: one fused AdamW step, timed here
        anchor_times.append(timed_step(anchor, device))

    def step():
        opt.step()
        sync(device)

    benchmark.pedantic(step, setup=step_anchor_first, rounds=ROUNDS[device], iterations=1)
    median, anchor_median = benchmark.stats.stats.median, statistics.median(anchor_times)
    label = f"{device}, {threads}t" if device == "cpu" else device
    benchmark.extra_info.update(
        params=numel, series=f"{name} ({label})", device=device, size=size,
        threads=threads or None, fused_adamw_median_s=anchor_median,
        ratio_vs_fused_adamw=median / anchor_median,
        gb_per_s_at_28_bytes=28 * numel / median / 1e9)
    del opt, anchor
    gc.collect()
