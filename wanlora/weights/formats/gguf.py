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
from ...models import ModelSpec
from ..gguf.dequant import dequantize
from ..gguf.linear import GgufLinear, LoraTerm
from ..gguf.qtypes import QType, qtype_of
from ..gguf.quantize import quantize
from ..gguf.reader import GgufTransformer, QuantizedTensor, read_transformer
from ..pristine import Pristine
from . import BY_NAME
from .base import BLOCK_PREFIX, Stored, WeightFormat

logger = logging.getLogger(__name__)

MODES = BY_NAME["gguf"].lora_modes  # ("unfused", "requantize", "promote"): the default first
PROMOTED = torch.bfloat16
SUFFIX = ".gguf"
# llama-quantize's mix for Wan (ComfyUI-GGUF's patch), per file type: the default type, the n-th `.v.weight`'s
# (self- and cross-attention in file order) and `.ffn.2.weight`'s; used for memory plans, where block 0
# stands for every block (an upper bound where the first few v weights take a larger type)
FTYPE_MIX: dict[str, tuple[str, Callable[[int], str], str]] = {
    "Q8_0": ("Q8_0", lambda i: "Q8_0", "Q8_0"),
    "Q6_K": ("Q6_K", lambda i: "Q6_K", "Q6_K"),
    "Q5_K_M": ("Q5_K", lambda i: "Q6_K", "Q6_K"),
    "Q5_K_S": ("Q5_K", lambda i: "Q5_K", "Q5_K"),
    "Q4_K_M": ("Q4_K", lambda i: "Q6_K", "Q6_K"),
    "Q4_K_S": ("Q4_K", lambda i: "Q5_K" if i < 4 else "Q4_K", "Q5_K"),
    "Q3_K_M": ("Q3_K", lambda i: "Q5_K" if i < 2 else "Q4_K", "Q4_K"),
    "Q3_K_S": ("Q3_K", lambda i: "Q3_K", "Q3_K"),
}
DEQUANT_BYTES_PER_WEIGHT = 2.25  # a forward's decoded weight in bf16 and its chunked fp32 work, traced on `meta`: 2.17
# Unfused LoRA terms add each term's output beside the matmul's (y + s (x A^T) B^T): traced on `meta` with a rank-32
# term on every block linear, 1.1 (14B) and 2.2 (TI2V-5B) bytes per token and FFN width over full precision's peak
UNFUSED_PER_TOKEN_FFN = 2.25


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
        raise NotImplementedError("a GGUF weight's peak is its own type's: see GgufWeights")

    def limit(self, tensors: tuple[torch.Tensor, ...]) -> float:
        raise NotImplementedError("a GGUF weight's limit is its own type's: see GgufWeights")

    def activation_bytes_per_token(self, dim: int, ffn_dim: int) -> float:
        return UNFUSED_PER_TOKEN_FFN * ffn_dim  # room for LoRAs beside the matmul, the default way

    def activation_bytes_fixed(self, dim: int, ffn_dim: int) -> float:
        return DEQUANT_BYTES_PER_WEIGHT * dim * ffn_dim  # one layer decoded at a time: the FFN's is the largest

    def build_for_plan(self, transformer: torch.nn.Module, plan: str) -> None:
        """Every block linear as a GgufLinear of its type in the file type `plan` ("gguf-Q4_K_M"), on `meta`."""
        default, v_type, ffn_down = FTYPE_MIX[plan.removeprefix("gguf-")]
        targets = [
            (name, module)
            for name, module in transformer.named_modules()
            if name.startswith(BLOCK_PREFIX) and type(module) is torch.nn.Linear
        ]
        for name, linear in targets:
            block, _, rest = name.removeprefix(BLOCK_PREFIX).partition(".")
            kind = default
            if rest in ("attn1.to_v", "attn2.to_v"):
                kind = v_type(2 * int(block) + (rest == "attn2.to_v"))
            elif rest == "ffn.net.2":
                kind = ffn_down
            qtype = qtype_of(kind)
            out, columns = linear.weight.shape
            blocks = torch.empty(out, qtype.row_bytes(columns), dtype=torch.uint8, device=linear.weight.device)
            bias = None if linear.bias is None else linear.bias.detach()
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, GgufLinear(blocks, qtype, bias))

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
            layer.set_lora_terms([lora_term(term.delta, term.strength, stored.shape) for term in terms])
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


def lora_term(delta, strength: float, shape: tuple[int, ...]) -> LoraTerm:
    """A delta as a term beside the matmul: its low-rank factors where it has them, else its dense change at W's
    `shape` (a delta fits give or take dimensions of 1: lora.deltas)."""
    if delta.kind == "lora":
        up, down = (factor.flatten(1) for factor in delta.factors)
        return LoraTerm(up, down, strength * delta.alpha_scale)
    return LoraTerm(delta.compute().reshape(shape), None, strength)


@functools.cache
def weights_of(qtype: QType | str, mode: str) -> GgufWeights:
    return GgufWeights(qtype_of(qtype), check_mode(mode))


def block_weight(name: str, shape: tuple[int, ...]) -> bool:
    return name.startswith(BLOCK_PREFIX) and name.endswith(".weight") and len(shape) == 2


FORMAT = GgufFormat()


# ------------------------------------------------------------------ a .gguf file, loaded; W0 read back from it


def load_transformer(path: Path, spec: ModelSpec, dtype: torch.dtype) -> tuple[torch.nn.Module, GgufSource, set[str]]:
    """The quantized block linears kept as the file's blocks; everything else decoded to `dtype` (fp32 where
    diffusers keeps modules in fp32)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    read = read_transformer(path, spec)  # checked: architecture, types, extents, names, shapes, block scales
    with init_empty_weights(include_buffers=False):  # parameters come from the file; buffers (rotary tables) built
        model = WanTransformer3DModel(**spec.arch.transformer_config())
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, QuantizedTensor] = {}
    for name, value in read.tensors.items():
        if isinstance(value, QuantizedTensor) and block_weight(name, value.shape):
            blocks[name] = value
            continue
        wanted = torch.float32 if keep_fp32 & set(name.split(".")) else dtype
        decoded = value.dequantize(torch.float32) if isinstance(value, QuantizedTensor) else value
        state[name] = decoded.to(wanted)
    for name, value in blocks.items():
        module_name = name.removesuffix(".weight")
        bias = state.pop(f"{module_name}.bias", None)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, GgufLinear(value.data, value.qtype, bias))
    model.load_state_dict(state, strict=False, assign=True)
    logger.info("%s: %s", path.name, FORMAT.describe(model))
    return model.eval(), GgufSource(read), {FORMAT.name}


class GgufSource:
    """The GGUF file a transformer was loaded from, as the W0 of its quantized block linears."""

    def __init__(self, read: GgufTransformer) -> None:
        self.read = read

    def check_unchanged(self) -> None:
        self.read.file.check_unchanged()

    def pristine(self, name: str, stored: Stored) -> Pristine | None:
        if not isinstance(stored.format, GgufWeights) or name not in self.read.sources:
            return None
        candidate = FileBlocks(self.read, name, stored.format)
        return candidate if candidate.gives_back(stored) else None


class FileBlocks(Pristine):
    """A GGUF layer's W0: its blocks read back from the file."""

    def __init__(self, read: GgufTransformer, name: str, fmt: GgufWeights) -> None:
        self.read, self.name, self.format = read, name, fmt
        self.peak = 0.0

    def _blocks(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        value = self.read.read_back(self.name, start, stop)
        assert isinstance(value, QuantizedTensor), "only quantized block linears are read back"
        return value.data

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        self.format.decode_into(out, (self._blocks(start, stop).to(out.device),))

    def restore(self, stored: Stored) -> bool:
        stored.weight.copy_(self._blocks())
        return True

    def gives_back(self, stored: Stored) -> bool:
        blocks = self._blocks()
        if blocks.shape != stored.weight.shape or not torch.equal(blocks, stored.weight.cpu()):
            return False
        self.peak = self.format.peak((blocks,))
        return True
