"""One training run: a task, an optimizer, a learning rate and a seed -> one result record."""
import math
import time
from dataclasses import asdict, dataclass

import torch

from sadam import preserve_buffers

from . import data as datasets
from . import optimizers, tasks
from .metrics import OscillationMeter, probe_values
from .quant import calibrate_activations, quantized_layers


@dataclass(frozen=True)
class RunSpec:
    task: str
    optimizer: str
    lr: float
    seed: int
    steps: int

    @property
    def key(self) -> str:
        return f"{self.task}|{self.optimizer}|lr={self.lr:.4g}|seed={self.seed}|steps={self.steps}"


def _round(values, digits=5):
    return [None if v is None else round(v, digits) for v in values]


@torch.no_grad()
def evaluate(model, split, loss_fn):
    model.eval()
    logits = model(split.x)
    model.train()
    loss = float(loss_fn(logits, split.y))
    accuracy = float((logits.argmax(1) == split.y).float().mean())
    return accuracy, loss


def _sadam_backend(opt):
    if not hasattr(opt, "lgi"):
        return None
    from sadam.backends import resolve
    return resolve(opt.param_groups[0]["backend"], opt.param_groups[0]["params"][0].device) \
        .__name__.rsplit(".", 1)[-1]


@dataclass
class Setup:
    """Everything one run trains: data, model, loss and optimizer, built from a seed."""
    task: tasks.Task
    data: datasets.Data
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    opt: torch.optim.Optimizer

    def closure(self, x, y):
        """The training closure; with ``backward=False`` it is a loss-probe evaluation (no
        gradients, batch-norm style buffers left untouched)."""
        model, loss_fn, opt = self.model, self.loss_fn, self.opt

        def closure(backward=True):
            if not backward:
                with preserve_buffers(model):
                    return loss_fn(model(x), y)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        return closure


def prepare(task_name: str, optimizer: str, lr: float, seed: int) -> Setup:
    torch.set_num_threads(1)  # runs are tiny; one thread each keeps timings comparable
    task = tasks.get(task_name)
    data = datasets.load(task.dataset, task.label_noise)
    torch.manual_seed(seed)
    model = task.build_model(data)
    if task.bits:
        calibrate_activations(model, data.train.x[:256])
    opt = optimizers.build(optimizer, model.parameters(), lr, seed)
    return Setup(task, data, model, task.loss_fn(), opt)


def run(spec: RunSpec) -> dict:
    """Train, evaluate on validation and test, and return every measurement as a plain dict."""
    setup = prepare(spec.task, spec.optimizer, spec.lr, spec.seed)
    task, data, model, loss_fn, opt = (setup.task, setup.data, setup.model, setup.loss_fn,
                                       setup.opt)
    names = [n for n, _ in model.named_parameters()]
    watched = quantized_layers(model, task.bits) if task.bits else []
    meter = OscillationMeter() if watched else None
    if meter:
        meter.update(torch.cat([m.integer_weight().flatten() for m in watched]))

    trace = {"loss": [], "rho": [], "gamma": [], "flips": [], "oscillations": []}
    seconds, diverged = 0.0, False
    batch_iter = tasks.batches(len(data.train.y), task.batch_size, spec.seed)
    for _ in range(spec.steps):
        idx = next(batch_iter)
        closure = setup.closure(data.train.x[idx], data.train.y[idx])
        start = time.perf_counter()
        loss = float(opt.step(closure).detach())
        seconds += time.perf_counter() - start
        trace["loss"].append(loss)
        rho, gamma = probe_values(opt)
        trace["rho"].append(rho)
        trace["gamma"].append(gamma)
        if meter:
            flips, oscillations = meter.update(
                torch.cat([m.integer_weight().flatten() for m in watched]))
            trace["flips"].append(flips)
            trace["oscillations"].append(oscillations)
        if not math.isfinite(loss):
            diverged = True
            break

    val_acc, val_loss = evaluate(model, data.val, loss_fn)
    test_acc, test_loss = evaluate(model, data.test, loss_fn)
    steps_done = len(trace["loss"])
    return dict(
        asdict(spec), key=spec.key, val_acc=val_acc, val_loss=val_loss, test_acc=test_acc,
        test_loss=test_loss, diverged=diverged, steps_done=steps_done,
        ms_per_step=1e3 * seconds / max(steps_done, 1), backend=_sadam_backend(opt),
        param_names=names,
        loss=_round(trace["loss"]),
        rho=[None if r is None else _round(r, 4) for r in trace["rho"]],
        gamma=[None if g is None else _round(g, 4) for g in trace["gamma"]],
        flips=_round(trace["flips"], 6), oscillations=_round(trace["oscillations"], 6),
    )
