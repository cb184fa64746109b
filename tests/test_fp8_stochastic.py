"""fp8 with stochastic rounding (a candidate for merges): unbiased, between fp8 neighbours, seeded by name."""

from __future__ import annotations

import torch

from wanlora.weights.formats.fp8 import FP8, dequantize, quantize_rows
from wanlora.weights.formats.fp8_stochastic import quantize_rows_stochastic


def test_each_value_goes_to_one_of_its_two_fp8_neighbours_with_the_row_scale_of_rounding_to_nearest():
    rows = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    codes, scale = quantize_rows_stochastic(rows, "blocks.0.attn1.to_q.weight")
    nearest, nearest_scale = quantize_rows(rows)
    assert codes.dtype == FP8 and torch.equal(scale, nearest_scale)
    got, rtn = codes.view(torch.uint8).to(torch.int16), nearest.view(torch.uint8).to(torch.int16)
    values, nearest_values = dequantize(codes, scale), dequantize(nearest, scale)
    other_side = ((values - rows) * (nearest_values - rows) <= 0) & ((got - rtn).abs() == 1)
    assert bool(((got == rtn) | other_side).all())  # the nearest, or the neighbour on the value's other side
    assert 0 < int((got != rtn).sum()) < got.numel()
    assert torch.equal(quantize_rows_stochastic(torch.full((1, 8), 2.0), "x")[0].float(), torch.full((1, 8), 448.0))


def test_it_keeps_a_change_below_half_a_step_in_expectation():
    """Rounding to nearest gives W0 back for a change of a third of a step; stochastic rounding keeps it on
    average: the dead zone a LoRA on a quantized W0 falls into."""
    w0 = torch.full((1, 200_000), 1.0)
    w0[0, 0] = 448 / 256  # the row's amax: scale 1/256, so 1.0 is 256, where e4m3's step is 32
    merged = w0.clone()
    merged[0, 1:] += 32 / 3 / 256  # a third of a step
    rtn = dequantize(*quantize_rows(merged))
    stochastic = dequantize(*quantize_rows_stochastic(merged, "blocks.3.ffn.net.0.proj.weight"))
    assert torch.equal(rtn[0, 1:], w0[0, 1:])  # lost
    kept = float((stochastic[0, 1:] - w0[0, 1:]).mean()) / (32 / 3 / 256)
    assert abs(kept - 1.0) < 0.02


def test_the_same_name_gives_the_same_bits_and_another_name_others():
    rows = torch.randn(32, 256, generator=torch.Generator().manual_seed(1))
    first = quantize_rows_stochastic(rows, "blocks.0.attn1.to_k.weight")[0].view(torch.uint8)
    again = quantize_rows_stochastic(rows.clone(), "blocks.0.attn1.to_k.weight")[0].view(torch.uint8)
    other = quantize_rows_stochastic(rows, "blocks.0.attn1.to_v.weight")[0].view(torch.uint8)
    assert torch.equal(first, again) and not torch.equal(first, other)
