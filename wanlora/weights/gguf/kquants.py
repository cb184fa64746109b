"""ggml's reference K-quantizers (`quantize_row_q{2..6}_K_ref`), in torch: what llama-quantize writes
without an importance matrix, as the publishers of Wan GGUF files ran it.

Written from the algorithms (the research notes of issue 32, checked against ggml-quants.c),
vectorized over sub-blocks: each sub-block's elements lie down dim 0 of an (n, sub-blocks)
array, so an element-wise step is one op over every sub-block and a C loop's running sum is
a loop of n adds (`sequential_sum`). The fp32 operations are C's, one rounding each, in its
order (wanlora.weights.gguf.arith): the bytes are the reference's, bit for bit.

Sub-block fits:
- `fit_with_min` (make_qkx2_quants; Q2_K, Q4_K, Q5_K): x ~ scale*L - min, L in 0..nmax. Start
  from the range, then try nstep+1 scales (rmin + rdelta*is + nmax)/(max - min), each with a
  weighted least-squares scale and min; keep the one of least weighted error. Each try uses
  the min of the best fit so far (the trap: a fit from the first min alone differs in over
  half of the blocks).
- `fit_symmetric` (make_qx_quants, rmse_type 1; Q6_K): x ~ scale*L, L in -nmax..nmax-1, w = x^2;
  19 scales -(nmax + 0.1*is)/max, keeping the best sum(w*x*L)^2/sum(w*L^2).
- `fit_q3` (make_q3_quants; Q3_K): L in -4..3 from the range, then up to 5 passes changing one
  L at a time where that raises sum(w*x*L)^2/sum(w*L^2).
Then each super-block of 256 stores the sub-blocks' scales (and mins) in 6 or 8 bits against
an fp16 d (and dmin), and the weights are quantized once more against the stored scales.
"""

from __future__ import annotations

import numpy as np
import torch

from .arith import div, first_largest, round_clamp, running_max, sequential_sum, sqrt
from .qtypes import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, QK_K

GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest |x| is below this is all zero


def _f32(value: float) -> np.float32:
    return np.float32(value)


def _fp16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1) -> (fp16 bytes (n, 2), the fp16 value back in fp32 (n, 1)): GGML_FP32_TO_FP16, then back."""
    stored = values.half()
    return stored.view(torch.uint8), stored.float()


def _lanes(blocks: torch.Tensor, size: int) -> torch.Tensor:
    """(n blocks, 256) -> (size, n * 256/size): each sub-block of `size` down dim 0."""
    return blocks.reshape(-1, size).t().contiguous()


def _unlanes(values: torch.Tensor) -> torch.Tensor:
    """The inverse of `_lanes`: (size, sub-blocks) -> (n blocks, 256)."""
    return values.t().reshape(-1, QK_K)


# ------------------------------------------------------------------------------------ sub-block fits


def fit_with_min(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants over sub-blocks (n, m): (scale (m,), the_min (m,) = -min, L (n, m) float in 0..nmax).

    The (n, m) temporaries are three buffers written in place: allocating one per op costs more than the op."""
    low = x.amin(dim=0)
    low = torch.where(low > 0, torch.zeros_like(low), low)
    high = x.amax(dim=0)
    sum_w = sequential_sum(weights, from_zero=False)
    sum_x = sequential_sum(weights * x, from_zero=False)
    span = high - low
    tried, weighted, work = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    def levels_into(out: torch.Tensor, iscale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        """clamp(nearest_int(iscale * (x - min)), 0, nmax)"""
        return round_clamp(torch.sub(x, minimum, out=out).mul_(iscale), 0, nmax)

    def error(scale: torch.Tensor, minimum: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """sum(w * diff^2) (use_mad: |diff|), diff = scale * L + min - x"""
        diff = torch.mul(levels, scale, out=work).add_(minimum).sub_(x)
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return sequential_sum(diff.mul_(weights))

    iscale = div(float(nmax), span)
    scale = div(1.0, iscale)
    levels = levels_into(torch.empty_like(x), iscale, low)
    best = error(scale, low, levels)
    for step in range(nstep + 1):
        numerator = _f32(rmin) + _f32(rdelta) * _f32(step) + _f32(nmax)
        levels_into(tried, div(float(numerator), high - low), low)  # the current min: the best fit's so far
        torch.mul(weights, tried, out=weighted)
        sum_l = sequential_sum(weighted)
        sum_l2 = sequential_sum(torch.mul(weighted, tried, out=work))
        sum_xl = sequential_sum(torch.mul(weighted, x, out=work))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, det)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, det)
        clipped = this_min > 0
        this_scale = torch.where(clipped, div(sum_xl, sum_l2), this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        this_error = error(this_scale, this_min, tried)
        better = (det > 0) & (this_error < best)
        levels, weighted = torch.where(better, tried, levels, out=weighted), levels
        best = torch.where(better, this_error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    flat = span == 0  # every x the same (and <= 0): L 0, scale 0, the min kept
    return torch.where(flat, torch.zeros_like(scale), scale), -low, levels.masked_fill_(flat, 0)


def fit_symmetric(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(rmse_type=1, no importance) over sub-blocks (n, m): (scale (m,), L (n, m) in 0..2*nmax-1,
    biased by nmax; 0 for an all-zero sub-block)."""
    largest = first_largest(x)
    weights = x * x
    weighted_x = weights * x
    tried, spare, work = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    def sums(iscale: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = round_clamp(torch.mul(x, iscale, out=out), -nmax, nmax - 1)
        sum_lx = sequential_sum(torch.mul(weighted_x, levels, out=work))
        sum_l2 = sequential_sum(torch.mul(weights, levels, out=work).mul_(levels))
        return levels, sum_lx, sum_l2

    levels, sum_lx, sum_l2 = sums(div(float(-nmax), largest), torch.empty_like(x))
    scale = torch.where(sum_l2 != 0, div(sum_lx, sum_l2), torch.zeros_like(sum_lx))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        numerator = -(_f32(nmax) + _f32(0.1) * _f32(step))
        _, tried_lx, tried_l2 = sums(div(float(numerator), largest), tried)
        better = (tried_l2 > 0) & (tried_lx * tried_lx > best * tried_l2)
        levels, spare = torch.where(better, tried, levels, out=spare), levels
        scale = torch.where(better, div(tried_lx, tried_l2), scale)
        best = torch.where(better, scale * tried_lx, best)
    zero = largest.abs() < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), levels.add_(nmax).masked_fill_(zero, 0)


def fit_q3(x: torch.Tensor, passes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(nmax=4, do_rmse) over sub-blocks (n, m): (scale (m,), L (n, m) in 0..7, biased by 4;
    0 for an all-zero sub-block)."""
    nmax = 4
    largest = first_largest(x)
    weights = x * x
    weighted_x = weights * x
    levels = round_clamp(div(float(-nmax), largest) * x, -nmax, nmax - 1)
    sum_lx = sequential_sum(weighted_x * levels)
    sum_l2 = sequential_sum(weights * levels * levels)
    for _ in range(passes):
        changed = torch.zeros_like(sum_lx, dtype=torch.bool)
        for i in range(x.shape[0]):  # one element at a time: each change moves the sums the next one sees
            level, w, wx = levels[i], weights[i], weighted_x[i]
            without_lx = sum_lx - wx * level
            without_l2 = sum_l2 - w * level * level
            new = round_clamp(div(x[i] * without_l2, without_lx), -nmax, nmax - 1)
            with_lx = without_lx + wx * new
            with_l2 = without_l2 + w * new * new
            take = (
                (without_lx > 0)
                & (new != level)
                & (with_l2 > 0)
                & (with_lx * with_lx * sum_l2 > sum_lx * sum_lx * with_l2)
            )
            levels[i] = torch.where(take, new, level)
            sum_lx = torch.where(take, with_lx, sum_lx)
            sum_l2 = torch.where(take, with_l2, sum_l2)
            changed |= take
        if not bool(changed.any()):  # a pass that changes nothing would change nothing again
            break
    scale = torch.where(sum_l2 > 0, div(sum_lx, sum_l2), torch.zeros_like(sum_lx))
    zero = largest.abs() < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.zeros_like(levels), levels + nmax)


# ------------------------------------------------------------------------------------ super-blocks


def _requantize(
    x: torch.Tensor,
    levels: torch.Tensor,
    step: torch.Tensor,
    low: int,
    high: int,
    offset: torch.Tensor | None = None,
    bias: int = 0,
) -> torch.Tensor:
    """The final pass: L = clamp(nearest_int((x + offset)/step)) + bias where step != 0, else the fit's L.
    x, levels (n, m); step, offset (m,)."""
    shifted = x if offset is None else x + offset
    again = round_clamp(div(shifted, step), low, high) + bias
    return torch.where(step == 0, levels, again)


def _uint8(values: torch.Tensor) -> torch.Tensor:
    """C's conversion of an int to uint8_t (modulo 256), from a float holding an integer."""
    return (values.to(torch.int32) & 0xFF).to(torch.uint8)


def _scales_mins_k(blocks: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K and Q5_K's shared part: (d bytes, dmin bytes, 12 scale bytes, L (n, 256) as uint8)."""
    x = _lanes(blocks, 32)
    sum_x2 = sequential_sum(x * x)
    weights = sqrt(div(sum_x2, 32.0)) + x.abs()
    scale, the_min, levels = fit_with_min(x, weights, nmax, rmin, 0.1, nstep, use_mad=False)
    scale, the_min = scale.view(-1, 8), the_min.view(-1, 8)  # (super-blocks, 8)
    max_scale, max_min = running_max(scale, 1).unsqueeze(1), running_max(the_min, 1).unsqueeze(1)
    inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, div(63.0, max_min), torch.zeros_like(max_min))
    ls = _uint8((inv_scale * scale).round_()).clamp_(max=63)
    lm = _uint8((inv_min * the_min).round_()).clamp_(max=63)
    d_bytes, d = _fp16(div(max_scale, 63.0))
    dmin_bytes, dmin = _fp16(div(max_min, 63.0))
    packed = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        dim=1,
    )
    step = (d * ls.float()).reshape(-1)
    offset = (dmin * lm.float()).reshape(-1)
    levels = _requantize(x, levels, step, 0, nmax, offset)
    return d_bytes.view(-1, 2), dmin_bytes.view(-1, 2), packed, _unlanes(levels).to(torch.uint8)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, levels = _scales_mins_k(blocks, 15, -1.0, 20)
    chunks = levels.view(-1, 4, 2, 32)  # chunk c: sub-blocks 2c (low nibbles) and 2c+1 (high)
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).view(-1, 128)
    return torch.cat([d, dmin, scales, qs], dim=1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, levels = _scales_mins_k(blocks, 31, -0.5, 15)
    by_sub_block = levels.view(-1, 8, 32)
    fifth = (by_sub_block >> 4).to(torch.int32)  # sub-block j's fifth bits go to bit j of qh[l]
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int32, device=blocks.device).view(1, 8, 1)
    qh = (fifth * weights).sum(dim=1).to(torch.uint8)
    low = (by_sub_block & 15).view(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).view(-1, 128)
    return torch.cat([d, dmin, scales, qh, qs], dim=1)


def _pack_2bit(levels: torch.Tensor) -> torch.Tensor:
    """(n, 256) values 0-3 -> (n, 64): for each half h, byte 32h+l holds weights 128h+l+32k at bits 2k."""
    quarters = levels.view(-1, 2, 4, 32)
    return (quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4) | (quarters[:, :, 3] << 6)).view(
        -1, 64
    )


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    x = _lanes(blocks, 16)
    scale, levels = fit_symmetric(x, 32)
    scale = scale.view(-1, 16)
    max_scale = first_largest(scale.t()).unsqueeze(1)
    empty = max_scale.abs() < GROUP_MAX_EPS  # the whole super-block is zeros: all bytes 0
    iscale = div(-128.0, max_scale)
    d_bytes, d = _fp16(div(1.0, iscale))
    stored = (iscale * scale).round_().clamp_(max=127).to(torch.int32).to(torch.int8)
    step = (d * stored.float()).reshape(-1)
    levels = _unlanes(_requantize(x, levels, step, -32, 31, bias=32)).to(torch.uint8)
    halves = levels.view(-1, 2, 4, 32)  # half h, quarter k: weights 128h + 32k + l
    low = halves & 15
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2).view(-1, 128)
    top = halves >> 4
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).view(-1, 64)
    packed = torch.cat([ql, qh, stored.view(torch.uint8), d_bytes.view(-1, 2)], dim=1)
    return torch.where(empty, torch.zeros_like(packed), packed)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    x = _lanes(blocks, 16)
    scale, levels = fit_q3(x)
    scale = scale.view(-1, 16)
    max_scale = first_largest(scale.t()).unsqueeze(1)
    iscale = div(-32.0, max_scale)
    biased = (iscale * scale).round_().to(torch.int32).to(torch.int8).clamp_(-32, 31).to(torch.uint8) + 32
    nonzero = max_scale != 0
    biased = torch.where(nonzero, biased, torch.zeros_like(biased))  # all scale bytes 0 when max_scale is 0
    d_bytes, d = _fp16(torch.where(nonzero, div(1.0, iscale), torch.zeros_like(iscale)))
    scales = torch.cat(
        [
            (biased[:, :8] & 15) | ((biased[:, 8:] & 15) << 4),
            _pack_2bit_scales(biased >> 4),
        ],
        dim=1,
    )
    signed = ((biased.to(torch.int32) & 63) - 32).float()  # what dequantization reads back
    step = (d * signed).reshape(-1)
    levels = _unlanes(_requantize(x, levels, step, -4, 3, bias=4)).to(torch.uint8)
    by_bit = levels.view(-1, 8, 32)  # hmask[m] bit b: weight 32b + m above 3
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=blocks.device).view(1, 8, 1)
    hmask = ((by_bit > 3).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
    qs = _pack_2bit(levels & 3)
    return torch.cat([hmask, qs, scales, d_bytes.view(-1, 2)], dim=1)


def _pack_2bit_scales(tops: torch.Tensor) -> torch.Tensor:
    """Q3_K's top 2 bits of the 16 scales (n, 16) -> bytes 8-11: scale j at byte 8 + j%4, bits 2*(j//4)."""
    groups = tops.view(-1, 4, 4)  # [j//4, j%4]
    return groups[:, 0] | (groups[:, 1] << 2) | (groups[:, 2] << 4) | (groups[:, 3] << 6)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    x = _lanes(blocks, 16)
    scale, the_min, levels = fit_with_min(x, x.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scale, the_min = scale.view(-1, 16), the_min.view(-1, 16)
    max_scale, max_min = running_max(scale, 1).unsqueeze(1), running_max(the_min, 1).unsqueeze(1)
    has_scale, has_min = max_scale > 0, max_min > 0
    ls = _uint8((div(15.0, max_scale) * scale).round_())
    lm = _uint8((div(15.0, max_min) * the_min).round_())
    ls = torch.where(has_scale, ls, torch.zeros_like(ls))
    lm = torch.where(has_min, lm, torch.zeros_like(lm))
    packed = ls | (lm << 4)
    d_bytes, d = _fp16(torch.where(has_scale, div(max_scale, 15.0), torch.zeros_like(max_scale)))
    dmin_bytes, dmin = _fp16(torch.where(has_min, div(max_min, 15.0), torch.zeros_like(max_min)))
    step = (d * (packed & 15).float()).reshape(-1)
    offset = (dmin * (packed >> 4).float()).reshape(-1)
    levels = _unlanes(_requantize(x, levels, step, 0, 3, offset)).to(torch.uint8)
    return torch.cat([packed, _pack_2bit(levels), d_bytes.view(-1, 2), dmin_bytes.view(-1, 2)], dim=1)


K_QUANTIZE = {Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k}
