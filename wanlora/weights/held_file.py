"""A weight file held open for reading W0 back: read with `pread`, never mapped, and checked unchanged.

A mapping turns a file truncated under a running model into SIGBUS; a held handle, read with
`pread`, turns it into a short read, and the file's size and modification time, taken when it
was opened, say whether it was rewritten since. Safetensors checkpoints and GGUF files share this.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from ..errors import CheckpointChanged


class HeldFile:
    """One file, open for reading for as long as what was loaded from it may need its bytes again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = path.open("rb", buffering=0)  # held: a file renamed over this one does not reach us
        self._stat = self._signature()
        self._lock = threading.Lock()  # for systems without preadv, whose reads seek

    def _signature(self) -> tuple[int, int]:
        stat = os.fstat(self._handle.fileno())
        return stat.st_size, stat.st_mtime_ns

    def check_unchanged(self) -> None:
        if self._signature() != self._stat:
            raise self._changed()

    def _changed(self) -> CheckpointChanged:
        return CheckpointChanged(
            f"{self.path} was rewritten since the model was loaded from it, and LoRA merges read the "
            "original weights there: load the model again"
        )

    def _read_into(self, target: torch.Tensor, offset: int) -> None:
        """Fill `target` (a contiguous CPU uint8 tensor) with the bytes at `offset`."""
        view = memoryview(target.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
        done = 0
        while done < len(view):
            got = self._pread_into(view[done:], offset + done)
            if got <= 0:  # the file ends early: cut short since it was loaded
                raise self._changed()
            done += got

    def _pread_into(self, view: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self._handle.fileno(), [view], offset)
        with self._lock:
            self._handle.seek(offset)
            return self._handle.readinto(view) or 0

    def _pread(self, count: int, offset: int) -> bytes:
        buffer = bytearray(count)
        if count and self._pread_into(memoryview(buffer), offset) != count:
            raise self._changed()
        return bytes(buffer)

    def close(self) -> None:
        self._handle.close()

    def __del__(self) -> None:  # the handle lives as long as what was loaded may need W0 from it, then closes
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
