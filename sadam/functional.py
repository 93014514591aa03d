"""Functional S-Adam: one param group's step over explicit tensor lists, on a chosen backend.

The order of the stages is the contract of the two probe lags (spec section 3):

* ``probe_lag=1``: the update applies the gamma of the statistics so far and emits this step's
  directional derivatives in the same pass; the finalize then folds them into the statistics.
* ``probe_lag=0``: the directional derivatives first, then the finalize, then the update with the
  fresh gamma.

``probe="loss"`` applies the rho that the loss prober wrote; ``probe="off"`` applies no damping.
"""
from typing import List, Optional

import torch

from . import backends
from .backends.step import GroupStep
from .distributed import reduce_directional_derivatives


def sadam(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
          exp_avg_sqs: List[torch.Tensor], max_exp_avg_sqs: List[torch.Tensor],
          state_steps: List[torch.Tensor], probe_stats: torch.Tensor, *,
          scope_rows: List[int], tensor_ids: List[int], offsets: Optional[List[int]] = None,
          lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, damping=1.0,
          amsgrad=False, maximize=False, probe="gradient", probes=8, probe_beta=0.9,
          probe_lag=1, probe_window=None, seed=0, grad_scale: Optional[torch.Tensor] = None,
          found_inf: Optional[torch.Tensor] = None, backend="auto", process_group=None):
    """Run one S-Adam step of a param group in place. See :class:`sadam.SAdam` for arguments."""
    if not params:
        return
    # a backend module resolved by the caller keeps the import machinery out of compiled steps
    impl = backends.resolve(backend, params[0].device) if isinstance(backend, str) else backend
    step = GroupStep(
        params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs if amsgrad else [], steps=state_steps,
        stats=probe_stats, scope_rows=scope_rows, tensor_ids=tensor_ids,
        offsets=offsets if offsets is not None else [0] * len(params),
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, damping=damping,
        amsgrad=amsgrad, maximize=maximize, probes=probes, probe_beta=probe_beta,
        window=probe_window or 0, seed=seed, grad_scale=grad_scale, found_inf=found_inf)

    if probe == "gradient" and probe_lag == 0:
        d = impl.directional_derivatives(step)
        d = reduce_directional_derivatives(d, process_group)
        impl.finalize(step, d, lag=0)
        impl.update(step, damped=True, emit_probe=False)
    elif probe == "gradient":
        d = impl.update(step, damped=True, emit_probe=True)
        d = reduce_directional_derivatives(d, process_group)
        impl.finalize(step, d, lag=1)
    else:
        impl.update(step, damped=(probe == "loss"), emit_probe=False)
