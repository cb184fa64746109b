"""GGML blocks -> fp32 weights, in torch on any device: bit for bit what gguf-py (and ggml's C) gives.

Each block format (ggml-common.h's structs, little-endian, fp16 scales) is unpacked with
integer ops, then scaled in fp32 in the reference's order: every product and difference is
its own torch op, so no compiler contracts two roundings into one (an FMA), on the CPU or on
CUDA. Per type, weight = (layout in order; d, dmin, m are fp16):
- Q8_0: d, int8 q[32]                                  -> d*q
- Q4_0: d, nibbles[16] (q[j] low, q[j+16] high)        -> d*(q-8)
- Q4_1: d, m, nibbles[16]                              -> d*q + m
- Q5_0: d, u32 fifth bits, nibbles[16]                 -> d*(q-16)
- Q5_1: d, m, u32 fifth bits, nibbles[16]              -> d*q + m
- Q2_K: scale|min nibbles[16], 2-bit q[64 B], d, dmin  -> (d*sc)*q - dmin*m   (16 sub-blocks of 16)
- Q3_K: high-bit mask[32], 2-bit q[64 B], 6-bit scales[12], d -> (d*(sc-32))*(q-4)   (16 of 16)
- Q4_K: d, dmin, 6-bit scales and mins[12], nibbles[128] -> (d*sc)*q - dmin*m   (8 of 32)
- Q5_K: d, dmin, scales[12], fifth bits[32], nibbles[128] -> (d*sc)*q - dmin*m   (8 of 32)
- Q6_K: low nibbles[128], high 2 bits[64], int8 scales[16], d -> (d*sc)*(q-32)   (16 of 16)
"""

from __future__ import annotations

import functools
import math

import torch

from ..spread import MIN_SPREAD_ELEMENTS, run_spread, single_threaded_ops
from .qtypes import (
    BF16,
    F16,
    F32,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QType,
    qtype_of,
)

CHUNK_WEIGHTS = 1 << 20  # dequantized at a time: bounds the fp32 temporaries beside the output


@functools.cache
def _shifts(device: torch.device, step: int, count: int) -> torch.Tensor:
    return torch.arange(0, step * count, step, dtype=torch.uint8, device=device)


def _bits(packed: torch.Tensor, step: int, count: int) -> torch.Tensor:
    """(..., n) bytes -> (..., count, n): field k holds (byte >> step*k); the caller masks."""
    shifts = _shifts(packed.device, step, count).view(count, 1)
    return packed.unsqueeze(-2).bitwise_right_shift(shifts)


def half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of each block, as fp32 (n, 1)."""
    return blocks[:, offset : offset + 2].view(torch.float16).float()


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, 16) bytes -> (n, 32) values: byte j's low nibble is value j, its high one value j+16."""
    return _bits(packed, 4, 2).bitwise_and_(15).flatten(-2)


def fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """A little-endian u32 as bytes (n, 4) -> its 32 bits (n, 32), bit j at j."""
    return _bits(qh, 1, 8).bitwise_and_(1).transpose(-1, -2).flatten(-2)


def k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (n, 8) each (ggml's get_scale_min_k4)."""
    low, high, both = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([low & 63, (both & 15) | ((low >> 2) & 48)], dim=1)
    mins = torch.cat([high & 63, (both >> 4) | ((high >> 2) & 48)], dim=1)
    return scales, mins


def q3_scales(packed: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes -> 16 signed scales (n, 16): low nibbles in bytes 0-7, top 2 bits in bytes 8-11."""
    low = _bits(packed[:, :8], 4, 2).flatten(-2) & 15  # j < 8: byte j's low nibble; j >= 8: byte j-8's high one
    high = _bits(packed[:, 8:12], 2, 4).flatten(-2) & 3  # j: byte 8 + j%4, bits 2*(j//4)
    return (low | (high << 4)).to(torch.int8) - 32


def _legacy_q(blocks: torch.Tensor, qs_at: int, qh_at: int | None) -> torch.Tensor:
    q = nibbles(blocks[:, qs_at : qs_at + 16])
    if qh_at is not None:
        q |= fifth_bits(blocks[:, qh_at : qh_at + 4]) << 4
    return q.float()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float() * half(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return half(blocks, 0) * (_legacy_q(blocks, 2, None) - 8)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return half(blocks, 0) * _legacy_q(blocks, 4, None) + half(blocks, 2)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return half(blocks, 0) * (_legacy_q(blocks, 6, 2) - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return half(blocks, 0) * _legacy_q(blocks, 8, 4) + half(blocks, 2)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    packed = blocks[:, :16]
    scaled = (half(blocks, 80) * (packed & 15).float()).view(n, 16, 1)
    shifted = (half(blocks, 82) * (packed >> 4).float()).view(n, 16, 1)
    q = _bits(blocks[:, 16:80].reshape(n, 2, 32), 2, 4).bitwise_and_(3).reshape(n, 16, 16).float()
    return (scaled * q - shifted).view(n, 256)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scaled = (half(blocks, 108) * q3_scales(blocks[:, 96:108]).float()).view(n, 16, 1)
    low = _bits(blocks[:, 32:96].reshape(n, 2, 32), 2, 4).bitwise_and_(3).reshape(n, 16, 16)
    high = _bits(blocks[:, :32], 1, 8).bitwise_and_(1).reshape(n, 16, 16)
    q = low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8)  # the offset 4 applies where the mask bit is 0
    return (scaled * q.float()).view(n, 256)


def _k_quant(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, mins = k_scales_mins(blocks[:, 4:16])
    scaled = (half(blocks, 0) * scales.float()).view(n, 8, 1)
    shifted = (half(blocks, 2) * mins.float()).view(n, 8, 1)
    return (scaled * q.float() - shifted).view(n, 256)


def _k_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, 128) -> (n, 8, 32): chunk c of 32 bytes holds sub-block 2c in its low nibbles, 2c+1 in its high."""
    n = packed.shape[0]
    return _bits(packed.reshape(n, 4, 32), 4, 2).bitwise_and_(15).reshape(n, 8, 32)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    return _k_quant(blocks, _k_nibbles(blocks[:, 16:144]))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    high = _bits(blocks[:, 16:48], 1, 8).bitwise_and_(1).reshape(n, 8, 32)
    return _k_quant(blocks, _k_nibbles(blocks[:, 48:176]) | (high << 4))


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scaled = (half(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    low = _bits(blocks[:, :128].reshape(n, 2, 64), 4, 2).bitwise_and_(15).reshape(n, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(n, 2, 32), 2, 4).bitwise_and_(3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (scaled * q.view(n, 16, 16).float()).view(n, 256)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).float()


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


DEQUANTIZE = {
    F32: _f32,
    F16: _f16,
    BF16: _bf16,
    Q8_0: _q8_0,
    Q4_0: _q4_0,
    Q4_1: _q4_1,
    Q5_0: _q5_0,
    Q5_1: _q5_1,
    Q2_K: _q2_k,
    Q3_K: _q3_k,
    Q4_K: _q4_k,
    Q5_K: _q5_k,
    Q6_K: _q6_k,
}


def dequantize_blocks(blocks: torch.Tensor, qtype: QType | str) -> torch.Tensor:
    """(n, type_size) uint8 -> (n, block_size) fp32."""
    qtype = qtype_of(qtype)
    return DEQUANTIZE[qtype](blocks.view(-1, qtype.type_size)).view(-1, qtype.block_size)


def columns_of(data: torch.Tensor, qtype: QType | str) -> int:
    qtype = qtype_of(qtype)
    if data.dtype != torch.uint8 or data.dim() == 0 or data.shape[-1] % qtype.type_size:
        raise ValueError(
            f"{qtype} rows are uint8 whole blocks of {qtype.type_size} bytes, not {data.dtype} {data.shape}"
        )
    return data.shape[-1] // qtype.type_size * qtype.block_size


def dequantize(data: torch.Tensor, qtype: QType | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of blocks (..., row_bytes) uint8 -> weights (..., columns) in `dtype` (computed in fp32)."""
    columns = columns_of(data, qtype)
    out = torch.empty((*data.shape[:-1], columns), dtype=dtype, device=data.device)
    return dequantize_into(out, data, qtype)


def dequantize_into(out: torch.Tensor, data: torch.Tensor, qtype: QType | str) -> torch.Tensor:
    """`dequantize` into `out` (any float dtype), a chunk of rows at a time: the fp32 temporaries stay near
    CHUNK_WEIGHTS, whatever the weight's size. On a CPU the chunks are jobs spread over the cores, each on one
    thread (wanlora.weights.spread: robust to a core another process keeps busy)."""
    qtype = qtype_of(qtype)
    columns = columns_of(data, qtype)
    rows = math.prod(data.shape[:-1])
    if tuple(out.shape) != (*data.shape[:-1], columns):
        wanted = (*data.shape[:-1], columns)
        raise ValueError(f"{qtype} rows {tuple(data.shape)} dequantize to {wanted}, not {tuple(out.shape)}")
    flat_in, flat_out = data.reshape(rows, -1), out.view(rows, columns)
    step = max(1, CHUNK_WEIGHTS // max(1, columns))

    def job(start: int, stop: int) -> None:
        weights = dequantize_blocks(flat_in[start:stop].contiguous(), qtype)
        flat_out[start:stop].copy_(weights.view(stop - start, columns))

    chunks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    if data.device.type != "cpu":
        for start, stop in chunks:
            job(start, stop)
    elif rows * columns < MIN_SPREAD_ELEMENTS:
        with single_threaded_ops():  # too little work for threads: one core, no barriers
            for start, stop in chunks:
                job(start, stop)
    else:
        run_spread([((stop - start) * columns, functools.partial(job, start, stop)) for start, stop in chunks])
    return out
