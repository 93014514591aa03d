"""The loss probe's directions, drawn once per probing for all k probes of a tensor.

Both kinds are deterministic functions of (``seed``, param group index, tensor index in its group,
probing index) and identical on every device and backend:

* sign directions (``"symmetric"``): the probe hash of sadam-spec section 2 with the group folded
  into the seed (:func:`sadam._hash.loss_probe_seed`), kept as int8 so one add per evaluation
  displaces a tensor;
* Gaussian directions (``"directions"``): ``torch.randn(probes, numel)`` from a CPU
  ``torch.Generator`` seeded with the same 32-bit hash key, each row divided by its norm on the
  CPU, then moved to the tensor's device. CPU generation is what makes them identical everywhere.
"""
import torch

from ._hash import loss_probe_seed, probe_bits, probe_key


def sign_directions(p: torch.Tensor, probes: int, *, seed: int, group_index: int,
                    tensor_index: int, probing: int) -> torch.Tensor:
    """``(probes, numel)`` int8 tensor of +1/-1: probe i's signs are bit i of the hash."""
    bits = probe_bits(p.numel(), tensor_id=tensor_index, epoch=probing,
                      seed=loss_probe_seed(seed, group_index), device=p.device)
    bits = ((bits ^ 0x80000000) - 0x80000000).to(torch.int32)  # the same 32 bits, signed
    shifts = torch.arange(probes, dtype=torch.int32, device=p.device).unsqueeze(1)
    signs = ((bits.unsqueeze(0) >> shifts) & 1).to(torch.int8)  # (probes, numel) at once
    return signs.mul_(2).sub_(1)


def gaussian_directions(p: torch.Tensor, probes: int, *, seed: int, group_index: int,
                        tensor_index: int, probing: int) -> torch.Tensor:
    """``(probes, numel)`` fp32 tensor on p's device: row i is probe i's unit direction."""
    key = probe_key(loss_probe_seed(seed, group_index), probing, tensor_index)
    generator = torch.Generator(device="cpu").manual_seed(int(key))
    # device named: under torch.set_default_device the draw would leave the CPU generator
    z = torch.randn(probes, p.numel(), generator=generator, dtype=torch.float32, device="cpu")
    norms = z.double().norm(dim=1, keepdim=True)  # float64 on the CPU: one value everywhere
    return z.div_(norms.float()).to(p.device, non_blocking=True)
