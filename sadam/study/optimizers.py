"""The optimizers the study compares, built from one learning rate and one seed.

Every optimizer is tuned over the same learning-rate grid. S-Adam runs with ``backend="auto"``:
the fastest backend available for the parameters' device, the pure-torch reference otherwise.
The controls are AdamW at ``lr * mean(gamma)`` of an S-Adam variant (its picked lr times the
average damping it applied), which separates S-Adam's adaptive damping from a plain smaller step.
"""
import torch

from sadam import SAdam

from .prox_sgd import ProxSGD

LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_LR_GRID = (1e-3, 3e-3, 1e-2)
WEIGHT_DECAY = 1e-2
LOSS_PROBE = dict(probes=4, probe_every=4)  # 2k forwards per probing: keeps the cost ~2x AdamW


def _sadam(**settings):
    def build(params, lr, seed):
        return SAdam(params, lr=lr, weight_decay=WEIGHT_DECAY, seed=seed, backend="auto",
                     **settings)
    return build


OPTIMIZERS = {
    "sadam_grad_group": _sadam(probe="gradient", scope="group", damping=1.0),
    "sadam_grad_tensor": _sadam(probe="gradient", scope="tensor", damping=1.0),
    "sadam_loss_sym": _sadam(probe="loss", probe_estimator="symmetric", damping=1.0,
                             **LOSS_PROBE),
    # the authors' public settings for their estimator: 8 probes, delta 0.01, damping 2
    "sadam_loss_dir": _sadam(probe="loss", probe_estimator="directions", damping=2.0,
                             probes=8, probe_delta=0.01, probe_every=LOSS_PROBE["probe_every"]),
    "adamw": lambda params, lr, seed: torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY),
    "adam": lambda params, lr, seed: torch.optim.Adam(params, lr=lr),
    "sgdm": lambda params, lr, seed: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "proxsgd": lambda params, lr, seed: ProxSGD(params, lr=lr, momentum=0.9, l1=1e-4),
}

# control name -> the S-Adam variant whose picked lr and mean gamma it uses
CONTROLS = {
    "adamw_ctl_grad": "sadam_grad_group",
    "adamw_ctl_loss": "sadam_loss_sym",
}

QUICK_OPTIMIZERS = ("sadam_grad_group", "sadam_grad_tensor", "adamw")


def build(name: str, params, lr: float, seed: int):
    """The optimizer ``name`` (or a control, which is AdamW) over ``params``."""
    if name in CONTROLS:
        name = "adamw"
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS) + sorted(CONTROLS)}, "
                         f"got {name!r}")
    return OPTIMIZERS[name](params, lr, seed)
