"""Proximal SGD with momentum for an L1 penalty (the Prox-SGD baseline, after Yang et al. 2020,
"ProxSGD: Training Structured Neural Networks under Regularization and Constraints").

Each step takes a momentum step on the smooth loss and then applies the proximal operator of
``lr * l1 * ||p||_1``, which is soft-thresholding:

    v = momentum * v + g
    z = p - lr * v
    p = sign(z) * max(|z| - lr * l1, 0)

The L1 term never enters the gradient; it acts only through the proximal step, which is what makes
small weights exactly zero instead of chattering around it.
"""
import torch
from torch.optim import Optimizer


def soft_threshold(z: torch.Tensor, threshold) -> torch.Tensor:
    """The proximal operator of ``threshold * ||.||_1``: ``sign(z) * max(|z| - threshold, 0)``."""
    return torch.sign(z) * torch.clamp(z.abs() - threshold, min=0)


class ProxSGD(Optimizer):
    def __init__(self, params, lr=1e-2, momentum=0.9, l1=1e-4):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if l1 < 0:
            raise ValueError(f"l1 must be non-negative, got {l1}")
        super().__init__(params, dict(lr=lr, momentum=momentum, l1=l1))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, l1 = group["lr"], group["momentum"], group["l1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = p.grad.detach().clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(p.grad)
                z = p - lr * state["momentum_buffer"]
                p.copy_(soft_threshold(z, lr * l1))
        return loss
