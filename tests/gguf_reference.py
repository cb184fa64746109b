"""A scalar reference for ggml's K-quantizers, written from the algorithm (issue 32's research notes, which
follow ggml-quants.c's `quantize_row_q{2..6}_K_ref`): one block at a time, one float32 operation at a time, in
C's order. Slow, and plainly readable: the tests hold wanlora's vectorized torch quantizers to it bit for bit.

Every value is a numpy float32 scalar, so each +, -, *, / rounds once to float32, as C's `float` does.
"""

from __future__ import annotations

import numpy as np

F = np.float32
GROUP_MAX_EPS = F(1e-15)


def nearest_int(value: np.float32) -> int:
    """ggml's nearest_int: round half to even (its 1.5*2^23 trick) over |value| <= 4194303."""
    assert abs(value) <= 4194303, value
    return int(np.rint(value))


def fp16(value: np.float32) -> tuple[bytes, np.float32]:
    stored = np.float16(value)
    return stored.tobytes(), F(stored)


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, use_mad, first_min_only=False):
    """-> (scale, the_min, L list). `first_min_only`: the trap, for the tests to show they would see it: every
    try from the range's min, where ggml's uses the min of the best fit so far."""
    n = len(x)
    low, high = x[0], x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < low:
            low = x[i]
        if x[i] > high:
            high = x[i]
        sum_w = sum_w + weights[i]
        sum_x = sum_x + weights[i] * x[i]
    if low > 0:
        low = F(0)
    if high == low:
        return F(0), -low, [0] * n
    iscale = F(nmax) / (high - low)
    scale = F(1) / iscale
    first_low = low
    levels = []
    best = F(0)
    for i in range(n):
        level = max(0, min(nmax, nearest_int(iscale * (x[i] - low))))
        levels.append(level)
        diff = scale * F(level) + low - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best = best + weights[i] * diff
    for step in range(nstep + 1):
        start = first_low if first_min_only else low  # ggml: the current min
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (high - start)
        tried = []
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            level = max(0, min(nmax, nearest_int(iscale * (x[i] - start))))
            tried.append(level)
            sum_l = sum_l + weights[i] * F(level)
            sum_l2 = sum_l2 + weights[i] * F(level) * F(level)
            sum_xl = sum_xl + weights[i] * F(level) * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            error = F(0)
            for i in range(n):
                diff = this_scale * F(tried[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                error = error + weights[i] * diff
            if error < best:
                levels, best, scale, low = tried, error, this_scale, this_min
    return scale, -low, levels


def make_qx_quants(x, nmax):
    """rmse_type 1, no importance weights -> (scale, L list biased by nmax)."""
    n = len(x)
    largest, amax = F(0), F(0)
    for value in x:
        if abs(value) > amax:
            amax, largest = abs(value), value
    if amax < GROUP_MAX_EPS:
        return F(0), [0] * n

    def sums(iscale):
        levels, sum_lx, sum_l2 = [], F(0), F(0)
        for value in x:
            level = max(-nmax, min(nmax - 1, nearest_int(iscale * value)))
            levels.append(level)
            w = value * value
            sum_lx = sum_lx + w * value * F(level)
            sum_l2 = sum_l2 + w * F(level) * F(level)
        return levels, sum_lx, sum_l2

    levels, sum_lx, sum_l2 = sums(F(-nmax) / largest)
    scale = sum_lx / sum_l2 if sum_l2 != 0 else F(0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        tried, tried_lx, tried_l2 = sums(-(F(nmax) + F(0.1) * F(step)) / largest)
        if tried_l2 > 0 and tried_lx * tried_lx > best * tried_l2:
            levels, scale = tried, tried_lx / tried_l2
            best = scale * tried_lx
    return scale, [level + nmax for level in levels]


def make_q3_quants(x, nmax=4):
    """do_rmse -> (scale, L list biased by nmax)."""
    n = len(x)
    largest, amax = F(0), F(0)
    for value in x:
        if abs(value) > amax:
            amax, largest = abs(value), value
    if amax < GROUP_MAX_EPS:
        return F(0), [0] * n
    iscale = F(-nmax) / largest
    levels, sum_lx, sum_l2 = [], F(0), F(0)
    for value in x:
        level = max(-nmax, min(nmax - 1, nearest_int(iscale * value)))
        levels.append(level)
        w = value * value
        sum_lx = sum_lx + w * value * F(level)
        sum_l2 = sum_l2 + w * F(level) * F(level)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sum_lx - w * x[i] * F(levels[i])
            if slx > 0:
                sl2 = sum_l2 - w * F(levels[i]) * F(levels[i])
                new = max(-nmax, min(nmax - 1, nearest_int(x[i] * sl2 / slx)))
                if new != levels[i]:
                    slx = slx + w * x[i] * F(new)
                    sl2 = sl2 + w * F(new) * F(new)
                    if sl2 > 0 and slx * slx * sum_l2 > sum_lx * sum_lx * sl2:
                        levels[i], sum_lx, sum_l2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    scale = sum_lx / sum_l2 if sum_l2 > 0 else F(0)
    return scale, [level + nmax for level in levels]


def _k_scale_bytes(ls, lm):
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    return packed


def _q45_k(x, nmax, rmin, nstep, first_min_only=False):
    """Q4_K (nmax 15) or Q5_K (31): (d bytes, dmin bytes, scale bytes, L list)."""
    scales, mins, levels = [], [], []
    for j in range(8):
        sub = x[32 * j : 32 * j + 32]
        sum_x2 = F(0)
        for value in sub:
            sum_x2 = sum_x2 + value * value
        av_x = np.sqrt(sum_x2 / F(32))
        weights = [av_x + abs(value) for value in sub]
        scale, the_min, sub_levels = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False, first_min_only)
        scales.append(scale)
        mins.append(the_min)
        levels += sub_levels
    max_scale = max_min = F(0)
    for scale, the_min in zip(scales, mins, strict=True):
        max_scale = scale if scale > max_scale else max_scale
        max_min = the_min if the_min > max_min else max_min
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = [min(63, nearest_int(inv_scale * s) & 0xFF) for s in scales]
    lm = [min(63, nearest_int(inv_min * m) & 0xFF) for m in mins]
    d_bytes, d = fp16(max_scale / F(63))
    dmin_bytes, dmin = fp16(max_min / F(63))
    for j in range(8):
        step = d * F(ls[j])
        if step == 0:
            continue
        offset = dmin * F(lm[j])
        for i in range(32):
            levels[32 * j + i] = max(0, min(nmax, nearest_int((x[32 * j + i] + offset) / step)))
    return d_bytes, dmin_bytes, _k_scale_bytes(ls, lm), levels


def quantize_q4_k(x, first_min_only=False) -> bytes:
    d, dmin, scales, levels = _q45_k(x, 15, -1.0, 20, first_min_only)
    qs = [levels[64 * c + i] | (levels[64 * c + 32 + i] << 4) for c in range(4) for i in range(32)]
    return d + dmin + bytes(scales) + bytes(qs)


def quantize_q5_k(x) -> bytes:
    d, dmin, scales, levels = _q45_k(x, 31, -0.5, 15)
    qh, qs = [0] * 32, []
    for c in range(4):
        for i in range(32):
            first, second = levels[64 * c + i], levels[64 * c + 32 + i]
            if first > 15:
                first, qh[i] = first - 16, qh[i] | (1 << (2 * c))
            if second > 15:
                second, qh[i] = second - 16, qh[i] | (2 << (2 * c))
            qs.append(first | (second << 4))
    return d + dmin + bytes(scales) + bytes(qh) + bytes(qs)


def quantize_q6_k(x) -> bytes:
    scales, levels = [], []
    for j in range(16):
        scale, sub_levels = make_qx_quants(x[16 * j : 16 * j + 16], 32)
        scales.append(scale)
        levels += sub_levels
    max_scale = max_abs = F(0)
    for scale in scales:
        if abs(scale) > max_abs:
            max_abs, max_scale = abs(scale), scale
    if max_abs < GROUP_MAX_EPS:
        return bytes(210)
    iscale = F(-128) / max_scale
    d_bytes, d = fp16(F(1) / iscale)
    stored = [np.int8(min(127, nearest_int(iscale * s))) for s in scales]
    for j in range(16):
        step = d * F(stored[j])
        if step == 0:
            continue
        for i in range(16):
            levels[16 * j + i] = max(-32, min(31, nearest_int(x[16 * j + i] / step))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        for i in range(32):
            q = [levels[128 * h + 32 * k + i] for k in range(4)]
            ql[64 * h + i] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
            ql[64 * h + 32 + i] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
            qh[32 * h + i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    return bytes(ql) + bytes(qh) + np.array(stored, np.int8).tobytes() + d_bytes


def _pack_2bit(levels):
    return bytes(
        levels[128 * h + i]
        | (levels[128 * h + i + 32] << 2)
        | (levels[128 * h + i + 64] << 4)
        | (levels[128 * h + i + 96] << 6)
        for h in range(2)
        for i in range(32)
    )


def quantize_q3_k(x) -> bytes:
    scales, levels = [], []
    for j in range(16):
        scale, sub_levels = make_q3_quants(x[16 * j : 16 * j + 16])
        scales.append(scale)
        levels += sub_levels
    max_scale = amax = F(0)
    for scale in scales:
        if abs(scale) > amax:
            amax, max_scale = abs(scale), scale
    packed = [0] * 12
    if max_scale:
        iscale = F(-32) / max_scale
        for j in range(16):
            biased = max(-32, min(31, int(np.int8(nearest_int(iscale * scales[j]))))) + 32
            if j < 8:
                packed[j] = biased & 0xF
            else:
                packed[j - 8] |= (biased & 0xF) << 4
            packed[8 + j % 4] |= (biased >> 4) << (2 * (j // 4))
        d_bytes, d = fp16(F(1) / iscale)
    else:
        d_bytes, d = fp16(F(0))
    for j in range(16):
        low = packed[j] & 0xF if j < 8 else packed[j - 8] >> 4
        signed = (low | (((packed[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        step = d * F(signed)
        if step == 0:
            continue
        for i in range(16):
            levels[16 * j + i] = max(-4, min(3, nearest_int(x[16 * j + i] / step))) + 4
    hmask = [0] * 32
    for j in range(256):
        if levels[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            levels[j] -= 4
    return bytes(hmask) + _pack_2bit(levels) + bytes(packed) + d_bytes


def quantize_q2_k(x) -> bytes:
    scales, mins, levels = [], [], []
    for j in range(16):
        sub = x[16 * j : 16 * j + 16]
        scale, the_min, sub_levels = make_qkx2_quants(sub, [abs(v) for v in sub], 3, -0.5, 0.1, 15, True)
        scales.append(scale)
        mins.append(the_min)
        levels += sub_levels
    max_scale = max_min = F(0)
    for scale, the_min in zip(scales, mins, strict=True):
        max_scale = scale if scale > max_scale else max_scale
        max_min = the_min if the_min > max_min else max_min
    packed = [0] * 16
    if max_scale > 0:
        iscale = F(15) / max_scale
        packed = [nearest_int(iscale * s) & 0xFF for s in scales]
        d_bytes, d = fp16(max_scale / F(15))
    else:
        d_bytes, d = fp16(F(0))
    if max_min > 0:
        iscale = F(15) / max_min
        packed = [(p | (nearest_int(iscale * m) << 4)) & 0xFF for p, m in zip(packed, mins, strict=True)]
        dmin_bytes, dmin = fp16(max_min / F(15))
    else:
        dmin_bytes, dmin = fp16(F(0))
    for j in range(16):
        step = d * F(packed[j] & 0xF)
        if step == 0:
            continue
        offset = dmin * F(packed[j] >> 4)
        for i in range(16):
            levels[16 * j + i] = max(0, min(3, nearest_int((x[16 * j + i] + offset) / step)))
    return bytes(packed) + _pack_2bit(levels) + d_bytes + dmin_bytes


QUANTIZE_REFERENCE = {
    "Q2_K": quantize_q2_k,
    "Q3_K": quantize_q3_k,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}


def quantize_reference(values: np.ndarray, qtype: str) -> np.ndarray:
    """(n, 256k) float32 -> (n, bytes) uint8, one super-block at a time."""
    blocks = np.asarray(values, np.float32).reshape(-1, 256)
    out = [np.frombuffer(QUANTIZE_REFERENCE[qtype]([F(v) for v in block]), np.uint8) for block in blocks]
    return np.stack(out).reshape(values.shape[0], -1)
