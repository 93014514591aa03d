"""Two-rank DeepSpeed ZeRO runs (gloo, CPU) that tests/test_deepspeed_zero.py compares with one
process.

Run as ``python zero_worker.py OUT_DIR`` with RANK, WORLD_SIZE and STORE (a file path for the
rendezvous) in the environment; rank 0 writes ``OUT_DIR/results.pt``. The single-process twins
(``reference_run``, ``replay``) are run by the test itself.

The model has odd sizes (11 -> 37 -> 5), a frozen layer in the middle of the first param group
(so the trainable parameters' indices in the group skip it) and a second group holding one
element, which DeepSpeed pads to one element per rank: the second rank holds no piece of it.
The loss is the squared error: smooth, so that the free run of one process on the full batch
stays within round-off of the sharded one (an L1 kink flips a gradient sign on a 1e-8 difference);
rho still moves well away from 0 as the gradient turns during descent.

Every run records, per step, the full fp32 gradient DeepSpeed stepped with
(``safe_get_full_grad``), so the test can also replay those exact gradients through an unsharded
optimizer: that comparison is free of the batch split's rounding (bf16 runs use it).
"""
import functools
import os
import re
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.nn as nn

import sadam

STEPS = 20
SAVE_AFTER = 8
WORLD = 2
BATCH = 16
STAGES = (0, 1, 2, 3)
# (optimizer, scope, lag, dtype); every stage runs each
RUNS = {
    "adamw_fp32": ("adamw", None, None, torch.float32),
    "group_lag1_fp32": ("sadam", "group", 1, torch.float32),
    "tensor_lag0_fp32": ("sadam", "tensor", 0, torch.float32),
    "tensor_lag1_fp32": ("sadam", "tensor", 1, torch.float32),
    "group_lag0_fp32": ("sadam", "group", 0, torch.float32),
    "adamw_bf16": ("adamw", None, None, torch.bfloat16),
    "group_lag0_bf16": ("sadam", "group", 0, torch.bfloat16),
    "tensor_lag1_bf16": ("sadam", "tensor", 1, torch.bfloat16),
}
CHECKPOINT_RUN = "tensor_lag1_fp32"
CHECKPOINT_STAGES = (1, 2, 3)
# ZeRO-Offload: the optimizer steps the fp32 partitions in host memory, with the CPU kernel
OFFLOAD_RUN = "group_lag1_fp32"
OFFLOAD_STAGES = (2, 3)
OFFLOAD_BACKEND = "cpu" if "cpu" in sadam.available_backends() else "torch"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(11, 37)
        self.frozen = nn.Linear(37, 37)
        self.out = nn.Linear(37, 5)
        self.scale = nn.Parameter(torch.full((1,), 1.5))
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.tanh(self.frozen(h)) + h
        return self.out(h) * self.scale


def batch(rank=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 11, generator=g)
    y = torch.randn(BATCH, 5, generator=g)
    if rank is None:
        return x, y
    half = BATCH // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def param_groups(model):
    main = [model.inp.weight, model.inp.bias, model.frozen.weight, model.frozen.bias,
            model.out.weight, model.out.bias]
    return [{"params": main}, {"params": [model.scale], "weight_decay": 0.0}]


def make_optimizer(model, run, backend="torch"):
    kind, scope, lag, _ = RUNS[run]
    groups = param_groups(model)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-2)
    return sadam.SAdam(groups, lr=1e-2, weight_decay=1e-2, damping=2.0, seed=7, scope=scope,
                       probe_lag=lag, backend=backend)


def loss_of(out, y):
    return (out.float() - y).pow(2).mean()


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lgi_of(opt):
    if not isinstance(opt, sadam.SAdam):
        return []
    return [r.detach().clone().float() for r in opt.lgi()]


def reference_run(run, steps=STEPS):
    """One process, full batch, no DeepSpeed: the unsharded run."""
    model = Net()
    opt = make_optimizer(model, run)
    x, y = batch()
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model(x), y).backward()
        opt.step()
        history.append(lgi_of(opt))
    return {n: p.detach().clone() for n, p in trainable(model).items()}, history


def replay(run, initial, grads, init_steps=0):
    """The unsharded optimizer fed the gradients a DeepSpeed run stepped with, after the
    ``init_steps`` zero-gradient steps DeepSpeed took when it was set up (``initial`` holds the
    parameters after them, so their weight decay is not applied again)."""
    model = Net()
    with torch.no_grad():
        for n, p in trainable(model).items():
            p.copy_(initial[n])
    opt = make_optimizer(model, run)
    decays = [g["weight_decay"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["weight_decay"] = 0.0
    for _ in range(init_steps):
        for p in trainable(model).values():
            p.grad = torch.zeros_like(p)
        opt.step()
    for g, decay in zip(opt.param_groups, decays):
        g["weight_decay"] = decay
    history = []
    for step_grads in grads:
        for n, p in trainable(model).items():
            p.grad = step_grads[n].clone()
        opt.step()
        history.append(lgi_of(opt))
    return {n: p.detach().clone() for n, p in trainable(model).items()}, history


# ------------------------------------------------------------------------------ two-rank side
def ds_config(stage, dtype, offload=False):
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1 by default; the twins do not
        "zero_optimization": zero,
        # DeepSpeed refuses client optimizers under ZeRO-Offload unless this is false
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10 ** 9,
    }


def build_engine(stage, run, offload=False):
    import deepspeed
    model = Net()
    opt = make_optimizer(model, run, backend=OFFLOAD_BACKEND if offload else "torch")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=ds_config(stage, RUNS[run][3], offload))
    return engine, opt


def full_params(engine):
    """The fp32 master weights DeepSpeed steps, gathered."""
    from deepspeed.utils import safe_get_full_fp32_param
    # stage 0 with bf16: whole fp32 copies, which safe_get_full_fp32_param does not know
    masters = {id(lp): hp for lps, hps in zip(getattr(engine.optimizer, "fp16_groups", []),
                                              getattr(engine.optimizer, "fp32_groups", []))
               if isinstance(hps, list) for lp, hp in zip(lps, hps)}
    out = {}
    for n, p in trainable(engine.module).items():
        master = masters.get(id(p))
        if master is None:
            master = safe_get_full_fp32_param(p)
        if master is None:  # stage 0 in fp32: the model's parameters are stepped as they are
            master = p
        out[n] = master.detach().clone().float()
    return out


def steps_taken(opt):
    """Steps the optimizer counted (DeepSpeed's stage-0 bf16 wrapper takes one with zero
    gradients when it is set up, with AdamW as with SAdam)."""
    return max((int(s["step"]) for s in opt.state.values() if "step" in s), default=0)


def train(engine, opt, rank, steps, record, dtype):
    from deepspeed.utils import safe_get_full_grad
    x, y = batch(rank)
    for _ in range(steps):
        loss = loss_of(engine(x.to(dtype)), y)
        engine.backward(loss)
        record["grads"].append({n: safe_get_full_grad(p).detach().clone().float()
                                for n, p in trainable(engine.module).items()})
        engine.step()
        record["lgi"].append(lgi_of(opt))


def run_scenario(stage, run, rank, offload=False):
    engine, opt = build_engine(stage, run, offload)
    record = {"grads": [], "lgi": [], "initial": full_params(engine),
              "init_steps": steps_taken(opt)}
    train(engine, opt, rank, STEPS, record, RUNS[run][3])
    record["params"] = full_params(engine)
    record["stats_shapes"] = [tuple(r.shape) for r in lgi_of(opt)]
    record["backend"] = opt.param_groups[0].get("backend")
    return record


def checkpoint_scenario(stage, run, rank, out):
    """Train SAVE_AFTER steps, save, build a fresh engine, load, train the rest."""
    engine, opt = build_engine(stage, run)
    record = {"grads": [], "lgi": []}
    train(engine, opt, rank, SAVE_AFTER, record, RUNS[run][3])
    path = os.path.join(out, f"ckpt_stage{stage}")
    engine.save_checkpoint(path, tag="t")
    del engine, opt
    engine, opt = build_engine(stage, run)
    engine.load_checkpoint(path, tag="t")
    train(engine, opt, rank, STEPS - SAVE_AFTER, record, RUNS[run][3])
    record["params"] = full_params(engine)
    return record


def launch_env():
    """What the ranks' environment adds: DeepSpeed's JIT-built ops live in this environment, not
    in the user-wide cache (another torch there would rebuild them, and a build killed midway
    leaves a lock that waits forever)."""
    return dict(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=os.environ.get(
        "TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions")))


def setup():
    """Join the gloo process group and DeepSpeed's; this rank's index."""
    import deepspeed
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("LOCAL_RANK", str(rank))
    dist.init_process_group("gloo", init_method=f"file://{os.environ['STORE']}", rank=rank,
                            world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    return rank


def scenarios(rank, out):
    """Every two-rank run, by the name its record has, in the order they run: name -> thunk."""
    runs = {}
    for stage in STAGES:
        for run in RUNS:
            runs[f"stage{stage}_{run}"] = functools.partial(run_scenario, stage, run, rank)
    for stage in OFFLOAD_STAGES:
        runs[f"offload_stage{stage}_{OFFLOAD_RUN}"] = functools.partial(
            run_scenario, stage, OFFLOAD_RUN, rank, offload=True)
    for stage in CHECKPOINT_STAGES:
        runs[f"resume_stage{stage}_{CHECKPOINT_RUN}"] = functools.partial(
            checkpoint_scenario, stage, CHECKPOINT_RUN, rank, out)
    return runs


def save(out, ranks, timings=None):
    """What rank 0 writes: every rank's records (the test reads ``ranks``)."""
    torch.save({"ranks": ranks, "timings": timings or {}}, os.path.join(out, "results.pt"))


def main(out):
    import torch.distributed as dist
    rank = setup()
    only = os.environ.get("ZERO_ONLY")
    results, timings = {}, {}
    for name, run in scenarios(rank, out).items():
        if only and not re.search(only, name):
            continue
        t0 = time.perf_counter()
        results[name] = run()
        timings[name] = time.perf_counter() - t0
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        save(out, gathered, timings)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
