"""One parameter's change, in each parameterisation published Wan LoRAs use (docs/lora-formats.md, "The math").

Each kind is a small class with one interface: its dense shape and value, an upper bound on
its elements (for the range check), whether it fits a parameter, and how the merge adds it:
as two GEMM factors where it can, else row by row. `alpha_scale` is alpha / rank, the
trainer's factor, not the user's strength.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

RowAdder = Callable[[torch.Tensor, int, int, float], None]  # add(acc, start, stop, strength)


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors
class Delta(ABC):
    factors: tuple[torch.Tensor, ...]
    alpha_scale: float = 1.0
    kind: ClassVar[str]

    @property
    def rank(self) -> int | None:
        return None

    @abstractmethod
    def dense_shape(self) -> tuple[int, ...]:
        """The shape of the delta before any reshape onto a conv kernel."""

    @abstractmethod
    def compute(self, device: torch.device | None = None) -> torch.Tensor:
        """The dense delta, in float32."""

    @abstractmethod
    def _bound(self) -> float:
        """An upper bound on any element of the dense delta, from the factors alone (may be inf)."""

    @cached_property
    def bound(self) -> float:
        return self._bound()

    def fits(self, shape: torch.Size) -> bool:
        """Whether the delta has the parameter's shape, or its size with its rows for a conv kernel."""
        dense = self.dense_shape()
        return tuple(dense) == tuple(shape) or (math.prod(dense) == math.prod(shape) and dense[0] == shape[0])

    def gemm_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) for one GEMM onto a weight of `dtype`, when the kind has them exactly; else None."""
        return None

    def row_adder(self, shape: torch.Size, device: torch.device) -> RowAdder:
        """`add(acc, start, stop, strength)`: adds rows start:stop of the delta, seen as a (rows, -1) matrix."""
        dense = self.compute(device).reshape(shape[0], -1)

        def add_dense(acc: torch.Tensor, start: int, stop: int, strength: float) -> None:
            acc.add_(dense[start:stop], alpha=strength)

        return add_dense


def _peak(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().max()) if tensor.numel() else 0.0


class LoraDelta(Delta):
    """`alpha_scale * up @ down`; a conv LoRA's factors are flattened to matrices."""

    kind = "lora"

    @property
    def rank(self) -> int:
        return self.factors[1].shape[0]

    def dense_shape(self) -> tuple[int, ...]:
        up, down = self.factors
        return (up.shape[0], math.prod(down.shape[1:]))

    def compute(self, device: torch.device | None = None) -> torch.Tensor:
        up, down = (t.to(device=device, dtype=torch.float32).flatten(1) for t in self.factors)
        return (up @ down).mul_(self.alpha_scale)

    def _bound(self) -> float:
        return self.rank * _peak(self.factors[0]) * _peak(self.factors[1]) * abs(self.alpha_scale)

    def gemm_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact when the factors already have `dtype`, or `dtype` is float32 (which holds every bf16/fp16
        value): then one GEMM, accumulating in fp32 and rounding once, adds the delta with no fp32 copy."""
        if any(t.dtype not in (dtype, torch.bfloat16, torch.float16) for t in self.factors):
            return None
        if dtype != torch.float32 and any(t.dtype != dtype for t in self.factors):
            return None
        up, down = (t.to(device=device, dtype=dtype).flatten(1) for t in self.factors)
        return up, down

    def row_adder(self, shape: torch.Size, device: torch.device) -> RowAdder:
        """Rows come from `up[start:stop] @ down`, so the dense delta is never built."""
        up, down = (t.to(device=device, dtype=torch.float32).flatten(1) for t in self.factors)
        alpha_scale = self.alpha_scale

        def add_lora(acc: torch.Tensor, start: int, stop: int, strength: float) -> None:
            acc.addmm_(up[start:stop], down, alpha=strength * alpha_scale)

        return add_lora


class LohaDelta(Delta):
    """LyCORIS LoHa: `alpha_scale * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`."""

    kind = "loha"

    @property
    def rank(self) -> int:
        return self.factors[1].shape[0]

    def dense_shape(self) -> tuple[int, ...]:
        return (self.factors[0].shape[0], self.factors[1].shape[1])

    def compute(self, device: torch.device | None = None) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (t.to(device=device, dtype=torch.float32) for t in self.factors)
        return ((w1a @ w1b) * (w2a @ w2b)).mul_(self.alpha_scale)

    def _bound(self) -> float:
        w1a, w1b, w2a, w2b = self.factors
        first = w1a.shape[1] * _peak(w1a) * _peak(w1b)
        second = w2a.shape[1] * _peak(w2a) * _peak(w2b)
        return first * second * abs(self.alpha_scale)


class LokrDelta(Delta):
    """LyCORIS LoKr: `alpha_scale * kron(w1, w2)` (a low-rank factor is multiplied out when read)."""

    kind = "lokr"

    def dense_shape(self) -> tuple[int, ...]:
        w1, w2 = self.factors
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * math.prod(w2.shape[1:]))

    def compute(self, device: torch.device | None = None) -> torch.Tensor:
        w1, w2 = (t.to(device=device, dtype=torch.float32) for t in self.factors)
        return torch.kron(w1, w2.flatten(1)).mul_(self.alpha_scale)

    def _bound(self) -> float:
        return _peak(self.factors[0]) * _peak(self.factors[1]) * abs(self.alpha_scale)


class FullDelta(Delta):
    """The change itself (`diff`, `diff_b`, a norm's or a modulation table's delta)."""

    kind = "full"

    def dense_shape(self) -> tuple[int, ...]:
        return tuple(self.factors[0].shape)

    def compute(self, device: torch.device | None = None) -> torch.Tensor:
        return self.factors[0].to(device=device, dtype=torch.float32)

    def _bound(self) -> float:
        return _peak(self.factors[0])

    def fits(self, shape: torch.Size) -> bool:
        """The parameter's sizes, give or take dimensions of 1 (a modulation table saved as (6, dim), a bias as a
        column): the same count of values in another arrangement (transposed, flattened) would land scrambled."""
        sizes = [size for size in self.dense_shape() if size != 1]
        return super().fits(shape) or sizes == [size for size in shape if size != 1]
