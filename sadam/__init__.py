"""sadam: Singularity-aware Adam (S-Adam) as a fused PyTorch optimizer."""
from . import functional
from ._hash import probe_signs
from .backends import BackendUnavailable, available_backends
from .loss_probe import preserve_buffers
from .optimizer import SAdam
from .pss import PSS

__all__ = ["SAdam", "PSS", "functional", "probe_signs", "preserve_buffers", "available_backends",
           "BackendUnavailable"]
__version__ = "0.1.0"
