"""The interface every weight format implements (wanlora.weights.formats lists them).

A format stores a transformer's block linears its way, and answers for them:
- storing: `stores` (which tensor dtypes are its stored weights), `convert` (a full-precision
  `nn.Linear` as its layer), `stored` (the tensors that hold each of its weights in a module);
- numbers: `encode_into` (the final rounding of the merge's fp32 sum W0 + sum(s_i dW_i), once),
  `encode` (the same, into fresh tensors), `decode_into` (its tensors back as W0 in fp32), `peak`
  (a bound of |W0|) and `limit` (the largest |value| its encoding holds);
- memory: its layers' bytes are counted as built on `meta` (`convert_transformer`), plus
  `activation_bytes_per_token` for anything its matmuls keep per token;
- compute: `choose_matmul` per device, `set_matmul`, and `describe` for the log;
- files: `FileConventions` where a single .safetensors file can hold its weights.

Every tensor a format hands the merge is viewed as rows (the weight's first dimension): the
merge works a chunk of rows at a time, and a format's side tensors (a scale per row) follow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BLOCK_PREFIX = "blocks."  # the block linears: attention, cross-attention, I2V's image projections, the FFN


@dataclass(frozen=True)
class Stored:
    """One weight as its format stores it: the tensors that hold it (the weight first, then any side
    tensors, such as a scale per row), all with the weight's rows. The tensors are the module's own
    parameters and buffers, whose `.data` placement may swap: read through `data`, never cached."""

    format: WeightFormat
    tensors: tuple[torch.Tensor, ...]
    layer: torch.nn.Module | None = None  # the layer holding them, for formats that apply LoRAs beside the weight
    logical_shape: tuple[int, ...] | None = None  # W's (out, in) where the stored weight's shape differs

    @property
    def weight(self) -> torch.Tensor:
        return self.tensors[0].data

    @property
    def shape(self) -> tuple[int, ...]:
        """W's shape, as a LoRA's delta sees it."""
        return self.logical_shape or tuple(self.tensors[0].shape)

    @property
    def data(self) -> tuple[torch.Tensor, ...]:
        return tuple(tensor.data for tensor in self.tensors)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Rows start:stop of each tensor, as views to write through (the weight as 2-D rows)."""
        return rows_of(self.data, start, stop)


def row_view(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as rows: 2-D, its first dimension by the rest (a bias: a column)."""
    return tensor.view(tensor.shape[0], -1)


def rows_of(tensors: tuple[torch.Tensor, ...], start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """Rows start:stop of a weight's stored tensors: the weight as 2-D rows, its side tensors (a scale per row)
    as they are."""
    weight, *sides = tensors
    return (row_view(weight)[start:stop], *(side[start:stop] for side in sides))


class WeightFormat(ABC):
    """One way of storing block linears. Subclasses are singletons (a module's `FORMAT`)."""

    name: str
    layer_type: type[torch.nn.Module] | None = None  # the module type that holds this format's weights
    files: FileConventions | None = None  # how single .safetensors files hold its weights, where they can
    planned_matmul = "weight-only"  # the matmul whose activations are the largest: what memory plans trace
    file_suffixes: tuple[str, ...] = ()  # transformer files of its own (".gguf"), read by `load_file`

    # ------------------------------------------------------------------ storing

    @abstractmethod
    def stores(self, dtype: torch.dtype) -> bool:
        """Whether a tensor of `dtype` (in a file, or in a layer) is a weight stored in this format."""

    def convert(self, linear: torch.nn.Linear, matmul: str, device: torch.device | None = None) -> torch.nn.Module:
        """`linear` stored in this format (its bias kept as it is), on `device` (default: where it is)."""
        raise NotImplementedError(f"{self.name} does not convert full-precision layers")

    def convert_transformer(
        self, transformer: torch.nn.Module, matmul: str = "weight-only", device: torch.device | None = None
    ) -> int:
        """Replace every full-precision block linear of `transformer` by this format's layer, one at a time
        (the full-precision weights never go to `device` whole); return how many."""
        targets = [
            (name, module)
            for name, module in transformer.named_modules()
            if name.startswith(BLOCK_PREFIX) and type(module) is torch.nn.Linear
        ]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent_name), child, self.convert(linear, matmul, device))
        return len(targets)

    def load_file(self, path: Path, spec: Any, dtype: torch.dtype, device: torch.device) -> Any:
        """(transformer, its W0 source for merges, {format names kept}) from a file of this format's own."""
        raise NotImplementedError(f"{self.name} has no files of its own")

    def layers(self, module: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """This format's layers in `module`, by the name of their weight parameter."""
        if self.layer_type is None:
            return {}
        return {f"{name}.weight": layer for name, layer in module.named_modules() if isinstance(layer, self.layer_type)}

    def layer_from_file(
        self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str
    ) -> torch.nn.Module:
        """A block linear from a file's stored weight and its scale per row (ones where the file has none)."""
        raise NotImplementedError(f"{self.name} is not read from single files")

    def stored(self, layer: torch.nn.Module) -> Stored:
        """The tensors holding one of this format's layers' weight."""
        raise NotImplementedError(f"{self.name} has no layers of its own")

    # ------------------------------------------------------------------ numbers

    @abstractmethod
    def encode_into(self, rows: torch.Tensor, target: tuple[torch.Tensor, ...]) -> None:
        """Round fp32 `rows` (W0 + sum(s dW), used up) once into `target` (rows of the stored tensors)."""

    def encode(self, values: torch.Tensor, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`values` (rows, any float dtype) encoded as fresh tensors shaped and typed like `like`."""
        shapes = [row_view(like[0]).shape, *(side.shape for side in like[1:])]
        target = tuple(
            torch.empty(shape, dtype=t.dtype, device=values.device) for shape, t in zip(shapes, like, strict=True)
        )
        self.encode_into(row_view(values).float().clone(), target)
        return target

    @abstractmethod
    def decode_into(self, out: torch.Tensor, source: tuple[torch.Tensor, ...]) -> None:
        """Write W0 of the stored rows `source` into the fp32 rows `out` (on `out`'s device)."""

    @abstractmethod
    def peak(self, tensors: tuple[torch.Tensor, ...]) -> float:
        """An upper bound of |W0| over these stored rows, for the merge's range check."""

    @abstractmethod
    def limit(self, tensors: tuple[torch.Tensor, ...]) -> float:
        """The largest |value| of a merged weight this format can encode into these tensors."""

    def from_file(
        self, rows: torch.Tensor, scale: torch.Tensor | None, like: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        """The stored tensors that a file's rows in this format (`scale`: the file's scale per row) give a layer
        holding `like`, without any rounding; None where they cannot (another dtype, no scale)."""
        return None

    # ------------------------------------------------------------------ LoRAs

    lora_modes: tuple[str, ...] = ("requantize",)  # how LoRAs apply to this format's weights; the first is the default
    keeps_w0 = False  # LoRAs never write the stored tensors (they are applied beside them): W0 is read from them

    def set_lora_mode(self, module: torch.nn.Module, mode: str) -> None:
        """How LoRAs apply to this format's layers in `module` from now on (one of `lora_modes`)."""
        if mode not in self.lora_modes:
            raise ValueError(f"{self.name} weights take LoRAs {' or '.join(self.lora_modes)}, not {mode}")

    def apply_terms(self, stored: Stored, terms: list, summed: Callable[[], Iterator]) -> bool:
        """Apply a LoRA set's `terms` (each with `delta` and `strength`) to one weight the format's own way (beside
        the matmul, or a finer copy from `summed()`: (start, stop, fp32 rows of W0 + sum(s dW))); False where the
        merge rounds the sum into the stored tensors (`encode_into`)."""
        return False

    # ------------------------------------------------------------------ memory and compute

    def activation_bytes_per_token(self, dim: int, ffn_dim: int) -> float:
        """What this format's matmuls keep per token beyond full precision's (quantized activations)."""
        return 0.0

    def activation_bytes_fixed(self, dim: int, ffn_dim: int) -> float:
        """What its matmuls hold whatever the tokens: a weight decoded for the call (the largest, the FFN's)."""
        return 0.0

    def build_for_plan(self, transformer: torch.nn.Module, plan: str) -> None:
        """Store `transformer`'s block linears (on `meta`, for a memory plan) as plan `plan` says (`for_plan`)."""
        self.convert_transformer(transformer, self.planned_matmul)

    def choose_matmul(self, requested: str, device: torch.device) -> str:
        """The matmul this format's layers use on `device`; "auto" picks the fastest that works there."""
        return "dense"

    def set_matmul(self, module: torch.nn.Module, matmul: str) -> None:
        """Set the matmul of every layer of this format in `module`."""
        for layer in self.layers(module).values():
            setattr(layer, "matmul", matmul)  # noqa: B010  # a layer's own choice, which nn.Module does not type

    def describe(self, module: torch.nn.Module) -> str:
        """How this format's layers in `module` compute, for the log."""
        return f"{len(self.layers(module))} {self.name} layers"


class FileConventions:
    """How a single .safetensors transformer file (ComfyUI's, Kijai's) holds a format's weights: a stored
    weight, optionally a scale per row or per tensor beside it (W = stored * scale), markers and entries
    the reader skips, and the checks that keep a file's numbers from loading wrong."""

    scale_suffixes: tuple[str, ...] = ()  # a weight's scale: the weight's module key + one of these
    ignored_suffixes: tuple[str, ...] = ()  # entries beside a weight the reader does not use
    ignored_keys: frozenset[str] = frozenset()  # whole keys (markers) the reader does not use

    def problems(self, file: object, keys: list[str], names: dict[str, str], scale_keys: dict[str, str]) -> list[str]:
        """What in the file would load this format's weights wrong, naming the tensor."""
        return []

    def bad_values(self, stored: torch.Tensor) -> str | None:
        """Why the values of `stored` (one of this format's tensors, as read) cannot be used, or None."""
        return None

    def note(self, dtype: torch.dtype) -> str:
        """What the log should add about block linears kept in `dtype`."""
        return ""
