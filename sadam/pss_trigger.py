"""The PSS spike trigger: global gradient norm, its EMA and the "smoothing is due" flag, on device.

Nothing here reads a device value on the host. ``SpikeTrigger.observe`` launches the norm
reduction and the EMA/flag update; the flag reaches the host through a ``FlagMirror`` (a
non-blocking copy into pinned memory plus an event), which ``poll`` reads only once the copy has
landed, without waiting for it.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist

try:  # torch >= 2.4 (the supported range is 2.11+)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor, Shard = (), ()


def _sharded_1d(g) -> bool:
    return g.device_mesh.ndim == 1 and isinstance(g.placements[0], Shard)


def grad_norm(grads) -> torch.Tensor:
    """L2 norm of all ``grads`` as a 0-d fp32 tensor on the first gradient's device.

    Plain tensors: one ``_foreach_norm`` per device and one norm of the stacked norms.
    DTensor gradients sharded over a 1-D mesh (FSDP2): the squares of the local shard norms are
    summed and all-reduced once per mesh. Any other DTensor layout uses DTensor's own reduction.
    """
    device = grads[0].device
    plain, sharded, other = {}, {}, []
    for g in grads:
        if isinstance(g, DTensor) and _sharded_1d(g):
            sharded.setdefault(id(g.device_mesh), (g.device_mesh, []))[1].append(g.to_local())
        elif isinstance(g, DTensor):
            other.append(g)
        else:
            plain.setdefault(g.device, []).append(g)
    squares = []
    for dev_grads in plain.values():
        norms = torch._foreach_norm(dev_grads)
        squares.append(torch.stack(norms).float().square().sum().to(device))
    for mesh, local in sharded.values():
        sq = torch.stack(torch._foreach_norm(local)).float().square().sum()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group())
        squares.append(sq.to(device))
    for g in other:
        squares.append(torch.linalg.vector_norm(g).full_tensor().float().square().to(device))
    return torch.stack(squares).sum().sqrt()


class FlagMirror:
    """A host copy of a device bool that is read only when it has arrived (never waits)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.bool, device="cpu", pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None

    def publish(self, flag: torch.Tensor) -> None:
        self.host.copy_(flag, non_blocking=self.cuda)
        if self.cuda:
            self.event.record()

    def poll(self) -> Optional[bool]:
        """The last published value, or None while its copy is still in flight (CUDA only)."""
        if self.cuda and not self.event.query():
            return None
        return bool(self.host)

    def clear(self) -> None:
        self.host.fill_(False)


class SpikeTrigger:
    """EMA n_t of the gradient norm g_t and a sticky "spike seen" flag, all device tensors.

    A spike at step t: t > warmup and (g_t non-finite or g_t > tau * n_{t-1}), where n is the
    bias-corrected EMA of the finite norms. The flag stays set until ``clear`` (after smoothing).
    """

    STATE = ("ema", "finite_count", "pending", "spike_ratio", "spike_step")

    def __init__(self, device, tau: float, beta: float, warmup: int):
        self.tau, self.beta, self.warmup = tau, beta, warmup
        self.step = 0
        f32 = dict(device=device, dtype=torch.float32)
        self.ema = torch.zeros((), **f32)
        self.finite_count = torch.zeros((), **f32)
        self.pending = torch.zeros((), device=device, dtype=torch.bool)
        self.spike_ratio = torch.zeros((), **f32)   # g_t / n_{t-1} of the latest spike
        self.spike_step = torch.zeros((), device=device, dtype=torch.int64)
        self.last_ratio = torch.zeros((), **f32)    # g_t / n_{t-1} of the latest observation
        self.mirror = FlagMirror(torch.device(device))

    def average(self) -> torch.Tensor:
        """Bias-corrected EMA n_{t}; +inf before any finite norm (so nothing is a spike)."""
        # beta ** count as exp(count * log beta): no host scalar has to be copied to the device
        log_beta = math.log(self.beta) if self.beta > 0 else -math.inf
        corr = 1 - torch.exp(self.finite_count * log_beta)
        return torch.where(self.finite_count > 0, self.ema / corr.clamp_min(1e-30),
                           torch.full_like(self.ema, float("inf")))

    def observe(self, g: torch.Tensor) -> torch.Tensor:
        """Account for norm ``g`` of a new step; returns this step's spike flag (device bool)."""
        self.step += 1
        prev = self.average()
        finite = torch.isfinite(g)
        ratio = torch.where(finite, g / prev, torch.full_like(g, float("inf")))
        spike = (~finite) | (g > self.tau * prev)
        if self.step <= self.warmup:
            spike = torch.zeros_like(spike)
        safe_g = torch.where(finite, g, torch.zeros_like(g))
        self.ema.copy_(torch.where(finite, self.beta * self.ema + (1 - self.beta) * safe_g,
                                   self.ema))
        self.finite_count.add_(finite.float())
        self.last_ratio.copy_(ratio)
        self.spike_ratio.copy_(torch.where(spike, ratio, self.spike_ratio))
        self.spike_step.copy_(torch.where(spike, torch.full_like(self.spike_step, self.step),
                                          self.spike_step))
        self.pending.logical_or_(spike)
        self.mirror.publish(self.pending)
        return spike

    def clear(self) -> None:
        self.pending.fill_(False)
        self.mirror.clear()

    def state_dict(self) -> dict:
        out = {name: getattr(self, name).detach().cpu().clone() for name in self.STATE}
        out["step"] = self.step
        return out

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            getattr(self, name).copy_(state[name])
        self.step = int(state["step"])
        self.mirror.publish(self.pending)
