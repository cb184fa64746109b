"""`GgufLinear`: a linear layer whose weight stays in GGML blocks, dequantized for each call.

y = x W0^T + sum_i s_i (x A_i^T) B_i^T + bias. W0 is dequantized (in fp32, as gguf-py gives it) to
the input's dtype a chunk of rows at a time, and the matmul runs there: the saving is memory,
not time. LoRA terms set beside the matmul ("unfused") leave the blocks untouched; their part
is computed from the factors themselves, so nothing of it is lost to W0's rounding (at the cost
of two thin matmuls a term). A term may also be a full delta (`down` None: y += s x dW^T).

A "promoted" layer computes with a finer dense copy instead (`set_promoted`: W0 + sum(s dW) in bf16,
say), its blocks untouched: clearing it gives the file's weight back exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dequant import columns_of, dequantize
from .qtypes import QType, qtype_of


@dataclass(frozen=True)
class LoraTerm:
    """s * up @ down: `down` (rank, in), `up` (out, rank); or `down` None and `up` a full (out, in) delta."""

    up: torch.Tensor
    down: torch.Tensor | None
    scale: float


class GgufLinear(torch.nn.Module):
    """A linear layer over a weight's raw GGML blocks (`weight_blocks`, uint8 (out, row bytes), a parameter
    that is never trained), its `qtype`, and a float bias."""

    weight_blocks: torch.nn.Parameter
    lora_mode = "unfused"  # how LoRAs apply to it: wanlora.weights.formats.gguf's modes

    def __init__(self, blocks: torch.Tensor, qtype: QType | str, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qtype = qtype_of(qtype)
        if blocks.dim() != 2:
            raise ValueError(f"a GGUF linear holds 2-D rows of blocks, not {tuple(blocks.shape)}")
        self.in_features = columns_of(blocks, self.qtype)
        self.out_features = blocks.shape[0]
        # a parameter (never trained): placement moves parameters between the GPU and host memory (offloading,
        # Wan2.2's expert switch) and keeps buffers where they are, as small tables read every call
        self.weight_blocks = torch.nn.Parameter(blocks, requires_grad=False)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"a bias of {self.out_features} values, not {tuple(bias.shape)}")
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._terms = 0  # LoRA terms held, as buffers lora_up_i / lora_down_i
        self.promoted: torch.Tensor | None
        self.register_buffer("promoted", None, persistent=False)  # a dense weight used instead of the blocks

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W0 (out, in) in `dtype`."""
        return dequantize(self.weight_blocks, self.qtype, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.dequantized(x.dtype) if self.promoted is None else self.promoted.to(x.device, x.dtype)
        y = F.linear(x, weight, bias)
        for term in self.lora_terms():  # buffers: where placement left them (the blocks may have moved since)
            up = term.up.to(x.device, x.dtype)
            if term.down is None:
                y = y + F.linear(x, up) * term.scale
            else:
                y = y + F.linear(F.linear(x, term.down.to(x.device, x.dtype)) * term.scale, up)
        return y

    def set_promoted(self, weight: torch.Tensor | None) -> None:
        """Compute with `weight` (out, in) instead of the blocks, or (None) with the blocks again."""
        if weight is not None and tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a promoted weight of {(self.out_features, self.in_features)}, not {tuple(weight.shape)}")
        self.promoted = weight

    # ------------------------------------------------------------------------------ unfused LoRA terms

    def set_lora_terms(self, terms: Sequence[LoraTerm | tuple[torch.Tensor, torch.Tensor | None, float]]) -> None:
        """Hold `terms` (replacing any held), on this layer's device. All are checked before any is held."""
        checked = [term if isinstance(term, LoraTerm) else LoraTerm(*term) for term in terms]
        for term in checked:
            self._check(term)
        self.clear_lora_terms()
        device = self.weight_blocks.device
        for index, term in enumerate(checked):
            self.register_buffer(f"lora_up_{index}", term.up.to(device), persistent=False)
            down = None if term.down is None else term.down.to(device)
            self.register_buffer(f"lora_down_{index}", down, persistent=False)
            setattr(self, f"lora_scale_{index}", float(term.scale))
        self._terms = len(checked)

    def clear_lora_terms(self) -> None:
        for index in range(self._terms):
            delattr(self, f"lora_up_{index}")
            delattr(self, f"lora_down_{index}")
            delattr(self, f"lora_scale_{index}")
        self._terms = 0

    def lora_terms(self) -> list[LoraTerm]:
        return [
            LoraTerm(
                getattr(self, f"lora_up_{index}"),
                getattr(self, f"lora_down_{index}"),
                getattr(self, f"lora_scale_{index}"),
            )
            for index in range(self._terms)
        ]

    def _check(self, term: LoraTerm) -> None:
        if term.down is None:
            wanted = (self.out_features, self.in_features)
            if tuple(term.up.shape) != wanted:
                raise ValueError(f"a full delta of {wanted}, not {tuple(term.up.shape)}")
            return
        rank = term.down.shape[0] if term.down.dim() == 2 else -1
        if tuple(term.down.shape) != (rank, self.in_features) or tuple(term.up.shape) != (self.out_features, rank):
            raise ValueError(
                f"LoRA factors down ({rank}, {self.in_features}) and up ({self.out_features}, {rank}), "
                f"not {tuple(term.down.shape)} and {tuple(term.up.shape)}"
            )

    # ------------------------------------------------------------------------------ accounting

    @property
    def weight_bytes(self) -> int:
        return self.weight_blocks.numel()

    @property
    def lora_bytes(self) -> int:
        return sum(term.up.nbytes + (0 if term.down is None else term.down.nbytes) for term in self.lora_terms())

    @property
    def nbytes(self) -> int:
        """Every byte this layer holds: blocks, bias, LoRA terms and a promoted weight."""
        promoted = 0 if self.promoted is None else self.promoted.nbytes
        return self.weight_bytes + (0 if self.bias is None else self.bias.nbytes) + self.lora_bytes + promoted

    def extra_repr(self) -> str:
        terms = f", {self._terms} LoRA terms" if self._terms else ""
        terms += f", promoted to {self.promoted.dtype}" if self.promoted is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}{terms}"
