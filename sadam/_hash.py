"""The probe hash: random sign directions that are never stored.

Every backend reproduces these bits exactly. Arithmetic is modulo 2**32; in torch it runs on int64
tensors with products split into 16-bit halves so nothing overflows a signed 64-bit integer. The
same functions accept Python ints, so tests can check them against plain integer arithmetic.
"""
import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
M1 = 0x85EBCA6B
M2 = 0xC2B2AE35
MAX_PROBES = 32


def _mul32(x, c: int):
    """(x * c) mod 2**32 for x in [0, 2**32) (int64 tensor or int) without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def probe_key(seed, epoch, tensor_id: int):
    """Key of the hash for (seed, epoch r, tensor id j). ``epoch`` may be an int64 tensor."""
    return seed ^ _mul32(epoch + 1, GOLDEN) ^ _mul32(tensor_id + 1, M1)


def probe_hash(index: torch.Tensor, key) -> torch.Tensor:
    """32-bit hash of global element indices (int64 tensor), returned as int64 in [0, 2**32)."""
    x = (index & MASK32) ^ key
    x = x ^ _mul32(index >> 32, M2)
    x = x ^ (x >> 16)
    x = _mul32(x, M1)
    x = x ^ (x >> 13)
    x = _mul32(x, M2)
    return x ^ (x >> 16)


def probe_bits(numel: int, *, tensor_id: int, epoch, seed: int, offset: int = 0, device=None):
    """The hash of elements ``offset .. offset + numel - 1``: bit i is the sign of probe i."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return probe_hash(index, probe_key(seed, epoch, tensor_id))


def signs_from_bits(bits: torch.Tensor, probes: int, dtype=torch.float32) -> torch.Tensor:
    """``(probes, numel)`` tensor of +1/-1 from hashed bits."""
    shifts = torch.arange(probes, device=bits.device).unsqueeze(1)
    return (((bits.unsqueeze(0) >> shifts) & 1) * 2 - 1).to(dtype)


def probe_signs(numel: int, probes: int, *, tensor_id: int, epoch: int, seed: int, offset: int = 0,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``probes`` sign vectors of elements ``offset .. offset + numel - 1`` of a tensor.

    Returns a ``(probes, numel)`` tensor of +1/-1. ``offset`` is the flat index of the first
    element in the full (unsharded) tensor, so a shard sees exactly the signs of the whole tensor.
    """
    if not 1 <= probes <= MAX_PROBES:
        raise ValueError(f"probes must be in [1, {MAX_PROBES}], got {probes}")
    bits = probe_bits(numel, tensor_id=tensor_id, epoch=epoch, seed=seed, offset=offset,
                      device=device)
    return signs_from_bits(bits, probes, dtype)


GROUP_MIX = 0x27D4EB2F


def loss_probe_seed(seed: int, group_index: int) -> int:
    """The seed the loss probe hashes with for param group ``group_index``.

    The gradient probe's key names a tensor by its index in its group; the loss probe perturbs
    tensors of several groups at once, so it folds the group's index into the seed, and no two
    tensors of one optimizer share a direction. Group 0 keeps ``seed`` itself.
    """
    return seed ^ _mul32(group_index, GROUP_MIX)
