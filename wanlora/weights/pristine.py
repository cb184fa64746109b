"""Where a weight's W0 comes from when the merge engine needs it again.

A weight is stored in its format (wanlora.weights.formats): full precision (the parameter
itself), or a quantized layer's tensors (rows and a scale per row, ...). Its pristine W0 can be
held as:
- a host copy, made the first time a LoRA touches the weight (pinned for CUDA, at its exact size):
  the stored tensors' own bits (a quantized weight at its stored size);
- the checkpoint file it was loaded from (wanlora.weights.checkpoint): no host copy, the OS page
  cache holds it. Only where the file gives back the loaded bits exactly.

Every form fills fp32 rows of W0 for the merge's sum (the format decodes them), and restores the
loaded weight bitwise (for the empty set, and under a lone LoRA's one GEMM).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol

import torch

from .formats.base import Stored, rows_of
from .host_memory import HostArena


class Pristine(ABC):
    peak: float  # an upper bound of |W0|, for the range check

    @abstractmethod
    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Write rows start:stop of W0, in fp32, into `out` (on the weight's device)."""

    @abstractmethod
    def restore(self, stored: Stored) -> bool:
        """Put the loaded bits back into the stored tensors by copying, where this form holds them as they
        are; False where they must be computed from `fill`'s rows."""


class HostCopy(Pristine):
    """A weight's stored tensors as loaded, in host memory: one `HostArena` of exactly their bytes, pinned
    where the weight lives on a GPU (`pin`, by default), so that restoring it copies at the link's speed."""

    def __init__(self, stored: Stored, pin: bool | None = None) -> None:
        self.format = stored.format
        pin = stored.weight.device.type == "cuda" if pin is None else pin
        names = [str(index) for index in range(len(stored.data))]
        self.arena = HostArena(dict(zip(names, stored.data, strict=True)), pin=pin)  # pinned while this copy lives
        self.tensors = tuple(self.arena.views[name] for name in names)
        self.peak = self.format.peak(stored.data)

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        self.format.decode_into(out, rows_of(self.tensors, start, stop))

    def restore(self, stored: Stored) -> bool:
        if stored.format is not self.format:
            return False
        for target, tensor in zip(stored.data, self.tensors, strict=True):
            target.copy_(tensor, non_blocking=True)
        return True


class InPlace(Pristine):
    """W0 in the stored tensors themselves, for a format whose LoRAs never write them (`keeps_w0`)."""

    def __init__(self, stored: Stored) -> None:
        self.stored = stored
        unbounded = stored.format.limit(stored.data) == math.inf  # no range check: W0 is not decoded for one
        self.peak = 0.0 if unbounded else stored.format.peak(stored.data)

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        self.stored.format.decode_into(out, self.stored.rows(start, stop))

    def restore(self, stored: Stored) -> bool:
        return True  # never written


class PristineSource(Protocol):
    """What holds W0 outside the model (a checkpoint file), for the weights it gives back exactly."""

    def pristine(self, name: str, stored: Stored) -> Pristine | None:
        """W0 of parameter `name`, whose loaded bits `stored` still holds, or None where not exact."""

    def check_unchanged(self) -> None:
        """Raise when W0 can no longer be read back as it was (a file rewritten in place)."""
