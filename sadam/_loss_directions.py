"""The loss probe's directions, drawn once per probing for all k probes of a tensor.

Both kinds are deterministic functions of (``seed``, param group index, tensor index in its group,
probing index) and identical on every device and backend:

* sign directions (``"symmetric"``): the probe hash of sadam-spec section 2 with the group folded
  into the seed (:func:`sadam._hash.loss_probe_seed`), kept as int8 so one add per evaluation
  displaces a tensor;
* Gaussian directions (``"directions"``): ``torch.randn`` from a CPU ``torch.Generator`` seeded
  with the same 32-bit hash key, normalised per tensor on the CPU, then moved to the tensor's
  device. CPU generation is what makes them identical everywhere.
"""
import torch

from ._hash import loss_probe_seed, probe_bits, probe_key


def sign_directions(p: torch.Tensor, probes: int, *, seed: int, group_index: int,
                    tensor_index: int, probing: int) -> torch.Tensor:
    """``(probes, numel)`` int8 tensor of +1/-1: probe i's signs are bit i of the hash."""
    bits = probe_bits(p.numel(), tensor_id=tensor_index, epoch=probing,
                      seed=loss_probe_seed(seed, group_index), device=p.device)
    signs = torch.empty(probes, p.numel(), dtype=torch.int8, device=p.device)
    for i in range(probes):  # row by row: no (probes, numel) int64 temporary
        signs[i] = ((bits >> i) & 1) * 2 - 1
    return signs


class GaussianDirections:
    """Probe i's unit direction of one tensor, drawn in turn (call :meth:`next` k times)."""

    def __init__(self, p: torch.Tensor, *, seed: int, group_index: int, tensor_index: int,
                 probing: int):
        key = probe_key(loss_probe_seed(seed, group_index), probing, tensor_index)
        self.generator = torch.Generator(device="cpu").manual_seed(int(key))
        self.numel, self.device = p.numel(), p.device

    def next(self) -> torch.Tensor:
        z = torch.randn(self.numel, generator=self.generator, dtype=torch.float32)
        norm = float(z.double().norm())  # float64 on the CPU: the same value on every machine
        return z.mul_(1.0 / norm).to(self.device, non_blocking=True)
