"""``PSS``: Parametric Singularity Smoothing of weight matrices, triggered by gradient-norm spikes.

The top singular values of weight matrices tend to grow and align with the representations during
training, which loosens the bound on the gradient norm until the loss explodes. PSS watches the
global gradient norm; on a spike (or periodically) it shrinks the dominant singular values of every
managed matrix with a smoothing function, by an in-place rank-k correction. It works beside any
optimizer and leaves the optimizer's state as it is.
"""
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from . import pss_linalg as LA
from ._validation import _check, _choice, _int, _value
from .pss_trigger import DTensor, SpikeTrigger, grad_norm


@dataclass
class MatrixReport:
    name: str
    k: int
    sigma1_before: float
    sigma1_after: float   # the smoothed value as set (fp32), before rounding to the weight dtype


@dataclass
class SmoothingReport:
    step: int             # observe() count when the smoothing ran
    reason: str           # "spike", "every" or "manual"
    ratio: float          # g_t / n_{t-1} of the spike (of the latest step for "every"/"manual")
    spike_step: int       # step whose gradient norm spiked (0 when no spike was seen)
    matrices: List[MatrixReport] = field(default_factory=list)


def _named_parameters(params_or_module):
    """[(name, param)] of a module, an iterable of tensors, (name, tensor) pairs or param groups."""
    if isinstance(params_or_module, torch.nn.Module):
        return list(params_or_module.named_parameters())
    if isinstance(params_or_module, torch.Tensor):
        raise ValueError("params_or_module must be an nn.Module or an iterable of parameters, "
                         "got a single Tensor")
    named = []
    for i, item in enumerate(params_or_module):
        if isinstance(item, dict):
            named += [(f"group{i}.{j}", p) for j, p in enumerate(item["params"])]
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            named.append(item)
        else:
            named.append((f"param{i}", item))
    return named


def _managed(named):
    seen, out = set(), []
    for name, p in named:
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise ValueError(f"params_or_module: {name} must be a floating-point Tensor, "
                             f"got {type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    if not out:
        raise ValueError("params_or_module holds no parameters")
    return out


def _as_matrix_shape(p):
    return (p.shape[0], p.numel() // max(p.shape[0], 1))


def _full(p):
    """The whole matrix of ``p`` (a sharded DTensor is gathered on every rank)."""
    return p.full_tensor() if isinstance(p, DTensor) else p


class PSS:
    r"""Parametric Singularity Smoothing.

    Usage::

        pss = PSS(model)
        loss.backward(); pss.observe()     # a device bool: smoothing is due (no sync)
        optimizer.step(); report = pss.step()

    Args:
        params_or_module: an ``nn.Module`` (names from ``named_parameters``), an iterable of
            parameters, of ``(name, parameter)`` pairs or of param-group dicts. The gradient norm
            covers all of them; smoothing acts on those with ``ndim >= 2`` (viewed as
            ``(shape[0], -1)``) whose smaller side is at least 2.
        tau: spike threshold on ``g_t / n_{t-1}`` (gradient norm over its bias-corrected EMA).
        beta: EMA factor of the gradient norm.
        warmup: no spike is reported during the first ``warmup`` steps.
        max_rank: at most this many dominant singular values are smoothed per matrix.
        oversample: extra columns of the randomized range finder (>= 1: sigma_{k+1} is needed).
        power_iters: subspace iterations of the randomized SVD.
        smooth: ``"log"`` (s_ref (1 + log(s/s_ref))), ``"sqrt"`` (s_ref sqrt(s/s_ref)) or
            ``"clip"`` (s_ref), with s_ref = sigma_{k+1}.
        strength: blend ``s' = s + strength (f(s) - s)`` in [0, 1].
        every: if set, also smooth every that many steps (regardless of ``warmup``).
        seed: seed of the random test matrices.

    Host synchronization: ``observe()`` never waits for the device (the norm, the EMA and the flag
    stay on device; the flag is copied to pinned host memory without blocking). ``step()`` reads
    that host copy only once it has arrived (an event query, no wait); on CUDA a spike is therefore
    acted on at the first ``step()`` after its flag landed, usually the same or the next step (the
    flag stays set until a smoothing, so no spike is lost). A smoothing syncs once per group of
    same-shaped matrices (the largest k sets the width of the range finder) and once to read its
    report; ``smooth_now()`` and ``state_dict()`` sync too.

    Optimizer state (moments) is not changed by a smoothing. Under FSDP2 the gradient norm sums
    the squares of the shard norms with one all-reduce, and a smoothing gathers each sharded matrix
    on every rank (``full_tensor``), computes the same correction everywhere (same seed) and writes
    back each rank's shard.
    """

    def __init__(self, params_or_module, tau=2.5, beta=0.98, warmup=20, max_rank=16,
                 oversample=4, power_iters=2, smooth="log", strength=1.0, every=None, seed=0):
        tau_v = _value("tau", tau)
        _check(tau_v > 0 and tau_v < float("inf"), "tau", "must be a finite number > 0", tau)
        beta_v = _value("beta", beta)
        _check(0.0 <= beta_v < 1.0, "beta", "must be in [0, 1)", beta)
        _int("warmup", warmup, 0)
        _int("max_rank", max_rank, 1)
        _int("oversample", oversample, 1)
        _int("power_iters", power_iters, 0)
        _choice("smooth", smooth, LA.SMOOTHERS)
        strength_v = _value("strength", strength)
        _check(0.0 <= strength_v <= 1.0, "strength", "must be in [0, 1]", strength)
        if every is not None:
            _int("every", every, 1)
        _int("seed", seed, 0)
        self.params = _managed(_named_parameters(params_or_module))
        self.matrices = [(n, p) for n, p in self.params
                         if p.ndim >= 2 and min(_as_matrix_shape(p)) >= 2]
        self.hparams = dict(tau=tau_v, beta=beta_v, warmup=warmup, max_rank=max_rank,
                            oversample=oversample, power_iters=power_iters, smooth=smooth,
                            strength=strength_v, every=every, seed=seed)
        device = self.params[0][1].device
        self._trigger = SpikeTrigger(device, tau_v, beta_v, warmup)
        self._generators = {}
        self._last_periodic = 0
        self.history: List[SmoothingReport] = []

    # ------------------------------------------------------------------------------- trigger
    @property
    def num_steps(self) -> int:
        """How many times ``observe()`` has been called."""
        return self._trigger.step

    def observe(self) -> torch.Tensor:
        """Read the gradient norm of this step; returns whether smoothing is due (a device bool).

        Due means a spike was seen and not yet smoothed, or this is a periodic step. Call after
        ``backward()`` (and after unscaling the gradients under AMP). Evaluating the returned
        tensor as a Python bool syncs; ``step()`` does not need it.
        """
        grads = [p.grad for _, p in self.params if p.grad is not None]
        if not grads:
            raise RuntimeError("PSS.observe() found no gradients; call it after backward()")
        with torch.no_grad():
            self._trigger.observe(grad_norm(grads))
            pending = self._trigger.pending
            return torch.ones_like(pending) if self._periodic_due() else pending.clone()

    def _periodic_due(self) -> bool:
        t, every = self._trigger.step, self.hparams["every"]
        return every is not None and t > self._last_periodic and t % every == 0

    def step(self) -> Optional[SmoothingReport]:
        """Smooth the weights if a spike was seen or the period is due; the report, or None."""
        periodic = self._periodic_due()
        spike = bool(self._trigger.mirror.poll())
        if not (spike or periodic):
            return None
        if periodic:
            self._last_periodic = self._trigger.step
        return self._smooth("spike" if spike else "every")

    def smooth_now(self) -> SmoothingReport:
        """Smooth all managed matrices now, whatever the trigger says."""
        return self._smooth("manual")

    # ----------------------------------------------------------------------------- smoothing
    def _generator(self, device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.hparams["seed"])
        return self._generators[key]

    def _batches(self):
        """Managed matrices grouped by (device, matrix shape), in first-seen order."""
        groups = {}
        for name, p in self.matrices:
            key = (str(p.device), _as_matrix_shape(p))
            groups.setdefault(key, []).append((name, p))
        return groups.values()

    @torch.no_grad()
    def _smooth(self, reason: str) -> SmoothingReport:
        trig = self._trigger
        ratio = trig.spike_ratio if reason == "spike" else trig.last_ratio
        report = SmoothingReport(step=trig.step, reason=reason, ratio=float(ratio),
                                 spike_step=int(trig.spike_step))
        for batch in self._batches():
            report.matrices += self._smooth_batch(batch)
        trig.clear()
        self.history.append(report)
        return report

    def _smooth_batch(self, batch) -> List[MatrixReport]:
        h = self.hparams
        m, n = _as_matrix_shape(batch[0][1])
        # a private fp32 copy: the factorization runs in fp32 whatever the weight dtype
        W = torch.stack([_full(p).detach().reshape(m, n) for _, p in batch]).float()
        gen = self._generator(W.device)
        k = LA.dominant_rank(W, LA.top_singular_value(W, gen), h["max_rank"])
        width = LA.subspace_width(int(k.max()), h["oversample"], m, n)
        U, S, Vh = LA.randomized_svd(W, width, h["power_iters"], gen)
        S_new = LA.smooth_values(S, k, h["smooth"], h["strength"])
        self._write([p for _, p in batch], LA.correct_(W, U, S_new - S, Vh))
        rows = zip(batch, k.tolist(), S[:, 0].tolist(), S_new[:, 0].tolist())
        return [MatrixReport(name, k_i, before, after) for (name, _), k_i, before, after in rows]

    @staticmethod
    def _write(params, W_new):
        """Write each smoothed matrix into its parameter, in the parameter's dtype, in place."""
        plain = [(p, w) for p, w in zip(params, W_new.unbind(0)) if not isinstance(p, DTensor)]
        if plain:
            torch._foreach_copy_([p for p, _ in plain], [w.view(p.shape) for p, w in plain])
        for p, w in zip(params, W_new.unbind(0)):
            if isinstance(p, DTensor):
                from torch.distributed.tensor import distribute_tensor
                shard = distribute_tensor(w.view(p.shape).to(p.dtype), p.device_mesh, p.placements)
                p.to_local().copy_(shard.to_local())

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"hparams": dict(self.hparams), "trigger": self._trigger.state_dict(),
                "last_periodic": self._last_periodic,
                "generators": {k: g.get_state() for k, g in self._generators.items()},
                "history": [asdict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("hparams", "trigger", "last_periodic", "generators", "history"):
            if key not in state:
                raise ValueError(f"state_dict is missing {key!r}")
        if state["hparams"] != self.hparams:
            raise ValueError(f"state_dict hparams {state['hparams']} differ from this PSS's "
                             f"{self.hparams}")
        self._trigger.load_state_dict(state["trigger"])
        self._last_periodic = int(state["last_periodic"])
        for key, gen_state in state["generators"].items():
            self._generator(key).set_state(gen_state)
        self.history = [SmoothingReport(**{**r, "matrices": [MatrixReport(**m)
                                                              for m in r["matrices"]]})
                        for r in state["history"]]
