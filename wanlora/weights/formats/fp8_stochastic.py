"""fp8 with stochastic rounding: a candidate for fp8 merges, measured by `python -m benchmarks.lora_retention`.

Rounding a merged weight to nearest loses a LoRA's change wherever W0 + s*dW stays within half
a step of W0's own fp8 value (a dead zone: a file's W0 lies on the grid). Rounding up or down
with the probability that makes the expectation exact keeps the change in expectation, at the
cost of noise. The scale per row is round-to-nearest's (`quantize_rows`: amax / max), so both
store the same layout.

Deterministic: the random draws come from a generator seeded by the weight's name (CRC32, as
ComfyUI seeds its own), so the same merge gives the same bits on the same device, whatever
came before it.
"""

from __future__ import annotations

import zlib

import torch

from .fp8 import FP8, fp8_max

TOP_CODES = {torch.float8_e4m3fn: 0x7E, torch.float8_e5m2: 0x7B}  # the largest finite magnitude's code


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode())


def quantize_rows_stochastic(
    rows: torch.Tensor, name: str, dtype: torch.dtype = FP8
) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> (fp8 rows, fp32 scale per row), each value rounded to one of its two fp8 neighbours, up with
    probability (v - low) / (high - low): unbiased. Seeded by `name`."""
    work = rows.float()
    amax = torch.maximum(work.amax(dim=1), work.amin(dim=1).neg())
    scale = torch.where(amax > 0, amax / fp8_max(dtype), torch.ones_like(amax)).clamp_min_(
        torch.finfo(torch.float32).tiny
    )
    scaled = work / scale[:, None]
    magnitude = scaled.abs().clamp_(max=fp8_max(dtype))
    nearest = magnitude.to(dtype)
    codes = nearest.view(torch.uint8).to(torch.int16)  # magnitude codes: their order is the values' order
    above = nearest.float() > magnitude
    low_codes = torch.where(above, codes - 1, codes).clamp_(min=0)
    high_codes = torch.where(above, codes, codes + 1).clamp_(max=TOP_CODES[dtype])
    low = low_codes.to(torch.uint8).view(dtype).float()
    high = high_codes.to(torch.uint8).view(dtype).float()
    gap = high - low
    chance = torch.where(gap > 0, (magnitude - low) / torch.where(gap > 0, gap, torch.ones_like(gap)), 0.0)
    generator = torch.Generator(device=rows.device).manual_seed(seed_of(name))
    draws = torch.rand(magnitude.shape, generator=generator, device=rows.device)
    chosen = torch.where(draws < chance, high_codes, low_codes).to(torch.uint8)
    signed = chosen | torch.where(scaled < 0, 0x80, 0).to(torch.uint8)
    return signed.view(dtype), scale
