"""Loads and stores through int64 addresses, converting to and from fp32.

bf16 travels as its uint16 bits: widening is a shift, narrowing rounds to nearest even with an
integer bit trick, so the interpreter (which has no native bf16) and the GPU give the same bits.
``ALIGNED`` promises 16-byte aligned addresses, which lets the compiler use vector accesses.
"""
import torch
import triton
import triton.language as tl

FP32: tl.constexpr = tl.constexpr(0)
FP16: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)

KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ALIGNMENT = 16  # bytes; the host checks every address against it before promising ALIGNED


@triton.jit
def _pointer(address, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    if KIND == BF16:
        ptr = address.to(tl.pointer_type(tl.uint16))
    elif KIND == FP16:
        ptr = address.to(tl.pointer_type(tl.float16))
    else:
        ptr = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def load_f32(address, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements ``offs`` of the tensor at int64 ``address`` as fp32 (0 where masked)."""
    x = tl.load(_pointer(address, KIND, ALIGNED) + offs, mask=mask, other=0)
    if KIND == BF16:
        x = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def bf16_bits(x):
    """uint16 bits of fp32 ``x`` rounded to the nearest bf16, ties to even (NaN stays NaN)."""
    u = x.to(tl.uint32, bitcast=True)
    lsb = (u >> 16) & 1
    rounded = (u + lsb + 0x7FFF) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16)


@triton.jit
def store_f32(address, offs, x, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Store fp32 ``x`` into elements ``offs`` of the tensor at int64 ``address``."""
    if KIND == BF16:
        value = bf16_bits(x)
    elif KIND == FP16:
        value = x.to(tl.float16)
    else:
        value = x
    tl.store(_pointer(address, KIND, ALIGNED) + offs, value, mask=mask)


@triton.jit
def scalar_f32(x):
    """A hyperparameter given either as a number or as a pointer to a device scalar."""
    if isinstance(x, float):  # the interpreter passes numbers as Python floats
        value = x
    elif x.dtype.is_ptr():
        value = tl.load(x).to(tl.float32)
    else:
        value = x
    return value


@triton.jit
def proceed(found_inf):
    """False when GradScaler's ``found_inf`` is given and set: the step must change nothing."""
    if found_inf is None:
        go = tl.full([], 1, tl.int1)
    else:
        go = tl.where(tl.load(found_inf) > 0, 0, 1) != 0
    return go


@triton.jit
def pow_f32(base, exponent):
    """base ** exponent for base in [0, 1) and exponent >= 1 (bias corrections)."""
    return tl.exp2(exponent * tl.log2(base))


STEP_BITS: tl.constexpr = tl.constexpr(25)  # an fp32 step count stops growing at 2**24


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
