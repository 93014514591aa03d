"""The multi-tensor S-Adam pass: one launch covers every tensor of a (device, dtype) bucket.

Each program owns one chunk of ``BLOCK * ITERS`` elements of one tensor (``chunk_tensor`` says
which). Per element it reads p, g, m, v (and vmax) and writes them back once; with ``EMIT_PROBE``
the same pass hashes each element's global index once (one 32-bit hash holds all k sign bits) and
adds ``s_i(e) * g(e)`` into a [K_PAD, BLOCK] register accumulator that is reduced once, after the
loop, into the chunk's k partial sums -- no cross-thread reduction (and no barrier) in the element
loop. With ``DO_UPDATE`` off the same kernel is the ``probe_lag=0`` probe pass (only g is read).

Vector (16-byte) accesses are chosen per tensor: full chunks of a tensor whose addresses are all
aligned run an unmasked loop the compiler vectorizes; other tensors and the last chunk of every
tensor run the masked, scalar one.

Scalar coefficients (1 - beta, 1 - lr * weight_decay, the bias corrections 1 - beta**t, the step
size lr * gamma / (1 - beta1**t)) are computed once per program in float64 -- as the reference and
torch's AdamW do -- from hyperparameters given either as device scalars or as numbers split into
two fp32 halves (``x`` + ``x_lo``) that carry their double value into the kernel.
"""
import triton
import triton.language as tl

from ._convert import load_f32, proceed, scalar_f32, store_f32
from ._hash import probe_hash, probe_key

# Columns of the per-tensor tables (int64). Addresses change when tensors are reallocated, the
# layout columns only when shapes change, so the two live in separate tables.
P, G, M, V, VMAX, STEP, ALIGNED = (tl.constexpr(c) for c in range(7))
ADDRESS_COLS = tl.constexpr(7)
NUMEL, OFFSET, KEY_BASE, ROW, FIRST_CHUNK = (tl.constexpr(c) for c in range(5))
LAYOUT_COLS = tl.constexpr(5)
STEP_BITS: tl.constexpr = tl.constexpr(25)  # an fp32 step count stops growing at 2**24


@triton.jit
def _column(table, tensor, COLS: tl.constexpr, col: tl.constexpr):
    return tl.load(table + tensor * COLS + col)


@triton.jit
def scalar_f64(x, x_lo):
    """A hyperparameter in float64: a device scalar (``x_lo`` None) or a number split in two
    fp32 halves (the interpreter passes numbers as Python floats)."""
    if x_lo is None:
        value = tl.load(x).to(tl.float64)
    elif isinstance(x, float):
        value = tl.full([], x, tl.float64) + tl.full([], x_lo, tl.float64)
    else:
        value = x.to(tl.float64) + x_lo.to(tl.float64)
    return value


@triton.jit
def power_f64(base, count):
    """base ** count in float64 for an fp32 count of steps, by repeated squaring."""
    n = count.to(tl.int32)
    result = tl.full([], 1.0, tl.float64)
    for bit in tl.static_range(STEP_BITS):
        result = tl.where(((n >> bit) & 1) != 0, result * base, result)
        base = base * base
    return result


@triton.jit
def _signed_sums(acc, g, index, key, K_PAD: tl.constexpr):
    """acc[i, :] += s_i * g: -g with its sign flipped back where bit i of the element's hash is
    set (bit i shifted into the sign position; one shift and one logic op per probe)."""
    bits = probe_hash(index, key)  # [1, BLOCK]
    probe = tl.arange(0, K_PAD).to(tl.uint32)[:, None]
    flip = (bits << (31 - probe)) & 0x80000000
    signed = (-g).to(tl.uint32, bitcast=True) ^ flip
    return acc + signed.to(tl.float32, bitcast=True)


@triton.jit
def _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2, step_size, decay,
           inv_bias2_sqrt, eps, grad_inv_scale,
           P_KIND: tl.constexpr, G_KIND: tl.constexpr, S_KIND: tl.constexpr,
           DO_UPDATE: tl.constexpr, EMIT_PROBE: tl.constexpr, AMSGRAD: tl.constexpr,
           MAXIMIZE: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
           ITERS: tl.constexpr, FULL: tl.constexpr, VECTOR: tl.constexpr):
    """The elements of one chunk; returns its [K_PAD] probe partial sums.

    FULL: every element of the chunk exists (no bounds mask). VECTOR: FULL and 16-byte aligned.
    """
    g_address = _column(addresses, tensor, ADDRESS_COLS, G)
    p_address = _column(addresses, tensor, ADDRESS_COLS, P)
    m_address = _column(addresses, tensor, ADDRESS_COLS, M)
    v_address = _column(addresses, tensor, ADDRESS_COLS, V)
    vmax_address = _column(addresses, tensor, ADDRESS_COLS, VMAX)
    # Every per-element tensor is [1, BLOCK], the same 2-D layout family as the accumulator, so
    # broadcasting g over the probes needs no layout conversion (shared memory, barriers).
    acc = tl.zeros([K_PAD, BLOCK], dtype=tl.float32)
    lanes = tl.arange(0, BLOCK)[None, :]
    for it in range(ITERS):
        first = start + it * BLOCK
        if FULL or first < numel:  # the last chunk of a tensor skips its empty blocks
            offs = first + lanes
            if FULL:
                inside = tl.full([1, BLOCK], 1, tl.int1)
            else:
                inside = offs < numel
            live = inside & go
            # every load of the iteration is issued before the arithmetic that needs it
            g = load_f32(g_address, offs, inside, G_KIND, VECTOR)
            if DO_UPDATE:
                m = load_f32(m_address, offs, live, S_KIND, VECTOR)
                v = load_f32(v_address, offs, live, S_KIND, VECTOR)
                p = load_f32(p_address, offs, live, P_KIND, VECTOR)
                if AMSGRAD:
                    vmax = load_f32(vmax_address, offs, live, S_KIND, VECTOR)
            if MAXIMIZE:
                g = -g
            if grad_inv_scale is not None:
                g = g * grad_inv_scale  # as GradScaler.unscale_ does
            if EMIT_PROBE:
                acc = _signed_sums(acc, g, offs + offset, key, K_PAD)
            if DO_UPDATE:
                m = b1 * m + c1 * g
                v = b2 * v + c2 * g * g
                if AMSGRAD:
                    v_used = tl.maximum(vmax, v)
                    store_f32(vmax_address, offs, v_used, live, S_KIND, VECTOR)
                else:
                    v_used = v
                # the reference's association, p * decay - step_size * m / (sqrt(v) / sqrt(bias2)
                # + eps), with its IEEE division; 1 / sqrt(bias2) is a float64 coefficient
                denom = tl.sqrt(v_used) * inv_bias2_sqrt + eps
                p = p * decay - tl.div_rn(step_size * m, denom)
                store_f32(m_address, offs, m, live, S_KIND, VECTOR)
                store_f32(v_address, offs, v, live, S_KIND, VECTOR)
                store_f32(p_address, offs, p, live, P_KIND, VECTOR)
    return tl.sum(acc, axis=1)


@triton.jit
def multi_tensor_step_kernel(
        chunk_tensor, addresses, layout, stats, stats_stride, partials,
        lr, lr_lo, weight_decay, weight_decay_lo, beta1, beta1_lo, beta2, beta2_lo, eps,
        damping, grad_scale, found_inf, window,
        P_KIND: tl.constexpr, G_KIND: tl.constexpr, S_KIND: tl.constexpr,
        DO_UPDATE: tl.constexpr, EMIT_PROBE: tl.constexpr, DAMPED: tl.constexpr,
        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
        BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor + pid).to(tl.int64)
    numel = _column(layout, tensor, LAYOUT_COLS, NUMEL)
    first = _column(layout, tensor, LAYOUT_COLS, FIRST_CHUNK)
    row = _column(layout, tensor, LAYOUT_COLS, ROW)
    offset = _column(layout, tensor, LAYOUT_COLS, OFFSET)
    start = (pid - first) * (BLOCK * ITERS)
    stats_row = stats + row * stats_stride
    go = proceed(found_inf)

    key = 0
    if EMIT_PROBE:  # a full window redraws the directions before this step's sample (finalize)
        count = tl.load(stats_row + 2 * K)
        epoch = tl.load(stats_row + 2 * K + 1)
        epoch = epoch + tl.where((window > 0) & (count >= window), 1.0, 0.0)
        key = probe_key(_column(layout, tensor, LAYOUT_COLS, KEY_BASE), epoch.to(tl.int64))

    # per-tensor coefficients in float64 (step counts were already advanced on the host side)
    b1_64 = scalar_f64(beta1, beta1_lo)
    b2_64 = scalar_f64(beta2, beta2_lo)
    lr_64 = scalar_f64(lr, lr_lo)
    t = tl.load(_column(addresses, tensor, ADDRESS_COLS, STEP).to(tl.pointer_type(tl.float32)))
    bias1 = 1.0 - power_f64(b1_64, t)
    inv_bias2_sqrt = (1.0 / tl.sqrt(1.0 - power_f64(b2_64, t))).to(tl.float32)  # sqrt.rn.f64
    decay = (1.0 - lr_64 * scalar_f64(weight_decay, weight_decay_lo)).to(tl.float32)
    step_64 = lr_64
    if DAMPED:
        rho = tl.load(stats_row + 2 * K + 2)
        step_64 = step_64 * tl.exp(-scalar_f32(damping) * rho).to(tl.float64)
    step_size = (step_64 / bias1).to(tl.float32)
    b1 = b1_64.to(tl.float32)
    c1 = (1.0 - b1_64).to(tl.float32)
    b2 = b2_64.to(tl.float32)
    c2 = (1.0 - b2_64).to(tl.float32)
    grad_inv_scale = None
    if grad_scale is not None:
        grad_inv_scale = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)

    vector = _column(addresses, tensor, ADDRESS_COLS, ALIGNED) != 0
    if start + BLOCK * ITERS <= numel:
        if vector:
            acc = _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2,
                         step_size, decay, inv_bias2_sqrt, eps, grad_inv_scale, P_KIND, G_KIND,
                         S_KIND, DO_UPDATE, EMIT_PROBE, AMSGRAD, MAXIMIZE, K_PAD, BLOCK, ITERS,
                         True, True)
        else:
            acc = _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2,
                         step_size, decay, inv_bias2_sqrt, eps, grad_inv_scale, P_KIND, G_KIND,
                         S_KIND, DO_UPDATE, EMIT_PROBE, AMSGRAD, MAXIMIZE, K_PAD, BLOCK, ITERS,
                         True, False)
    else:
        acc = _chunk(start, numel, go, addresses, tensor, offset, key, b1, c1, b2, c2,
                     step_size, decay, inv_bias2_sqrt, eps, grad_inv_scale, P_KIND, G_KIND, S_KIND,
                     DO_UPDATE, EMIT_PROBE, AMSGRAD, MAXIMIZE, K_PAD, BLOCK, ITERS, False, False)
    if EMIT_PROBE:
        tl.store(partials + pid * K_PAD + tl.arange(0, K_PAD), acc)
