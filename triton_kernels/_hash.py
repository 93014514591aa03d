"""The probe hash of sadam._hash as Triton functions: the same bits on GPU and in the interpreter.

All arithmetic is on uint32, whose multiplication wraps modulo 2**32 exactly like the contract.
"""
import triton
import triton.language as tl

GOLDEN: tl.constexpr = tl.constexpr(0x9E3779B9)
M1: tl.constexpr = tl.constexpr(0x85EBCA6B)
M2: tl.constexpr = tl.constexpr(0xC2B2AE35)
MASK32 = 0xFFFFFFFF


def key_base(seed: int, tensor_id: int) -> int:
    """The epoch-free part of the key, ``seed ^ (M1 * (j + 1))``, computed on the host."""
    return (seed ^ ((0x85EBCA6B * (tensor_id + 1)) & MASK32)) & MASK32


@triton.jit
def probe_key(key_base, epoch):
    """Key of the hash from the host part (int64 holding a uint32) and the epoch r (int)."""
    r1 = (epoch + 1).to(tl.uint32)
    return key_base.to(tl.uint32) ^ (r1 * GOLDEN)


@triton.jit
def probe_hash(index, key):
    """32-bit hash (uint32) of global element indices (int64 tensor) under a uint32 key."""
    x = index.to(tl.uint32) ^ key  # truncation keeps lo32(e)
    x = x ^ ((index >> 32).to(tl.uint32) * M2)
    x = x ^ (x >> 16)
    x = x * M1
    x = x ^ (x >> 13)
    x = x * M2
    return x ^ (x >> 16)


@triton.jit
def probe_hash_kernel(index_ptr, out_ptr, key_base, epoch, n, BLOCK: tl.constexpr):
    """Hash of ``n`` int64 indices into int64 ``out`` (in [0, 2**32)); used to check the bits."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = tl.load(index_ptr + offs, mask=mask, other=0)
    h = probe_hash(index, probe_key(key_base, epoch))
    tl.store(out_ptr + offs, h.to(tl.int64), mask=mask)
