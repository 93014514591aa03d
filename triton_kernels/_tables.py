"""Host side of the multi-tensor launches: who owns which chunk, and where every tensor lives.

Two device tables per param group, each cached in a small bounded LRU:

* the *layout* (chunk -> tensor, per-tensor numel / global offset / hash key / scope row / first
  chunk, and the per-row chunk lists of the probe reduction) depends only on shapes and dtypes;
* the *addresses* (int64 ``data_ptr()`` of p, g, m, v, vmax and the step count of every tensor)
  are keyed on those addresses themselves, because gradients may be reallocated between steps: a
  cached table is reused only when every pointer in it is still the same.
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Tuple

import torch

from ._convert import ALIGNMENT, KINDS
from ._hash import key_base
from .update import LAYOUT_COLS

# Elements owned by one program of the multi-tensor pass. Large, so the probe partials (k floats
# per chunk) stay small and their single-program-per-row reduction stays cheap.
CHUNK = 16384
REDUCE_TILE = 8192  # partials x probes per iteration of the reduction
CACHE_SIZE = 16


@dataclass
class Bucket:
    """The tensors of one launch: same (param, grad, state) dtypes, chunks [start, start + n)."""
    kinds: Tuple[int, int, int]
    start: int
    num_chunks: int


@dataclass
class Layout:
    buckets: List[Bucket]
    num_chunks: int
    chunk_tensor: torch.Tensor  # int32 [num_chunks]
    layout: torch.Tensor  # int64 [T, LAYOUT_COLS]
    row_start: torch.Tensor  # int32 [num_scopes + 1], CSR over row_chunks
    row_chunks: torch.Tensor  # int32 [num_chunks], the chunks of each scope row in a fixed order
    rows: torch.Tensor  # int32, the scope rows present in the step (finalize grid)


class _BoundedCache:
    """A least-recently-used map holding at most ``size`` device tables."""

    def __init__(self, size: int):
        self.size = size
        self.entries = OrderedDict()

    def get(self, key, build):
        value = self.entries.get(key)
        if value is None:
            value = build()
            self.entries[key] = value
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return value


_layouts = _BoundedCache(CACHE_SIZE)
_addresses = _BoundedCache(CACHE_SIZE)


def _to_device(rows, dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor without a host sync (pinned staging on CUDA)."""
    # the staging tensor is the host's whatever torch.set_default_device says
    host = torch.tensor(rows, dtype=dtype, device="cpu", pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def kinds_of(step, i: int) -> Tuple[int, int, int]:
    dtypes = (step.params[i].dtype, step.grads[i].dtype, step.exp_avgs[i].dtype)
    for dtype in dtypes:
        if dtype not in KINDS:
            raise TypeError(f"the triton backend supports float32, float16 and bfloat16 tensors, "
                            f"got {dtype} for parameter {step.tensor_ids[i]}")
    return tuple(KINDS[dtype] for dtype in dtypes)


def _build_layout(step, device: torch.device) -> Layout:
    order = {}
    for i in range(len(step.params)):
        order.setdefault(kinds_of(step, i), []).append(i)
    table = [[0] * LAYOUT_COLS.value for _ in step.params]
    chunk_tensor, buckets = [], []
    row_chunks = [[] for _ in range(step.stats.shape[0])]
    for kinds, members in order.items():
        start = len(chunk_tensor)
        for i in members:
            numel = step.params[i].numel()
            row = step.scope_rows[i]
            table[i] = [numel, step.offsets[i], key_base(step.seed, step.tensor_ids[i]), row,
                        len(chunk_tensor) - start]
            chunks = -(-numel // CHUNK)
            row_chunks[row].extend(range(len(chunk_tensor), len(chunk_tensor) + chunks))
            chunk_tensor.extend([i] * chunks)
        buckets.append(Bucket(kinds, start, len(chunk_tensor) - start))
    row_start = [0]
    for chunks in row_chunks:
        row_start.append(row_start[-1] + len(chunks))
    flat = [c for chunks in row_chunks for c in chunks]
    return Layout(
        buckets=[b for b in buckets if b.num_chunks > 0], num_chunks=len(chunk_tensor),
        chunk_tensor=_to_device(chunk_tensor or [0], torch.int32, device),
        layout=_to_device(table, torch.int64, device),
        row_start=_to_device(row_start, torch.int32, device),
        row_chunks=_to_device(flat or [0], torch.int32, device),
        rows=_to_device(step.rows_present, torch.int32, device))


def layout_of(step, device: torch.device) -> Layout:
    key = (device, step.seed, step.stats.shape[0],
           tuple((p.numel(), p.dtype, step.grads[i].dtype, step.exp_avgs[i].dtype,
                  step.scope_rows[i], step.tensor_ids[i], step.offsets[i])
                 for i, p in enumerate(step.params)))
    return _layouts.get(key, lambda: _build_layout(step, device))


@dataclass(frozen=True)
class LaunchConfig:
    k_pad: int  # probes padded to a power of two (rows of the register accumulator)
    block: int  # elements per loop trip of a program
    iters: int  # loop trips per chunk (block * iters == CHUNK)
    num_warps: int


ACCUMULATOR_REGISTERS = 32  # probe sums one thread keeps across the loop (K_PAD x its elements)
VECTOR_ELEMENTS = 4  # per thread: one 16-byte access of fp32
WARPS = 4


def probe_width(probes: int) -> int:
    """Rows of the probe accumulator: k rounded up to a power of two (at least 2)."""
    return max(2, 1 << (max(probes, 1) - 1).bit_length())


def launch_config(probes: int) -> LaunchConfig:
    """Block shape of the multi-tensor pass; ``probes`` = 0 when no probe sums are emitted, so
    ``probe="off"`` and the lag-0 update do not depend on k.

    Each thread handles VECTOR_ELEMENTS consecutive elements per trip (16-byte fp32 accesses)
    and keeps k_pad sums per element in registers; for k > 8 it handles fewer elements, so the
    accumulator stays at ACCUMULATOR_REGISTERS and no k in 1..32 spills (sm_90 report).
    """
    k_pad = probe_width(probes)
    per_thread = VECTOR_ELEMENTS
    if probes:
        per_thread = max(1, min(VECTOR_ELEMENTS, ACCUMULATOR_REGISTERS // k_pad))
    block = per_thread * 32 * WARPS
    return LaunchConfig(k_pad, block, CHUNK // block, WARPS)


def reduce_block(probe_width: int) -> int:
    """Partials rows summed per iteration of the reduction (a REDUCE_TILE-element tile)."""
    return REDUCE_TILE // probe_width


def _aligned(*addresses: int) -> int:
    return int(all(a % ALIGNMENT == 0 for a in addresses))


def addresses_of(step, device: torch.device) -> torch.Tensor:
    """int64 [T, ADDRESS_COLS]: addresses of p, g, m, v, vmax (0 without amsgrad) and the step
    count of every tensor, and whether that tensor's element addresses are all ALIGNMENT-byte
    aligned (its full chunks then take 16-byte vector accesses; decided per tensor)."""
    vmax = step.max_exp_avg_sqs if step.amsgrad else [None] * len(step.params)
    rows = tuple((p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                  0 if x is None else x.data_ptr(), s.data_ptr())
                 for p, g, m, v, x, s in zip(step.params, step.grads, step.exp_avgs,
                                             step.exp_avg_sqs, vmax, step.steps))

    def build():
        return _to_device([r + (_aligned(*r[:5]),) for r in rows], torch.int64, device)
    return _addresses.get((device, rows), build)
