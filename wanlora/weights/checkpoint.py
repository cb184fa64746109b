"""A transformer's safetensors files, read back as the pristine W0 for LoRA merges.

Merges need W0 of every weight a LoRA set touches. A host copy of it costs 28.6 GB per 14B
transformer in bf16; the checkpoint already holds it, and the OS page cache keeps its pages
shared and drops them under pressure, not the process's heap.

Only exact sources are used: the first time a weight is touched, what the file gives back
(cast to the loaded dtype, or encoded in the loaded layer's format) is compared bit for bit with
the weight, which still holds W0 then: as raw bytes where the dtypes match, in large chunks. A
mismatch (a conversion other than a plain cast, a different file), or a dtype torch cannot
read, means a host copy instead.

The files are read with `pread`, never mapped: a mapping turns a file truncated under a
running model (`cp` over it) into SIGBUS at the next touch of a page past its new end. Each
read is checked for length, and each file's size and modification time before each use: a
file cut short or rewritten in place ends in `CheckpointChanged` before any weight changes. A
file replaced by a rename does not reach us: the open handle keeps the old one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WanLoraError
from . import formats
from .formats.base import Stored, WeightFormat, row_view
from .held_file import HeldFile
from .pristine import Pristine
from .scratch import thread_buffer
from .sniff import read_header

logger = logging.getLogger(__name__)

DTYPES = {  # every safetensors dtype torch holds; any other (F4, F6, E8M0 ...) is one we cannot read back
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE = "diffusion_pytorch_model.safetensors"
CHUNK_BYTES = 64 << 20  # read and compared at a time: large enough for full speed, small enough to stay modest


class CheckpointFile(HeldFile):
    """One safetensors file, open for reading: each tensor read is a copy of its own."""

    def __init__(self, path: Path) -> None:
        self.header = read_header(path, str(path))
        super().__init__(path)
        self._data_start = 8 + int.from_bytes(self._pread(8, 0), "little")

    def dtype(self, key: str) -> torch.dtype | None:
        """The tensor's dtype, or None where torch has none for it."""
        return DTYPES.get(self.header[key]["dtype"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows start:stop of tensor `key` (all of a 0-d one), read into memory of their own, or into `out`
        (a contiguous CPU tensor of exactly their bytes: a weight can be read back in place)."""
        dtype = self.dtype(key)
        if dtype is None:
            raise ValueError(f"{key} is {self.header[key]['dtype']}, which torch cannot hold")
        shape = self.shape(key)
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        begin = self.header[key]["data_offsets"][0]
        count = (stop - start) * row_bytes
        target = torch.empty(count, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
        if target.numel() != count or target.device.type != "cpu":
            raise ValueError(f"{key}: rows {start}:{stop} need a CPU buffer of {count} bytes")
        if count:
            self._read_into(target, self._data_start + begin + start * row_bytes)
        result = target.view(dtype)
        return result.view(stop - start, *shape[1:]) if shape else result.view(())


@dataclass(frozen=True)
class TensorRef:
    file: CheckpointFile
    key: str
    scale: torch.Tensor | None = None  # a stored weight's scale per row, as its file gives it (W = stored * scale)


class Checkpoint:
    """Where each parameter of one transformer lies in its files. `loaded_dtype`: the dtype the model
    was loaded in, which a quantized layer was encoded from."""

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
            files = {name: CheckpointFile(folder / name) for name in sorted(set(weight_map.values()))}
            refs = {key: TensorRef(files[name], key) for key, name in weight_map.items() if key in files[name].header}
        except (OSError, ValueError, KeyError, TypeError, WanLoraError) as exc:
            logger.debug("no pristine weights from %s: %s", folder, exc)
            return None
        return cls(refs, loaded_dtype)

    def check_unchanged(self) -> None:
        for file in {id(ref.file): ref.file for ref in self.refs.values()}.values():
            file.check_unchanged()

    def pristine(self, name: str, stored: Stored) -> Pristine | None:
        ref = self.refs.get(name)
        if ref is None:
            return None
        file_dtype = ref.file.dtype(ref.key)
        file_format = None if file_dtype is None else formats.format_of_dtype(file_dtype)
        if file_format is None or ref.file.shape(ref.key) != tuple(stored.weight.shape):
            logger.debug("%s: the checkpoint holds it as %s; keeping a host copy", name, ref.file.header[ref.key])
            return None
        candidate = FileTensor(ref, stored, file_format, self.loaded_dtype)
        if not candidate.gives_back(stored):
            logger.debug("%s: the checkpoint does not give back the loaded weight; keeping a host copy", name)
            return None
        return candidate


class FileTensor(Pristine):
    """W0 read from the checkpoint: the layer format's own tensors as the file holds them ("raw": full
    precision cast to the loaded dtype, or a quantized format's rows and their scales), or full-precision
    values a quantized layer was encoded from at load."""

    def __init__(self, ref: TensorRef, layer: Stored, file_format: WeightFormat, loaded_dtype: torch.dtype) -> None:
        stored = ref.file.dtype(ref.key)
        assert stored is not None, "Checkpoint.pristine reads back only dtypes torch holds"
        self.file, self.key, self.scale = ref.file, ref.key, ref.scale
        self.stored: torch.dtype = stored
        self.shape = ref.file.shape(ref.key)
        self.format = layer.format
        self.like = tuple(torch.empty(0, dtype=tensor.dtype) for tensor in layer.data)  # the layer's dtypes
        self.raw = file_format is layer.format  # else: full-precision values, encoded in the layer's format at load
        self.values_dtype = loaded_dtype
        self.peak = 0.0

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def _chunks(self) -> list[tuple[int, int]]:
        """(start, stop) of each CHUNK_BYTES of rows."""
        step = max(1, CHUNK_BYTES // max(1, math.prod(self.shape[1:]) * self.stored.itemsize))
        return [(start, min(start + step, self.rows)) for start in range(0, self.rows, step)]

    def _read(self, start: int, stop: int, reuse: bool = False) -> torch.Tensor:
        """Rows start:stop, in memory of their own, or (`reuse`) in this thread's read buffer, valid until its next
        read: allocating 64 MiB a chunk costs as much as reading it."""
        out = None
        if reuse:
            count = (stop - start) * (math.prod(self.shape[1:]) if self.shape else 1) * self.stored.itemsize
            out = thread_buffer("file reads", count, torch.uint8)  # a chunk: CHUNK_BYTES at most
        return self.file.read(self.key, start, stop, out=out).view(stop - start, -1)

    def _scale_rows(self, start: int, stop: int, device: torch.device | None = None) -> torch.Tensor | None:
        return None if self.scale is None else self.scale[start:stop].to(device or self.scale.device)

    def fill(self, out: torch.Tensor, start: int, stop: int) -> None:
        self.file.check_unchanged()
        rows = self._read(start, stop)
        if not self.raw:
            out.copy_(rows if rows.dtype == self.values_dtype else rows.to(self.values_dtype))
            return
        tensors = self.format.from_file(rows, self._scale_rows(start, stop), self.like)
        assert tensors is not None, "gives_back proved the file's tensors fit the layer"
        self.format.decode_into(out, tensors)

    def restore(self, stored: Stored) -> bool:
        self.file.check_unchanged()
        if not self.raw or stored.format is not self.format:
            return False
        target = row_view(stored.weight)
        in_place = target.device.type == "cpu" and target.is_contiguous() and target.dtype == self.stored
        for start, stop in self._chunks():
            if in_place:
                self.file.read(self.key, start, stop, out=target[start:stop])
            else:
                target[start:stop].copy_(self._read(start, stop))
        for side, value in zip(stored.data[1:], self._sides(), strict=True):
            side.copy_(value)
        return True

    def _sides(self) -> tuple[torch.Tensor, ...]:
        """The file's side tensors of the layer's stored form (its scale per row), whole."""
        return () if self.scale is None else (self.scale,)

    def gives_back(self, stored: Stored) -> bool:
        """Whether restoring from here reproduces the stored tensors bitwise; measures the peak on the way.

        Compared where the weight lives, a chunk at a time: bytes against bytes where the file
        holds the layer's own form (a full-precision cast at most), else after the encoding the
        load made.
        """
        device = stored.weight.device
        for start, stop in self._chunks():
            rows = self._read(start, stop, reuse=True).to(device)  # pageable: copied before the next read
            loaded = stored.rows(start, stop)
            if self.raw:
                want = self.format.from_file(rows, self._scale_rows(start, stop, device), loaded)
                if want is None:
                    return False
                self.peak = max(self.peak, self.format.peak(want))
            else:
                values = rows.to(self.values_dtype)
                self.peak = max(self.peak, formats.full_precision().peak((values,)))
                want = self.format.encode(values, loaded)
            if len(want) != len(loaded) or not all(_same_bits(a, b) for a, b in zip(want, loaded, strict=True)):
                return False
        return True


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, compared as the widest integers the bytes allow (8 at a time: 3.5x faster than bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    for wide in (torch.int64, torch.int32, torch.int16):
        size = wide.itemsize
        if a.numel() % size == 0 and a.data_ptr() % size == 0 and b.data_ptr() % size == 0:
            return torch.equal(a.view(wide), b.view(wide))
    return torch.equal(a, b)
