"""Two-rank training runs (gloo, CPU) that tests/test_distributed.py compares with one process.

Run as ``python distributed_worker.py OUT_DIR`` with RANK, WORLD_SIZE and STORE (a file path for
the rendezvous) in the environment. Every scenario writes ``OUT_DIR/<scenario>.pt`` from rank 0.
The single-process twins are the functions ``reference_*`` below, run by the test itself.

The model has shapes that shard unevenly over two ranks (7 rows -> 4 + 3) and tensors with one
row (the second rank's shard is empty); the odd model (``ODD_CONFIGS``) has Linears of 37, 5, 3
and 1 rows, each sharded on its own. The loss is L1 (a kink), so rho moves away from 0.
"""
import copy
import datetime
import os
import sys

import torch
import torch.nn as nn

import sadam

STEPS = 6
SAVE_AFTER = 3
WORLD = 2
CONFIGS = {
    "tensor_lag1": dict(scope="tensor", probe_lag=1),
    "group_lag0": dict(scope="group", probe_lag=0, probe_window=3, amsgrad=True),
}
# the odd model, every Linear sharded on its own: both scopes, both lags
ODD_CONFIGS = {f"odd_{scope}_lag{lag}": dict(scope=scope, probe_lag=lag, seed=7)
               for scope in ("tensor", "group") for lag in (0, 1)}
ODD_ROWS = (37, 5, 3, 1)  # rows of the odd model's Linears: 19+18, 3+2, 2+1, 1+0 on two ranks
# a 3-class softmax head, sharded 2+1: its bias gradient sums to 0, so along an all-equal sign
# vector d is pure rounding noise, whose value depends on how the sum is split across ranks
SOFTMAX_CONFIGS = {f"softmax_{scope}_lag{lag}": dict(scope=scope, probe_lag=lag, seed=7)
                   for scope in ("tensor", "group") for lag in (0, 1)}
ODD_CONFIGS.update(SOFTMAX_CONFIGS)


def build_model(config=None):
    torch.manual_seed(0)
    if config in SOFTMAX_CONFIGS:
        model = nn.Sequential(nn.Linear(6, 37), nn.ReLU(), nn.Linear(37, 3))
        model.classes = 3
        return model
    if config in ODD_CONFIGS:
        sizes = (6,) + ODD_ROWS
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        return nn.Sequential(*layers[:-1])
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 1))


def batch(rank=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 1, generator=g)
    if rank is None:
        return x, y
    half = 16 // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def make_optimizer(model, config, backend="torch"):
    return sadam.SAdam(model.parameters(), lr=2e-2, damping=2.0, probes=8, weight_decay=1e-2,
                       backend=backend, **{**CONFIGS, **ODD_CONFIGS}[config])


def loss_of(model, x, y):
    if getattr(model, "classes", None):  # cross-entropy on labels cut from y
        labels = torch.bucketize(y.squeeze(1).float(), torch.tensor([-0.4, 0.4]))
        return nn.functional.cross_entropy(model(x).float(), labels)
    return (model(x) - y).abs().mean()


def record(opt, history):
    history.append([r.detach().clone().float() for r in opt.lgi()])


def full_params(model):
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = p.detach().clone().float()
    return out


# ------------------------------------------------------------------ single-process references
def reference_run(config, steps=STEPS, bf16_compute=False, model=None, opt=None, backend="torch"):
    """The unsharded twin: the mean of the per-rank gradients (what DDP and FSDP2 reduce), then
    one SAdam step. With ``bf16_compute`` each half batch runs on a bf16 copy of the model, as
    FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32) does."""
    model = model or build_model(config)
    opt = opt or make_optimizer(model, config, backend)
    history = []
    for _ in range(steps):
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(WORLD):
            x, y = batch(rank)
            worker = copy.deepcopy(model).to(torch.bfloat16) if bf16_compute else model
            worker.zero_grad(set_to_none=True)
            loss = loss_of(worker, x.to(next(worker.parameters()).dtype), y)
            loss.float().backward()
            for acc, p in zip(grads, worker.parameters()):
                acc += p.grad.float() / WORLD
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        opt.step()
        record(opt, history)
    return model, opt, history


# --------------------------------------------------------------------------- two-rank runs
def train(model, opt, rank, steps, history, on_step=None):
    x, y = batch(rank)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()
        record(opt, history)
        if on_step is not None:
            on_step(step + 1)


def run_ddp(rank, out, config):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = DDP(build_model())
    opt = make_optimizer(model, config)
    history = []
    train(model, opt, rank, STEPS, history)
    return dict(params=full_params(model.module), lgi=history, stats=probe_stats(opt))


def probe_stats(opt):
    """The first group's probe statistics (kept with its first parameter's state)."""
    return opt.state[opt.param_groups[0]["params"][0]]["probe_stats"].detach().clone()


def run_fsdp(rank, out, config, bf16=False, checkpoint_dir=None, backend="torch"):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build_model(config)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in (model if config in ODD_CONFIGS else model[:1]):
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = make_optimizer(model, config, backend)
    local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    history = []

    def save(step):
        if checkpoint_dir is not None and step == SAVE_AFTER:
            dcp.save({"model": get_model_state_dict(model),
                      "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=checkpoint_dir)

    if checkpoint_dir is not None:
        # a state dict of the fresh optimizer: DCP creates the state with a zero-grad step that
        # must change nothing (the run below is compared with one that never took it)
        get_optimizer_state_dict(model, opt)
    train(model, opt, rank, STEPS, history, on_step=save)
    return dict(params=full_params(model), lgi=history, local_shapes=local_shapes)


def run_unsupported_placement():
    """A DTensor split on dim 1: its shards are not contiguous in the full flat order."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    p.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    opt = sadam.SAdam([p], backend="torch")
    before = p.to_local().clone()
    try:
        opt.step()
    except ValueError as exc:
        return dict(error=str(exc), unchanged=torch.equal(p.to_local(), before),
                    state=len(opt.state))
    return dict(error=None)


# at an lr-0 first step only rank 0's rows have a nonzero gradient (rows 0-1 of 4)
LR_ZERO_GRAD = torch.cat([torch.arange(1.0, 7.0).view(2, 3), torch.zeros(2, 3)])


def run_lr_zero_first_step(rank):
    """An lr-0 first step without a closure looks like DCP's state creation until a gradient is
    nonzero; whether one is must be agreed over each parameter's mesh, or the ranks take
    different branches around the probe's collective. On a world mesh and on HSDP's 2-D mesh
    every rank takes the real step, as one process does. On the 1-rank sub-meshes of a (2, 1)
    mesh each rank decides alone: rank 1, whose gradient is zero, only creates the state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    world = init_device_mesh("cpu", (WORLD,))
    hsdp = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    alone = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ranks", "alone"))["alone"]
    layouts = {
        "world": lambda t: distribute_tensor(t, world, [Shard(0)]),
        "hsdp": lambda t: distribute_tensor(t, hsdp, [Replicate(), Shard(0)]),
        # each rank's own 1-rank mesh holds that rank's half of the rows
        "alone": lambda t: DTensor.from_local(t.chunk(WORLD)[rank].clone(), alone, [Shard(0)]),
    }
    results = {}
    for name, layout in layouts.items():
        p = nn.Parameter(layout(torch.ones(4, 3)))
        p.grad = layout(LR_ZERO_GRAD.clone())
        opt = sadam.SAdam([p], lr=0.0, backend="torch")
        opt.step()
        state = opt.state[p]
        results[name] = dict(step=float(state["step"]), exp_avg=state["exp_avg"].to_local().clone(),
                             param=p.to_local().detach().clone())
    return results



REPLICATED_STEPS = 3


def replicated_grad(step):
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(40 + step))


def run_replicated_dtensor():
    """A DTensor replicated over the world mesh: every rank holds the whole tensor, so the probe
    partials are already whole on each rank and must not be summed over the ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    mesh = init_device_mesh("cpu", (WORLD,))
    p = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Replicate()]))
    opt = sadam.SAdam([p], lr=1e-2, damping=2.0, scope="tensor", probe_lag=0, backend="torch")
    for step in range(REPLICATED_STEPS):
        p.grad = distribute_tensor(replicated_grad(step), mesh, [Replicate()])
        opt.step()
    return dict(param=p.to_local().detach().clone(), stats=probe_stats(opt))

# ------------------------------------------------------------------------------------- PSS
PSS_SHAPES = {"uneven": ((7, 5), "shard"), "one_row_each": ((3, 4), "shard"),
              "vector": ((5,), "shard"), "replicated": ((6, 6), "replicate")}
PSS_GRAD_SCALES = (1.0, 1.0, 10.0)  # the third step's norm spikes


def pss_tensors():
    """The full weights and, per step, the full gradients (same on every rank)."""
    g = torch.Generator().manual_seed(5)
    weights = {n: torch.randn(shape, generator=g) for n, (shape, _) in PSS_SHAPES.items()}
    weights["uneven"][:, 0] *= 8  # a dominant direction for the smoothing to act on
    grads = [{n: scale * torch.randn(shape, generator=g) for n, (shape, _) in PSS_SHAPES.items()}
             for scale in PSS_GRAD_SCALES]
    return weights, grads


def pss_run(params, grads_of_step, to_param_layout):
    """Observe every step's gradients, then smooth on the spike; the trigger's numbers."""
    pss = sadam.PSS(list(params.items()), warmup=0, max_rank=2, seed=3)
    emas = []
    for grads in grads_of_step:
        for name, p in params.items():
            p.grad = to_param_layout(grads[name], p)
        pss.observe()
        emas.append(float(pss._trigger.ema))
    report = pss.step()
    return pss, emas, report


def run_pss_sharded(rank):
    """PSS on Shard(0) DTensors over two ranks (uneven shards), and one replicated matrix."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh("cpu", (WORLD,))

    def layout(name):
        return mesh, [Shard(0)] if PSS_SHAPES[name][1] == "shard" else [Replicate()]

    return pss_on_dtensors(PSS_SHAPES, layout)


# parameter -> the dim of the (2, 1) mesh its Shard(0) gradient lives on
PSS_TWO_MESHES = {"uneven": "replicate", "one_row_each": "shard"}


def run_pss_two_meshes(rank):
    """PSS on Shard(0) DTensors of two 1-D meshes over different ranks, as HSDP lays them out:
    "uneven" is split across both ranks (dim "replicate"), "one_row_each" lies whole on each
    rank (dim "shard" holds one rank; both ranks have the same values, as replicas do). Each
    element counts once in the norm only if every mesh's squares are all-reduced over that
    mesh's own group: the whole world, or one mesh's group for both, counts the copies twice
    (or the split rows once)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    meshes = {dim: mesh[dim] for dim in ("replicate", "shard")}
    return pss_on_dtensors(PSS_TWO_MESHES, lambda name: (meshes[PSS_TWO_MESHES[name]],
                                                         [Shard(0)]))


def pss_on_dtensors(names, layout):
    """pss_run on the ``names`` of pss_tensors, each distributed as ``layout(name)`` says (a mesh
    and placements); the trigger's numbers and the smoothed weights, local and full."""
    from torch.distributed.tensor import distribute_tensor
    weights, grads = pss_tensors()
    params = {n: nn.Parameter(distribute_tensor(weights[n].clone(), *layout(n))) for n in names}
    _, emas, report = pss_run(params, grads, lambda g, p: distribute_tensor(
        g.clone(), p.device_mesh, p.placements))
    return dict(emas=emas, fired=report is not None,
                ks=[m.k for m in report.matrices] if report else [],
                local={n: p.to_local().detach().clone() for n, p in params.items()},
                full={n: p.full_tensor().detach().clone() for n, p in params.items()})


def launch(out, scenarios, timeout_s=300):
    """Run the scenarios on WORLD gloo ranks (subprocesses); their records, rank by rank."""
    from _launch import launch_ranks
    launch_ranks(__file__, out, WORLD, timeout_s, SADAM_WORKER_SCENARIOS=scenarios)
    return torch.load(out / "results.pt", weights_only=False)


def main(out):
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    # a rank left waiting in a collective the other never enters fails in 2 minutes, not 30
    dist.init_process_group("gloo", init_method=f"file://{os.environ['STORE']}", rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    scenarios = os.environ.get("SADAM_WORKER_SCENARIOS", "optimizer,kernels")
    if "optimizer" in scenarios:
        for config in CONFIGS:
            results[f"ddp_{config}"] = run_ddp(rank, out, config)
            ckpt = os.path.join(out, f"ckpt_{config}") if config == "tensor_lag1" else None
            results[f"fsdp_{config}"] = run_fsdp(rank, out, config, checkpoint_dir=ckpt)
        for config in ODD_CONFIGS:
            results[f"fsdp_{config}"] = run_fsdp(rank, out, config)
        results["fsdp_bf16"] = run_fsdp(rank, out, "tensor_lag1", bf16=True)
        results["shard_dim_1"] = run_unsupported_placement()
        results["lr_zero_first_step"] = run_lr_zero_first_step(rank)
        results["replicated_dtensor"] = run_replicated_dtensor()
    if "kernels" in scenarios:
        for backend in sadam.available_backends("cpu"):
            if backend != "torch":  # kernel rows: sharded offsets on every backend
                results[f"fsdp_backend_{backend}"] = run_fsdp(rank, out, "tensor_lag1",
                                                              backend=backend)
    if "pss" in scenarios:
        results["pss"] = run_pss_sharded(rank)
        results["pss_two_meshes"] = run_pss_two_meshes(rank)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, os.path.join(out, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
