"""The multi-tensor S-Adam pass: one launch covers every tensor of a (device, dtype) bucket.

Each program owns one chunk of ``BLOCK * ITERS`` elements of one tensor (``chunk_tensor`` says
which). Per element it reads p, g, m, v (and vmax), writes them back once, and -- with
``EMIT_PROBE`` -- adds ``s_i(e) * g(e)`` for all k probes from one hash of the global index into
the chunk's partial sums. With ``DO_UPDATE`` off the same kernel is the ``probe_lag=0`` probe pass
(only g is read). Full chunks run without a bounds mask so their accesses vectorize; only the last
chunk of a tensor checks bounds.
"""
import triton
import triton.language as tl

from ._convert import beta_terms, load_f32, proceed, scalar_f32, store_f32
from ._hash import probe_hash, probe_key
from .probe import chunk_partials

# Columns of the per-tensor tables (int64). Addresses change when tensors are reallocated, the
# layout columns only when shapes change, so the two live in separate tables.
P, G, M, V, VMAX, STEP = (tl.constexpr(c) for c in range(6))
ADDRESS_COLS = tl.constexpr(6)
NUMEL, OFFSET, KEY_BASE, ROW, FIRST_CHUNK = (tl.constexpr(c) for c in range(5))
LAYOUT_COLS = tl.constexpr(5)


@triton.jit
def _column(table, tensor, COLS: tl.constexpr, col: tl.constexpr):
    return tl.load(table + tensor * COLS + col)


@triton.jit
def _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2, step_size, decay,
           bias2_sqrt, eps, grad_scale,
           P_KIND: tl.constexpr, G_KIND: tl.constexpr, S_KIND: tl.constexpr,
           DO_UPDATE: tl.constexpr, EMIT_PROBE: tl.constexpr, AMSGRAD: tl.constexpr,
           MAXIMIZE: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
           ITERS: tl.constexpr, FULL: tl.constexpr, ALIGNED: tl.constexpr):
    """The elements of one chunk; returns its [K_PAD] probe partial sums."""
    g_address = _column(addresses, tensor, ADDRESS_COLS, G)
    p_address = _column(addresses, tensor, ADDRESS_COLS, P)
    m_address = _column(addresses, tensor, ADDRESS_COLS, M)
    v_address = _column(addresses, tensor, ADDRESS_COLS, V)
    vmax_address = _column(addresses, tensor, ADDRESS_COLS, VMAX)
    acc = tl.zeros([K_PAD], dtype=tl.float32)
    # A constexpr trip count: Triton 3.6's interpreter cannot loop over a runtime tensor bound.
    # The last chunk of a tensor masks its empty blocks instead of skipping them.
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        if FULL:
            inside = tl.full([BLOCK], 1, tl.int1)
        else:
            inside = offs < numel
        g = load_f32(g_address, offs, inside, G_KIND, ALIGNED)
        if MAXIMIZE:
            g = -g
        if grad_scale is not None:
            g = g / tl.load(grad_scale)
        if EMIT_PROBE:
            acc += chunk_partials(g, probe_hash(offs + offset, key), K_PAD)
        if DO_UPDATE:
            live = inside & go
            m = load_f32(m_address, offs, live, S_KIND, ALIGNED)
            v = load_f32(v_address, offs, live, S_KIND, ALIGNED)
            p = load_f32(p_address, offs, live, P_KIND, ALIGNED)
            m = b1 * m + c1 * g
            v = b2 * v + c2 * g * g
            if AMSGRAD:
                v_used = tl.maximum(load_f32(vmax_address, offs, live, S_KIND, ALIGNED), v)
                store_f32(vmax_address, offs, v_used, live, S_KIND, ALIGNED)
            else:
                v_used = v
            # the association of torch's AdamW: step_size * m / (sqrt(v) / sqrt(bias2) + eps)
            p = p * decay
            p = p - step_size * m / (tl.sqrt_rn(v_used) / bias2_sqrt + eps)
            store_f32(m_address, offs, m, live, S_KIND, ALIGNED)
            store_f32(v_address, offs, v, live, S_KIND, ALIGNED)
            store_f32(p_address, offs, p, live, P_KIND, ALIGNED)
    return acc


@triton.jit
def multi_tensor_step_kernel(
        chunk_tensor, addresses, layout, stats, stats_stride, partials,
        lr, beta1, beta2, beta1_comp, beta2_comp, beta1_log2, beta2_log2, eps, weight_decay,
        damping, grad_scale, found_inf, window,
        P_KIND: tl.constexpr, G_KIND: tl.constexpr, S_KIND: tl.constexpr,
        DO_UPDATE: tl.constexpr, EMIT_PROBE: tl.constexpr, DAMPED: tl.constexpr,
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid).to(tl.int64)
    numel = _column(layout, tensor, LAYOUT_COLS, NUMEL)
    first = _column(layout, tensor, LAYOUT_COLS, FIRST_CHUNK)
    row = _column(layout, tensor, LAYOUT_COLS, ROW)
    offset = _column(layout, tensor, LAYOUT_COLS, OFFSET)
    start = (pid - first) * (BLOCK * ITERS)
    stats_row = stats + row * stats_stride
    go = proceed(found_inf)

    # the probe key: a full window redraws the directions before this step's sample (finalize)
    count = tl.load(stats_row + 2 * K)
    epoch = tl.load(stats_row + 2 * K + 1)
    epoch = epoch + tl.where((window > 0) & (count >= window), 1.0, 0.0)
    key = probe_key(_column(layout, tensor, LAYOUT_COLS, KEY_BASE), epoch.to(tl.int64))

    # per-tensor scalars of the update (step counts were already advanced on the host side)
    b1, c1, log2_b1 = beta_terms(beta1, beta1_comp, beta1_log2)
    b2, c2, log2_b2 = beta_terms(beta2, beta2_comp, beta2_log2)
    step_size = scalar_f32(lr)
    decay = 1.0 - step_size * scalar_f32(weight_decay)
    t = tl.load(_column(addresses, tensor, ADDRESS_COLS, STEP).to(tl.pointer_type(tl.float32)))
    bias1 = 1.0 - tl.exp2(t * log2_b1)
    bias2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(t * log2_b2))
    if DAMPED:
        step_size = step_size * tl.exp(-scalar_f32(damping) * tl.load(stats_row + 2 * K + 2))
    step_size = step_size / bias1

    if start + BLOCK * ITERS <= numel:
        acc = _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2, step_size,
                     decay, bias2_sqrt, eps, grad_scale, P_KIND, G_KIND, S_KIND, DO_UPDATE,
                     EMIT_PROBE, AMSGRAD, MAXIMIZE, K_PAD, BLOCK, ITERS, True, ALIGNED)
    else:
        acc = _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2, step_size,
                     decay, bias2_sqrt, eps, grad_scale, P_KIND, G_KIND, S_KIND, DO_UPDATE,
                     EMIT_PROBE, AMSGRAD, MAXIMIZE, K_PAD, BLOCK, ITERS, False, ALIGNED)
    if EMIT_PROBE:
        tl.store(partials + pid * K_PAD + tl.arange(0, K_PAD), acc)
