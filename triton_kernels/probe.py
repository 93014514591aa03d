"""Probe partial sums and their deterministic reduction into d (num_scopes, k).

The update (or probe) pass writes one row of k partial sums per chunk; ``reduce_partials_kernel``
then sums, for each scope row, the partials of that row's chunks in a fixed order (the CSR order
built on the host), so d is bitwise reproducible and needs no float atomics.
"""
import triton
import triton.language as tl


@triton.jit
def chunk_partials(g, bits, K_PAD: tl.constexpr):
    """[K_PAD] sums of s_i * g over a block, s_i = +1 where bit i of the hash is set, else -1."""
    probe = tl.arange(0, K_PAD).to(tl.uint32)
    positive = ((bits[:, None] >> probe[None, :]) & 1) != 0
    return tl.sum(tl.where(positive, g[:, None], -g[:, None]), axis=0)


@triton.jit
def reduce_partials_kernel(partials, row_start, row_chunks, d, K: tl.constexpr,
                           K_PAD: tl.constexpr, RBLOCK: tl.constexpr):
    """d[row, :K] = sum of the partials of chunks ``row_chunks[row_start[row]:row_start[row+1]]``."""
    row = tl.program_id(0)
    lo = tl.load(row_start + row)
    hi = tl.load(row_start + row + 1)
    probe = tl.arange(0, K_PAD)
    acc = tl.zeros([K_PAD], dtype=tl.float32)
    # a while loop: Triton 3.6's interpreter cannot run `range` over runtime bounds
    first = lo
    while first < hi:
        idx = first + tl.arange(0, RBLOCK)
        mask = idx < hi
        chunk = tl.load(row_chunks + idx, mask=mask, other=0).to(tl.int64)
        tile = tl.load(partials + chunk[:, None] * K_PAD + probe[None, :], mask=mask[:, None],
                       other=0.0)
        acc += tl.sum(tile, axis=0)
        first += RBLOCK
    tl.store(d + row * K + probe, acc, mask=probe < K)
