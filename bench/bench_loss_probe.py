"""Cost of a loss-probe step against the same estimator written the authors' way, on the study's
models (the ReLU MLP and the 2-bit QAT CNN on digits-sized input, batch 32).

    .venv/bin/python -m pytest bench/bench_loss_probe.py --benchmark-timer=time.process_time \
        --benchmark-columns=median,iqr,rounds

Process (CPU) time, not wall time: on a shared machine a step of a few milliseconds is often
descheduled, and wall time then measures the other jobs. The yardsticks use the same clock.

Every benchmark times one full training step (closure: forward and backward; probing every step,
k = 8; the update). The yardsticks, measured right before each benchmark on the same model and
batch: torch's fused AdamW step with the same closure, and one loss evaluation without gradients.
``extra_info`` (bench/plot.py convention, plus the overhead):

* ``params`` -- parameter elements of the model;
* ``ratio_vs_fused_adamw`` -- median step time / median fused AdamW step time;
* ``probe_overhead_vs_step`` -- (median step time - fused AdamW step - forwards x one loss
  evaluation) / fused AdamW step, with forwards = k (``"directions"``) or 2k (``"symmetric"``):
  what the probing costs beyond its forward passes, as a share of one step (target: <= 0.10).

"authors-style" is written from the estimator's description (not the authors' code): for each
param group and probe, every tensor gets ``torch.randn_like`` normalised by its norm, is moved by
``+delta`` in place, the loss is evaluated, the tensor moved back by ``-delta``; then an AdamW step
(torch's, foreach) with the learning rate times ``exp(-damping * rho)``. Threads: the benchmarks
run with ``SADAM_BENCH_THREADS`` threads (default 1: the numbers of a shared machine are steadier).
"""
import math
import os
import statistics
import time

import pytest
import torch
from torch import nn

from sadam import SAdam
from sadam.study.models import qat_cnn, relu_mlp
from sadam.study.quant import calibrate_activations

K, DELTA, DAMPING, ROUNDS = 8, 0.01, 2.0, 40


@pytest.fixture(autouse=True, scope="module")
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SADAM_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def _problem(name):
    torch.manual_seed(0)
    if name == "mlp":
        model, x = relu_mlp(64, 10), torch.randn(32, 64)
    else:
        model, x = qat_cnn(2, 8, 10), torch.randn(32, 1, 8, 8)
        calibrate_activations(model, x)
    return model, x, torch.randint(0, 10, (32,))


class AuthorsStyleSAdam:
    """The "directions" estimator and damping as described, written plainly."""

    def __init__(self, params, lr=1e-3, weight_decay=1e-2):
        self.adamw = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
        self.lr = lr

    def zero_grad(self):
        self.adamw.zero_grad()

    def step(self, closure):
        with torch.enable_grad():
            f0 = float(closure())
        for group in self.adamw.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            values = []
            with torch.no_grad():
                for _ in range(K):
                    directions = []
                    for p in params:
                        d = torch.randn_like(p)
                        d.div_(d.norm())
                        p.add_(d, alpha=DELTA)
                        directions.append(d)
                    values.append((float(closure(backward=False)) - f0) / DELTA)
                    for p, d in zip(params, directions):
                        p.sub_(d, alpha=DELTA)
            v = torch.tensor(values)
            rho = float((v.var() / (v.pow(2).mean() + 1e-6)).clamp(0, 10))
            group["lr"] = self.lr * math.exp(-DAMPING * rho)
        self.adamw.step()


OPTIMIZERS = {
    "fused-adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    "authors-style-directions": lambda params: AuthorsStyleSAdam(params),
    "sadam-directions": lambda params: SAdam(params, lr=1e-3, probe="loss", probes=K,
                                             probe_estimator="directions", probe_delta=DELTA,
                                             damping=DAMPING),
    "sadam-symmetric": lambda params: SAdam(params, lr=1e-3, probe="loss", probes=K,
                                            damping=DAMPING),
}
FORWARDS = {"fused-adamw": 0, "authors-style-directions": K, "sadam-directions": K,
            "sadam-symmetric": 2 * K}


def _closure(model, x, y, opt):
    def closure(backward=True):
        if not backward:
            return nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _median_seconds(fn, rounds=ROUNDS):
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _yardsticks(model, x, y):
    """Fused AdamW's step and one loss evaluation without gradients, measured now."""
    opt = OPTIMIZERS["fused-adamw"](model.parameters())
    closure = _closure(model, x, y, opt)
    step = _median_seconds(lambda: opt.step(closure))
    with torch.no_grad():
        forward = _median_seconds(lambda: nn.functional.cross_entropy(model(x), y))
    return step, forward


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_loss_probe_step(benchmark, model_name, name):
    model, x, y = _problem(model_name)
    step, forward = _yardsticks(model, x, y)
    opt = OPTIMIZERS[name](model.parameters())
    closure = _closure(model, x, y, opt)
    benchmark.pedantic(lambda: opt.step(closure), rounds=ROUNDS, iterations=1, warmup_rounds=3)
    median = benchmark.stats.stats.median
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    benchmark.extra_info["series"] = f"{name} ({model_name})"
    benchmark.extra_info["ratio_vs_fused_adamw"] = median / step
    benchmark.extra_info["forward_ms"] = forward * 1e3
    benchmark.extra_info["fused_adamw_step_ms"] = step * 1e3
    benchmark.extra_info["probe_overhead_vs_step"] = (median - step - FORWARDS[name] * forward) / step
