"""The CPU kernels behind fp8_cpu.py, compiled by numba when fp8_cpu calls `compile_kernels`.

Each kernel takes C-contiguous numpy views of torch tensors and releases the GIL. The arithmetic
is 32-bit integer and float32 throughout, cast back after every step: numba widens integer
arithmetic to 64 bits, which would halve the vector width LLVM gives these loops. Nothing needs a
CPU feature beyond SSE2 (no float16 conversions: without F16C, LLVM calls a runtime helper that
numba's JIT cannot link, and the process aborts).

The fp32 -> fp8 conversions transcribe PyTorch's own (c10's `fp8e4m3fn_from_fp32_value` and
`fp8e5m2_from_fp32_value`, torch/headeronly/util/Float8_*.h, torch 2.12 on): round to nearest
even, the same subnormals, NaN to NaN, and past the largest value e4m3fn saturates and e5m2
overflows to infinity. Earlier torch gives e4m3fn's NaN code from 464 on; only a row holding
NaN or infinity can reach those values here (any other row's scale brings it within +-max).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

I32 = np.int32
F32 = np.float32
TINY = F32(np.finfo(np.float32).tiny)  # the smallest scale, as the torch path clamps it: a normal number

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


# ------------------------------------------------------------------ one value each way


@njit(inline="always")
def e4m3fn_value(code):
    """An e4m3fn code's value: s eeee mmm is 2^(e-7) x 1.mmm, m x 2^-9 where e is 0, NaN for s 1111 111."""
    magnitude = I32(code & 0x7F)
    placed = I32(I32(magnitude << 20) + I32(120 << 23))  # eeee mmm as float32's exponent and mantissa, rebiased
    normal = float_of(placed)
    subnormal = float_of(I32(placed + I32(1 << 23))) - F32(2.0**-6)  # 2^-6 x 1.mmm - 2^-6, exactly
    value = normal if magnitude >= 8 else subnormal
    value = np.float32(np.nan) if magnitude == 0x7F else value
    return float_of(I32(bits_of(value) | I32(I32(code & 0x80) << 24)))


@njit(inline="always")
def e5m2_value(code):
    """An e5m2 code's value: s eeeee mm is 2^(e-15) x 1.mm, m x 2^-16 where e is 0; infinity and NaN at e 31."""
    magnitude = I32(code & 0x7F)
    placed = I32(I32(magnitude << 21) + I32(112 << 23))
    normal = float_of(placed)
    subnormal = float_of(I32(placed + I32(1 << 23))) - F32(2.0**-14)
    value = normal if magnitude >= 4 else subnormal
    special = float_of(I32(I32(0x7F800000) | I32(I32(magnitude & 3) << 21)))  # infinity, or NaN
    value = special if magnitude >= 0x7C else value
    return float_of(I32(bits_of(value) | I32(I32(code & 0x80) << 24)))


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


# Four plain functions, not one per format from a factory: numba keeps no closure in its cache.


def widen_e4m3fn(codes, scale, out):
    for r in range(codes.shape[0]):
        factor, source, target = scale[r], codes[r], out[r]
        for column in range(source.shape[0]):
            target[column] = e4m3fn_value(I32(source[column])) * factor


def widen_e5m2(codes, scale, out):
    for r in range(codes.shape[0]):
        factor, source, target = scale[r], codes[r], out[r]
        for column in range(source.shape[0]):
            target[column] = e5m2_value(I32(source[column])) * factor


def narrow_e4m3fn(rows, out, scales):
    for r in range(rows.shape[0]):  # a row at a time: its second pass finds it still in the core's cache
        source, target = rows[r], out[r]
        scale = scales[r] = row_scale(source, F32(448.0))
        for column in range(source.shape[0]):
            target[column] = e4m3fn_code(source[column] / scale)


def narrow_e5m2(rows, out, scales):
    for r in range(rows.shape[0]):
        source, target = rows[r], out[r]
        scale = scales[r] = row_scale(source, F32(57344.0))
        for column in range(source.shape[0]):
            target[column] = e5m2_code(source[column] / scale)


KERNELS = {
    "widen_e4m3fn": (widen_e4m3fn, WIDEN),
    "widen_e5m2": (widen_e5m2, WIDEN),
    "narrow_e4m3fn": (narrow_e4m3fn, NARROW),
    "narrow_e5m2": (narrow_e5m2, NARROW),
}


def compile_kernels(cache: bool) -> dict[str, Callable]:
    """Every kernel compiled for its one signature, by name; `cache`: kept in numba's cache (raises
    RuntimeError where numba finds nowhere to write it: a read-only install and no writable home)."""
    return {
        name: njit(signature, nogil=True, cache=cache, error_model="numpy")(function)
        for name, (function, signature) in KERNELS.items()
    }
