"""The library's own exception types.

Every failure a user can cause is one of these. Each message says what was wrong, with
which input, and what to do; front ends print it as one line.
"""

from __future__ import annotations


class WanLoraError(Exception):
    """Base class for every error a user can cause."""


class InvalidInput(WanLoraError, ValueError):
    """A generation or CLI argument is out of range or malformed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")

    def __reduce__(self):  # to cross process boundaries (parallel workers) intact
        return type(self), (self.field, self.value, self.allowed)


class ModelNotFound(WanLoraError):
    """The base model reference names nothing that can be loaded."""


class VideoEncodeError(WanLoraError):
    """Frames that the H.264 encoder cannot take, or ffmpeg failed."""


class WorkerCrashed(WanLoraError):
    """A parallel worker process died during a request (out of memory, a fault, a kill)."""


class LoraError(WanLoraError):
    """Base class for everything that can go wrong with a LoRA."""


class LoraNotFound(LoraError):
    """The reference points at nothing: no file, repo, page or model."""


class LoraAuthRequired(LoraError):
    """The host answered 401 or 403: a token is missing or lacks access."""


class LoraDownloadError(LoraError):
    """The download failed: unreachable host, refused address, timeout, too large."""


class LoraFormatError(LoraError):
    """The file is not a usable safetensors LoRA, or its keys cannot be read."""


class LoraMismatch(LoraError):
    """The LoRA is valid but made for another base model."""
