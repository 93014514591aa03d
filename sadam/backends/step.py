"""What a backend receives for one param group's step: the tensors and the hyperparameters.

Every backend implements three functions over a :class:`GroupStep` (see ``reference.py``, the
literal one):

* ``update(step, *, damped, emit_probe)`` -- moments, decoupled weight decay, damping by the
  scope's gamma = exp(-damping * stats[row, RHO]) and the parameter write, in one pass. With
  ``emit_probe`` it also returns the directional derivatives ``d`` of this step's gradient, a
  ``(num_scopes, probes)`` fp32 tensor (rows not in the step are zero).
* ``directional_derivatives(step)`` -- ``d`` alone (``probe_lag=0``).
* ``finalize(step, d, *, lag)`` -- the statistics, rho and the applied gamma, in place.

Scalar coefficients (1 - beta, bias corrections 1 - beta**t, lr * weight_decay, the step size
lr * gamma / (1 - beta1**t)) are computed in float64, as torch's AdamW does, and the per-element
math in float32. Nothing in them may read a device value back to the host. A ``found_inf`` that is set makes all
three leave every tensor as it was.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch

Scalar = Union[float, torch.Tensor]


@dataclass
class GroupStep:
    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    exp_avgs: List[torch.Tensor]
    exp_avg_sqs: List[torch.Tensor]
    max_exp_avg_sqs: List[torch.Tensor]  # empty unless amsgrad
    steps: List[torch.Tensor]  # 0-d fp32, one per parameter, on the parameter's device
    stats: torch.Tensor  # (num_scopes, 2 * probes + 6) fp32, see sadam._layout
    scope_rows: List[int]  # row of `stats` for each tensor
    tensor_ids: List[int]  # j of the probe hash: index of the tensor in its param group
    offsets: List[int]  # flat index of each local tensor's first element in the full tensor
    lr: Scalar
    beta1: Scalar
    beta2: Scalar
    eps: float
    weight_decay: Scalar
    damping: Scalar
    amsgrad: bool
    maximize: bool
    probes: int
    probe_beta: float
    window: int  # probe_window, 0 = never redraw
    seed: int
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    rows_present: List[int] = field(init=False)

    def __post_init__(self):
        self.rows_present = sorted(set(self.scope_rows))
