"""Full precision (bf16, fp16, fp32): a weight is the parameter itself, and a merge rounds once to its dtype."""

from __future__ import annotations

import torch

from .base import Stored, WeightFormat

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class DenseFormat(WeightFormat):
    name = "bf16"

    def stores(self, dtype: torch.dtype) -> bool:
        return dtype in FLOATS

    def weight(self, param: torch.Tensor) -> Stored:
        """A full-precision parameter as the merge holds it."""
        return Stored(self, (param,))

    def encode_into(self, rows: torch.Tensor, target: tuple[torch.Tensor, ...]) -> None:
        target[0].copy_(rows)  # the one rounding to the model's dtype

    def decode_into(self, out: torch.Tensor, source: tuple[torch.Tensor, ...]) -> None:
        out.copy_(source[0], non_blocking=True)

    def peak(self, tensors: tuple[torch.Tensor, ...]) -> float:
        """max |x|, as max(max, -min): two reductions, no copy."""
        values = tensors[0]
        return max(float(values.amax()), -float(values.amin())) if values.numel() else 0.0

    def limit(self, tensors: tuple[torch.Tensor, ...]) -> float:
        return float(torch.finfo(tensors[0].dtype).max)

    def from_file(
        self, rows: torch.Tensor, scale: torch.Tensor | None, like: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        if scale is not None:
            return None  # a scaled weight, computed at load: not the file's own values
        dtype = like[0].dtype
        return (rows if rows.dtype == dtype else rows.to(dtype),)


FORMAT = DenseFormat()
