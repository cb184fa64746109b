"""A transformer's safetensors files, memory-mapped, as the pristine W0 for LoRA merges.

Merges need W0 of every weight a LoRA set touches. A host copy of it costs 28.6 GB per 14B
transformer in bf16; the checkpoint already holds it. Mapped, its pages live in the OS page
cache, shared, dropped under pressure and read back on demand, not in the process's heap.

Only exact sources are used: the first time a weight is touched, what the file gives back
(cast to the loaded dtype, quantized like the loaded fp8 weight) is compared bit for bit with
the weight, which still holds W0 then. A mismatch (a conversion other than a plain cast, a
different file) means a host copy instead. The files stay open and are mapped privately, so
replacing one on disk (a new download, a rename) does not reach us; one written in place is
seen (its size or modification time moves) and refused before any weight changes.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WanLoraError
from .fp8 import FP8, dequantize, dequantize_into, quantize_rows
from .lora.pristine import Pristine
from .lora.sniff import read_header

logger = logging.getLogger(__name__)

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE = "diffusion_pytorch_model.safetensors"
VERIFY_ROWS = 1024  # rows compared at a time on first touch


class CheckpointChanged(WanLoraError):
    """The checkpoint a model was loaded from was rewritten in place: its W0 is gone."""


class MappedFile:
    """One safetensors file, open and mapped copy-on-write: tensors are views into its pages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_header(path, str(path))
        self._handle = path.open("rb")
        self._stat = self._signature()
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, file untouched
        self._data_start = 8 + int.from_bytes(self._map[:8], "little")

    def _signature(self) -> tuple[int, int]:
        stat = os.fstat(self._handle.fileno())
        return stat.st_size, stat.st_mtime_ns

    def check_unchanged(self) -> None:
        if self._signature() != self._stat:
            raise CheckpointChanged(
                f"{self.path} was rewritten since the model was loaded from it, and LoRA merges read the "
                "original weights there: load the model again"
            )

    def tensor(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        start, stop = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        count = (stop - start) // dtype.itemsize
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data_start + start)
        return flat.view(entry["shape"])


@dataclass(frozen=True)
class TensorRef:
    file: MappedFile
    key: str
    scale: torch.Tensor | None = None  # an fp8 tensor's scale per row, as its file gives it


class Checkpoint:
    """Where each parameter of one transformer lies in its files. `loaded_dtype`: the dtype the model
    was loaded in, which an fp8 weight was quantized from."""

    def __init__(self, refs: dict[str, TensorRef], loaded_dtype: torch.dtype) -> None:
        self.refs = refs
        self.loaded_dtype = loaded_dtype

    @classmethod
    def of_folder(cls, folder: Path, loaded_dtype: torch.dtype) -> Checkpoint | None:
        """The diffusers-layout transformer folder's files (sharded or one), or None without safetensors."""
        index = folder / INDEX
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
            elif (folder / SINGLE).is_file():
                weight_map = {key: SINGLE for key in read_header(folder / SINGLE, SINGLE) if key != "__metadata__"}
            else:
                return None
            files = {name: MappedFile(folder / name) for name in sorted(set(weight_map.values()))}
        except (OSError, ValueError, KeyError, WanLoraError) as exc:
            logger.debug("no pristine weights from %s: %s", folder, exc)
            return None
        return cls({key: TensorRef(files[name], key) for key, name in weight_map.items()}, loaded_dtype)

    def check_unchanged(self) -> None:
        for file in {id(ref.file): ref.file for ref in self.refs.values()}.values():
            file.check_unchanged()

    def pristine(self, name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> Pristine | None:
        ref = self.refs.get(name)
        if ref is None:
            return None
        candidate = FileTensor(ref, weight.dtype if scale is None else self.loaded_dtype)
        if tuple(candidate.tensor.shape) != tuple(weight.shape) or not candidate.gives_back(weight, scale):
            logger.debug("%s: the checkpoint does not give back the loaded weight; keeping a host copy", name)
            return None
        return candidate


class FileTensor(Pristine):
    """W0 read from the mapped checkpoint: dense (cast to the dtype the model was loaded in), or fp8 rows and
    their scales."""

    def __init__(self, ref: TensorRef, loaded_dtype: torch.dtype) -> None:
        self.file = ref.file
        self.tensor = ref.file.tensor(ref.key)
        self.scale = ref.scale
        self.loaded_dtype = loaded_dtype
        self.peak = 0.0

    @property
    def quantized(self) -> bool:
        return self.tensor.dtype == FP8

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        rows = self.tensor.view(self.tensor.shape[0], -1)[start:stop]
        if self.quantized:
            assert self.scale is not None, "an fp8 tensor comes with its scale"
            return dequantize(rows, self.scale[start:stop])
        return rows.to(self.loaded_dtype).float()

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        self.file.check_unchanged()
        rows = self.tensor.view(self.tensor.shape[0], -1)[start:stop]
        if self.quantized:
            assert self.scale is not None, "an fp8 tensor comes with its scale"
            dequantize_into(out, rows, self.scale[start:stop])
        elif rows.dtype == self.loaded_dtype:
            out.copy_(rows, non_blocking=True)
        else:
            out.copy_(rows.to(self.loaded_dtype), non_blocking=True)

    def whole(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.tensor if self.tensor.dtype == dtype == self.loaded_dtype else None

    def restore(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        self.file.check_unchanged()
        if self.quantized != (scale is not None):
            return False
        weight.copy_(self.tensor, non_blocking=True)
        if scale is not None:
            assert self.scale is not None
            scale.copy_(self.scale, non_blocking=True)
        return True

    def gives_back(self, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
        """Whether restoring from here reproduces `weight` (and `scale`) bitwise; measures the peak on the way."""
        if self.quantized and scale is None:
            return False  # fp8 in the file, dequantized at load: a computed W0, not one to read back
        rows = weight.view(weight.shape[0], -1)
        for start in range(0, rows.shape[0], VERIFY_ROWS):
            stop = min(start + VERIFY_ROWS, rows.shape[0])
            values = self._rows(start, stop)
            self.peak = max(self.peak, float(values.abs().max()) if values.numel() else 0.0)
            stored = self.tensor.view(rows.shape[0], -1)[start:stop]
            if scale is None:
                want, want_scale = stored.to(weight.dtype), None
            elif self.quantized:
                want, want_scale = stored, self.scale[start:stop] if self.scale is not None else None
            else:
                want, want_scale = quantize_rows(values)
            if not _same_bits(want, rows[start:stop]):
                return False
            if scale is not None and (want_scale is None or not _same_bits(want_scale, scale[start:stop])):
                return False
        return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.cpu().contiguous().view(torch.uint8))
