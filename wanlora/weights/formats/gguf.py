"""GGUF: the block linears as a file's raw GGML blocks (`GgufLinear`), each in its own type, and LoRAs on them.

A `.gguf` transformer (city96's Wan2.1, QuantStack's Wan2.2: wanlora.weights.gguf.reader) loads with its
quantized block linears kept as they are, dequantized per call; every other tensor is decoded to the
model's dtype. LoRAs apply one of three ways (`lora_mode`):
- "unfused" (the default): the blocks untouched, each LoRA beside the matmul
  (y = x W0^T + sum s (x A^T) B^T): exact in the LoRA's part, at two thin matmuls a term;
- "requantize": the merge's fp32 sum W0 + sum(s dW), W0 from the file's own bytes, quantized once into
  the tensor's own type: history-free, bitwise; layers no LoRA touches keep their bytes;
- "promote": a layer a LoRA touches computes with W0 + sum(s dW) in bf16 (2 bytes a weight more), its
  blocks untouched; the others stay as the file has them.
The empty set gives the file's weights back bitwise in every mode.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidInput
from ..gguf.dequant import dequantize
from ..gguf.linear import GgufLinear, LoraTerm
from ..gguf.qtypes import QType, qtype_of
from ..gguf.quantize import quantize
from . import BY_NAME
from .base import BLOCK_PREFIX, Stored, WeightFormat

logger = logging.getLogger(__name__)

MODES = BY_NAME["gguf"].lora_modes  # ("unfused", "requantize", "promote"): the default first
PROMOTED = torch.bfloat16
SUFFIX = ".gguf"


class GgufFormat(WeightFormat):
    """The registered format; each weight is held by its (type, LoRA mode) variant (`GgufWeights`)."""

    name = "gguf"
    layer_type = GgufLinear
    lora_modes = MODES
    file_suffixes = (SUFFIX,)

    def stores(self, dtype: torch.dtype) -> bool:
        return False  # never a torch dtype: blocks are bytes, read from .gguf files only

    def stored(self, layer: torch.nn.Module) -> Stored:
        assert isinstance(layer, GgufLinear)
        variant = weights_of(layer.qtype, layer.lora_mode)
        shape = (layer.out_features, layer.in_features)
        return Stored(variant, (layer.weight_blocks,), layer, shape)

    def encode_into(self, rows: torch.Tensor, target: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError("a GGUF weight is encoded in its own type: see GgufWeights")

    def decode_into(self, out: torch.Tensor, source: tuple[torch.Tensor, ...]) -> None:
        raise NotImplementedError("a GGUF weight is decoded in its own type: see GgufWeights")

    def peak(self, tensors: tuple[torch.Tensor, ...]) -> float:
        raise NotImplementedError

    def limit(self, tensors: tuple[torch.Tensor, ...]) -> float:
        raise NotImplementedError

    def set_lora_mode(self, module: torch.nn.Module, mode: str) -> None:
        """How LoRAs apply to `module`'s GGUF layers from now on (set before any LoRA)."""
        check_mode(mode)
        for layer in self.layers(module).values():
            assert isinstance(layer, GgufLinear)
            layer.lora_mode = mode

    def describe(self, module: torch.nn.Module) -> str:
        layers = [layer for layer in self.layers(module).values() if isinstance(layer, GgufLinear)]
        types: dict[str, int] = {}
        for layer in layers:
            types[str(layer.qtype)] = types.get(str(layer.qtype), 0) + 1
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(types.items()))
        mode = layers[0].lora_mode if layers else MODES[0]
        return f"{len(layers)} GGUF block linears ({kinds}), dequantized per call; LoRAs {mode}"

    def load_file(self, path: Path, spec: Any, dtype: torch.dtype, device: torch.device) -> Any:
        """The transformer in the GGUF file `path` for `spec`, its W0 source for requantized merges, {"gguf"}."""
        from .gguf_loading import load_transformer

        return load_transformer(path, spec, dtype)


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise InvalidInput("lora_mode", mode, f"one of {', '.join(MODES)} (GGUF weights)")
    return str(mode)


class GgufWeights(WeightFormat):
    """The GGUF weights of one type under one LoRA mode: how the merge sees them."""

    name = "gguf"
    lora_modes = MODES

    def __init__(self, qtype: QType, mode: str) -> None:
        self.qtype, self.mode = qtype, mode
        self.keeps_w0 = mode != "requantize"

    def stores(self, dtype: torch.dtype) -> bool:
        return False

    def encode_into(self, rows: torch.Tensor, target: tuple[torch.Tensor, ...]) -> None:
        target[0].copy_(quantize(rows, self.qtype))  # the file's own type, rounded once

    def decode_into(self, out: torch.Tensor, source: tuple[torch.Tensor, ...]) -> None:
        out.copy_(dequantize(source[0], self.qtype))

    def peak(self, tensors: tuple[torch.Tensor, ...]) -> float:
        values = dequantize(tensors[0], self.qtype)
        return max(float(values.amax()), -float(values.amin())) if values.numel() else 0.0

    def limit(self, tensors: tuple[torch.Tensor, ...]) -> float:
        if self.mode == "unfused":
            return math.inf
        if self.mode == "promote":
            return float(torch.finfo(PROMOTED).max)
        return float(torch.finfo(torch.float16).max)  # a block's scale is fp16: a safe bound of what it encodes

    def apply_terms(self, stored: Stored, terms: list, summed: Callable[[], Iterator]) -> bool:
        layer = stored.layer
        assert isinstance(layer, GgufLinear)
        if self.mode == "unfused":
            layer.set_lora_terms([lora_term(term.delta, term.strength) for term in terms])
            return True
        if self.mode == "promote":
            if not terms:
                layer.set_promoted(None)
                return True
            weight = torch.empty(stored.shape, dtype=PROMOTED, device=stored.weight.device)
            for start, stop, rows in summed():
                weight[start:stop].copy_(rows)  # the one rounding, to bf16
            layer.set_promoted(weight)
            return True
        return False


def lora_term(delta, strength: float) -> LoraTerm:
    """A delta as a term beside the matmul: its low-rank factors where it has them, else its dense change."""
    if delta.kind == "lora":
        up, down = (factor.flatten(1) for factor in delta.factors)
        return LoraTerm(up, down, strength * delta.alpha_scale)
    return LoraTerm(delta.compute(), None, strength)


@functools.cache
def weights_of(qtype: QType | str, mode: str) -> GgufWeights:
    return GgufWeights(qtype_of(qtype), check_mode(mode))


def block_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.startswith(BLOCK_PREFIX) and name.endswith(".weight") and len(shape) == 2


FORMAT = GgufFormat()
