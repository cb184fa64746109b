"""Where a weight's W0 comes from when the merge engine needs it again.

A weight is stored either dense (bf16, fp32: the parameter itself) or quantized (fp8 rows and
an fp32 scale per row, wanlora.weights.fp8). Its pristine W0 can be held as:
- a host copy, made the first time a LoRA touches the weight (pinned for CUDA): a dense
  weight's own bits, or a quantized weight's fp8 rows and scales (1 byte an element);
- the checkpoint file it was loaded from (wanlora.weights.checkpoint): no host copy, the OS page
  cache holds it. Only where the file gives back the loaded bits exactly.

Every form fills fp32 rows of W0 for the merge's sum, and restores the loaded weight
bitwise (for the empty set, and under a lone LoRA's one GEMM).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from .fp8 import dequantize_into, fp8_max


class Pristine(ABC):
    peak: float  # an upper bound of |W0|, for the range check

    @abstractmethod
    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Write rows start:stop of W0, in fp32, into `out` (on the weight's device)."""

    @abstractmethod
    def restore(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        """Put the loaded bits back into `weight` (and `scale`, for a quantized one) by copying, where
        this form holds them as they are; False where they must be computed from `fill`'s rows."""


class HostCopy(Pristine):
    """A dense weight's own bits, in host memory."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.tensor = _host_copy(weight)
        self.peak = float(weight.detach().abs().max()) if weight.numel() else 0.0

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.copy_(self.tensor.view(self.tensor.shape[0], -1)[start:stop], non_blocking=True)

    def restore(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        if scale is not None:
            return False
        weight.copy_(self.tensor, non_blocking=True)
        return True


class QuantizedCopy(Pristine):
    """A quantized weight's fp8 rows and scales, in host memory: W0 = q * s."""

    def __init__(self, quantized: torch.Tensor, scale: torch.Tensor) -> None:
        self.quantized, self.scale = _host_copy(quantized), _host_copy(scale)
        self.peak = float(scale.max()) * fp8_max(quantized.dtype) if scale.numel() else 0.0

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        dequantize_into(out, self.quantized[start:stop], self.scale[start:stop])

    def restore(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        if scale is None:
            return False
        weight.copy_(self.quantized, non_blocking=True)
        scale.copy_(self.scale, non_blocking=True)
        return True


class PristineSource(Protocol):
    """What holds W0 outside the model (a checkpoint file), for the weights it gives back exactly."""

    def pristine(self, name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> Pristine | None:
        """W0 of parameter `name`, whose loaded bits `weight` (and `scale`) still hold, or None where not exact."""

    def check_unchanged(self) -> None:
        """Raise when W0 can no longer be read back as it was (a file rewritten in place)."""


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    copy = tensor.detach().to("cpu", copy=True)
    return copy.pin_memory() if tensor.device.type == "cuda" else copy
