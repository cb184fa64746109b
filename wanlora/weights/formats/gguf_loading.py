"""A GGUF transformer file loaded as a diffusers `WanTransformer3DModel` with `GgufLinear` block linears, and
the file as the W0 source of requantized LoRA merges (read back by `pread`, checked unchanged first)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...models import ModelSpec
from ..gguf.linear import GgufLinear
from ..gguf.reader import GgufTransformer, QuantizedTensor, read_transformer
from ..pristine import Pristine
from .base import Stored
from .gguf import FORMAT, GgufWeights, block_weight

logger = logging.getLogger(__name__)


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
