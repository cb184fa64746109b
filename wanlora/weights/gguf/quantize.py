"""fp32 rows -> GGML blocks, in torch on any device: deterministic, a row at a time.

A block depends on its own 32 or 256 weights only, so any chunk of rows quantizes alone and
gives the bytes the whole tensor would. The same rows give the same bytes on every run and
device (wanlora.weights.gguf.arith says how).

- F32, F16, BF16: the value rounded to nearest even (BF16 as gguf-py and ggml write it: NaN
  made quiet).
- Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: gguf-py's `quantize` (== ggml's `quantize_row_*_ref`), bit for bit:
  Q8_0: d = amax/127, q = x/d rounded half away from zero; Q4_0/Q5_0: d = (the value of largest
  magnitude)/-8 or -16, q = trunc(x/d + 8.5 or 16.5); Q4_1/Q5_1: d = (max-min)/15 or 31,
  q = trunc((x-min)/d + 0.5). q is computed with the fp32 d, which is stored as fp16.
- Q2_K ... Q6_K: ggml's reference quantizers (wanlora.weights.gguf.kquants), what llama-quantize
  runs without an importance matrix.
"""

from __future__ import annotations

import functools
import math

import torch

from ..spread import MIN_SPREAD_ELEMENTS, run_spread, single_threaded_ops
from .arith import div
from .kquants import K_QUANTIZE
from .qtypes import BF16, F16, F32, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, QType, qtype_of

CPU_CHUNK_WEIGHTS = 1 << 18
DEVICE_CHUNK_WEIGHTS = 1 << 22


def _scale_and_inverse(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, 1/d where d != 0 else 0): what the reference multiplies by."""
    inverse = div(1.0, d)
    return d, torch.where(d == 0, torch.zeros_like(inverse), inverse)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    return values.half().view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0-15 (uint8) -> (n, 16) bytes: q[j] in the low nibble, q[j+16] in the high one."""
    return q[:, :16] | (q[:, 16:] << 4)


def _pack_fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0-31 (uint8) -> (n, 4): the u32 whose bit j is bit 4 of q[j], little-endian."""
    bits = ((q >> 4) & 1).view(-1, 4, 8).to(torch.int32)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=q.device)
    return (bits * weights).sum(dim=2).to(torch.uint8)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """gguf-py's np_roundf, exactly: floor(|x|) + floor(2*frac(|x|)), with x's sign."""
    magnitude = values.abs()
    whole = magnitude.floor()
    return values.sign() * (whole + ((magnitude - whole) * 2).floor_())


def _signed_largest(blocks: torch.Tensor) -> torch.Tensor:
    index = blocks.abs().argmax(dim=1, keepdim=True)
    return blocks.gather(1, index)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, inverse = _scale_and_inverse(div(blocks.abs().amax(dim=1, keepdim=True), 127.0))
    q = _round_half_away(blocks * inverse).to(torch.int8).view(torch.uint8)
    return torch.cat([_fp16_bytes(d), q], dim=1)


def _symmetric(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (levels 16) and Q5_0 (32): (fp16 d bytes, q as uint8)."""
    d, inverse = _scale_and_inverse(div(_signed_largest(blocks), -levels / 2))
    q = torch.trunc(blocks * inverse + (levels / 2 + 0.5)).clamp_(0, levels - 1).to(torch.uint8)
    return _fp16_bytes(d), q


def _asymmetric(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (levels 16) and Q5_1 (32): (fp16 d bytes, fp16 min bytes, q as uint8)."""
    low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d, inverse = _scale_and_inverse(div(high - low, float(levels - 1)))
    q = torch.trunc((blocks - low) * inverse + 0.5).clamp_(0, levels - 1).to(torch.uint8)
    return _fp16_bytes(d), _fp16_bytes(low), q


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(blocks, 16)
    return torch.cat([d, _pack_nibbles(q)], dim=1)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(blocks, 32)
    return torch.cat([d, _pack_fifth_bits(q), _pack_nibbles(q & 15)], dim=1)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, low, q = _asymmetric(blocks, 16)
    return torch.cat([d, low, _pack_nibbles(q)], dim=1)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, low, q = _asymmetric(blocks, 32)
    return torch.cat([d, low, _pack_fifth_bits(q), _pack_nibbles(q & 15)], dim=1)


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.uint8)


def _f16(blocks: torch.Tensor) -> torch.Tensor:
    return _fp16_bytes(blocks)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    """ggml_compute_fp32_to_bf16: a NaN made quiet, else round to nearest even on the bits."""
    bits = blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    quiet = (bits & 0xFFFF0000) | (64 << 16)
    bits = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet, bits)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return rounded.to(torch.int32).to(torch.int16).view(torch.uint8)


QUANTIZE = {
    F32: _f32,
    F16: _f16,
    BF16: _bf16,
    Q8_0: _q8_0,
    Q4_0: _q4_0,
    Q4_1: _q4_1,
    Q5_0: _q5_0,
    Q5_1: _q5_1,
    **K_QUANTIZE,
}


def quantize_blocks(blocks: torch.Tensor, qtype: QType | str) -> torch.Tensor:
    """(n, block_size) fp32 -> (n, type_size) uint8."""
    qtype = qtype_of(qtype)
    return QUANTIZE[qtype](blocks.float().reshape(-1, qtype.block_size)).view(-1, qtype.type_size)


def chunk_weights(device: torch.device) -> int:
    """Weights quantized at a time. The K-quants run thousands of ops a chunk over temporaries many times its
    size: on a CPU a quarter million stays in cache; a GPU wants fewer, larger launches."""
    return CPU_CHUNK_WEIGHTS if device.type == "cpu" else DEVICE_CHUNK_WEIGHTS


def quantize(rows: torch.Tensor, qtype: QType | str) -> torch.Tensor:
    """Weights (..., columns) -> rows of blocks (..., row_bytes) uint8, on the rows' device, a chunk of rows at a
    time. ValueError where a row is not whole blocks.

    On a CPU the chunks are independent jobs spread over the cores, each on one thread
    (wanlora.weights.spread): a K-quant chunk is thousands of small ops, and with every op on
    every core, one core kept busy by another process stalls each op's barrier."""
    qtype = qtype_of(qtype)
    if rows.dim() == 0:
        raise ValueError("quantize takes rows, not a 0-d tensor")
    row_bytes = qtype.row_bytes(rows.shape[-1])
    count = math.prod(rows.shape[:-1])
    flat = rows.reshape(count, rows.shape[-1])
    out = torch.empty((count, row_bytes), dtype=torch.uint8, device=rows.device)
    step = max(1, chunk_weights(rows.device) // max(1, rows.shape[-1]))

    def job(start: int, stop: int) -> None:
        out[start:stop] = quantize_blocks(flat[start:stop], qtype).view(stop - start, row_bytes)

    chunks = [(start, min(count, start + step)) for start in range(0, count, step)]
    if rows.device.type != "cpu":
        for start, stop in chunks:
            job(start, stop)
    elif count * rows.shape[-1] < MIN_SPREAD_ELEMENTS:
        with single_threaded_ops():  # too little work for threads: one core, no barriers
            for start, stop in chunks:
                job(start, stop)
    else:
        run_spread([((stop - start) * rows.shape[-1], functools.partial(job, start, stop)) for start, stop in chunks])
    return out.view(*rows.shape[:-1], row_bytes)
