"""The CPU kernels behind fp8_cpu.py, compiled by numba (imported only through fp8_cpu, which falls back without).

Each kernel takes C-contiguous numpy views of torch tensors and releases the GIL. The arithmetic
is 32-bit integer and float32 throughout, cast back after every step: numba widens integer
arithmetic to 64 bits, which would halve the vector width LLVM gives these loops.

The fp32 -> fp8 conversions transcribe PyTorch's own (c10's `fp8e4m3fn_from_fp32_value` and
`fp8e5m2_from_fp32_value`, torch/headeronly/util/Float8_*.h): round to nearest even, with the
same answers for overflow, NaN and subnormals, so that a tensor rounds to the same bits here
and through torch.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

I32 = np.int32
F32 = np.float32
TINY = F32(np.finfo(np.float32).tiny)  # the smallest scale: a row's amax below 2^-126 x max is all zeros anyway

ROWS = types.float32[:, ::1]
CODES = types.uint8[:, ::1]
SCALES = types.float32[::1]
WIDEN = types.void(CODES, SCALES, ROWS)
NARROW = types.void(ROWS, CODES, SCALES)


@intrinsic
def bits_of(typingctx, value):
    """A float32's bits as an int32 (C's memcpy, or a union)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def float_of(typingctx, bits):
    """The float32 whose bits an int32 holds."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def half_value(typingctx, bits):
    """The float16 whose bits an int32's low 16 hold, as a float32 (exact: F16C's vcvtph2ps, a vector at a time)."""

    def codegen(context, builder, signature, args):
        half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.int32), codegen


# ------------------------------------------------------------------ one value each way


@njit(inline="always")
def e4m3fn_value(code):
    """An e4m3fn code's value, NaN for s 1111 111. Its bits s eeee mmm, placed as float16's s 0eeee mmm0000000,
    are the value x 2^-8 (exponent bias 15 against 7; subnormals too), and x 256 is exact in float32."""
    half = I32(I32(I32(code & 0x7F) << 7) | I32(I32(code & 0x80) << 8))
    value = half_value(half) * F32(256.0)
    return np.float32(np.nan) if I32(code & 0x7F) == 0x7F else value


@njit(inline="always")
def e5m2_value(code):
    """An e5m2 code's value: its bits are float16's top byte (the same exponent; infinities and NaN too)."""
    return half_value(I32(code << 8))


@njit(inline="always")
def e4m3fn_code(value):
    """c10's fp8e4m3fn_from_fp32_value: nearest even; past the largest value 448 (and infinity) saturates to it."""
    bits = bits_of(value)
    sign = I32(I32(bits >> 24) & 0x80)
    magnitude = I32(bits & 0x7FFFFFFF)
    denorm = I32(141 << 23)  # below 2^-6, adding 2^14 rounds to the subnormal grid and leaves the code in the low bits
    subnormal = I32(bits_of(float_of(magnitude) + float_of(denorm)) - denorm)
    odd = I32(I32(magnitude >> 20) & 1)
    normal = I32(I32(I32(magnitude + I32(((7 - 127) << 23) + 0x7FFFF)) + odd) >> 20)
    code = subnormal if magnitude < I32(121 << 23) else min(normal, I32(0x7E))  # from 464 on: 448, as c10 saturates
    code = I32(0x7F) if magnitude > I32(0x7F800000) else code
    return np.uint8(I32(code | sign) & 0xFF)


@njit(inline="always")
def e5m2_code(value):
    """c10's fp8e5m2_from_fp32_value: nearest even; from 2^16 on infinity, NaN stays NaN."""
    bits = bits_of(value)
    sign = I32(I32(bits >> 24) & 0x80)
    magnitude = I32(bits & 0x7FFFFFFF)
    denorm = I32(134 << 23)
    subnormal = I32(bits_of(float_of(magnitude) + float_of(denorm)) - denorm)
    odd = I32(I32(magnitude >> 21) & 1)
    normal = I32(I32(I32(magnitude + I32(((15 - 127) << 23) + 0xFFFFF)) + odd) >> 21)
    code = subnormal if magnitude < I32(113 << 23) else min(normal, I32(0x7C))  # from 61440 on: infinity
    code = I32(0x7F) if magnitude > I32(0x7F800000) else code
    return np.uint8(I32(code | sign) & 0xFF)


# ------------------------------------------------------------------ rows: fp8 x scale -> fp32, and back


@njit(inline="always")
def row_scale(row, top):
    """amax(|row|) / top, 1 for a row of zeros, never below TINY: fp8.quantize_rows_into's scale, bit for bit.

    amax is the largest magnitude's bits as an integer: for floats of one sign, integer order is
    value order, and integers make a vector reduction (a NaN's bits top them all, as torch's NaN does).
    """
    largest = I32(0)
    for column in range(row.shape[0]):
        largest = max(largest, I32(bits_of(row[column]) & 0x7FFFFFFF))
    amax = float_of(largest)
    scale = amax / top if amax > F32(0) else F32(1)
    return max(scale, TINY)


@njit(WIDEN, nogil=True, cache=True, error_model="numpy")
def widen_e4m3fn(codes, scale, out):
    for r in range(codes.shape[0]):
        factor, source, target = scale[r], codes[r], out[r]
        for column in range(source.shape[0]):
            target[column] = e4m3fn_value(I32(source[column])) * factor


@njit(WIDEN, nogil=True, cache=True, error_model="numpy")
def widen_e5m2(codes, scale, out):
    for r in range(codes.shape[0]):
        factor, source, target = scale[r], codes[r], out[r]
        for column in range(source.shape[0]):
            target[column] = e5m2_value(I32(source[column])) * factor


@njit(NARROW, nogil=True, cache=True, error_model="numpy")
def narrow_e4m3fn(rows, out, scales):
    for r in range(rows.shape[0]):  # a row at a time: its second pass reads it from the L1 cache
        source, target = rows[r], out[r]
        scale = scales[r] = row_scale(source, F32(448.0))
        for column in range(source.shape[0]):
            target[column] = e4m3fn_code(source[column] / scale)


@njit(NARROW, nogil=True, cache=True, error_model="numpy")
def narrow_e5m2(rows, out, scales):
    for r in range(rows.shape[0]):
        source, target = rows[r], out[r]
        scale = scales[r] = row_scale(source, F32(57344.0))
        for column in range(source.shape[0]):
            target[column] = e5m2_code(source[column] / scale)
