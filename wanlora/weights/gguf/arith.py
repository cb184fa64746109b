"""fp32 arithmetic that gives the same bits as ggml's C reference, on the CPU and on CUDA.

C evaluates each `float` operation with one rounding, in source order, and sums a loop's
terms one after another. torch matches that when:
- every operation is its own op (`a * b - c` as two ops: a kernel never fuses them into one
  FMA);
- a division has a tensor on each side: CUDA computes `tensor / python_number` as a product
  with the reciprocal (two roundings), and `number / tensor` goes through `reciprocal()` on
  every device;
- a sum over a block's elements is a loop of adds (`sequential_sum`): torch's `sum` adds in
  pairs, in an order of its own;
- constants are float32 values (`f32`), computed as C computes them (`0.1f * is` in float).
Round half to even (`torch.round`) is ggml's `nearest_int` over the range it asserts
(|x| <= 4194303); rounding to fp16 (`.half()`) is its GGML_FP32_TO_FP16. torch's CPU `sqrt` on fp32 is
off by an ulp for some values (its vectorized path): `sqrt` takes it in fp64, whose rounding to fp32 is
the correctly rounded fp32 root.
"""

from __future__ import annotations

import numpy as np
import torch


def f32(value: float) -> float:
    """`value` rounded to float32 (as a Python float holding exactly that float32)."""
    return float(np.float32(value))


def div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b, correctly rounded in fp32 on every device: a number on either side becomes a tensor first."""
    if not isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: computed in fp64 (53 bits >= 2*24 + 2, so rounding twice is rounding once)."""
    return torch.sqrt(values.double()).float()


def sequential_sum(terms: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """terms (n, m) -> (m,): ((t0 + t1) + t2) + ... down dim 0, as a C loop `s += t[i]` adds them.

    `from_zero`: the loop starts at `s = 0` (so -0 becomes +0); else at `s = t[0]`.
    """
    total = terms[0] + 0.0 if from_zero else terms[0].clone()
    for term in terms[1:]:
        total.add_(term)
    return total


def first_largest(values: torch.Tensor) -> torch.Tensor:
    """values (n, m) -> (m,): the signed value of largest magnitude down dim 0, the first one on ties
    (C's `if (fabsf(x) > amax)` scan)."""
    index = values.abs().argmax(dim=0, keepdim=True)
    return values.gather(0, index).squeeze(0)


def running_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """max(0, values...) along `dim`, as C's `m = 0; if (v > m) m = v;` gives it (+0 when nothing is above 0)."""
    top = values.amax(dim=dim)
    return torch.where(top > 0, top, torch.zeros_like(top))


def round_clamp(values: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """MAX(low, MIN(high, nearest_int(values))), in place, kept as float."""
    return values.round_().clamp_(low, high)
