"""The library's own exception types.

Every failure a user can cause is one of these. Each message says what was wrong, with
which input, and what to do; front ends print it as one line. No message holds a secret:
references are shown without their tokens, and tokens never. Two nets catch what a message
quotes by mistake: every message has its passwords and `name=token` pairs masked, and a
value an `InvalidInput` echoes, whatever its type (a list of links, a dict), passes the
log scrubber whole before it is cut to length.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from typing import ParamSpec, TypeVar

from .logs import mask_secrets, scrub

P = ParamSpec("P")
R = TypeVar("R")

SHOWN_CHARS = 200  # of a value an error echoes
PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\- ]{1,80}")  # a field name shown as it is; anything else is quoted, scrubbed


class WanLoraError(Exception):
    """Base class for every error a user can cause."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(mask_secrets(arg) if isinstance(arg, str) else arg for arg in args))


class NotShown:
    """The value of an InvalidInput that its message leaves out: an unknown option's may hold anything."""


def shown_value(value: object) -> str:
    """`value` as an error may echo it: its repr, nested values included, scrubbed, then cut to length."""
    try:
        text = scrub(repr(value))
    except Exception:  # a repr that fails is a value not worth showing
        text = f"(a {type(value).__name__})"
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def shown_name(field: object) -> str:
    """A field's name as an error shows it: a plain name as it is; a key from a request (a JSON line's) scrubbed."""
    if isinstance(field, str) and PLAIN_NAME.fullmatch(field):
        return field
    return shown_value(field)


class InvalidInput(WanLoraError, ValueError):
    """A generation or CLI argument (or an environment variable) is out of range, malformed or missing.

    `field` is the library's name for it; each front end shows its own (`renamed`): the CLI
    the flag that was typed, the predictor its input. `value` is echoed scrubbed (`NotShown`: not at all).
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        name = shown_name(field)
        if value is None:
            super().__init__(f"{name} is missing: {allowed}")
        elif value is NotShown:
            super().__init__(f"{name} is not allowed: {allowed}")
        else:
            super().__init__(f"{name}={shown_value(value)} is not allowed: {allowed}")

    def renamed(self, names: Mapping[str, str]) -> InvalidInput:
        """The same error under a front end's name for the field (itself when `names` has none)."""
        if self.field not in names:
            return self
        return InvalidInput(names[self.field], self.value, self.allowed)

    def __reduce__(self):  # to cross process boundaries (parallel workers) intact
        return type(self), (self.field, self.value, self.allowed)


class ModelNotFound(WanLoraError):
    """The base model reference names nothing that can be loaded."""


class BatchLineError(WanLoraError):
    """A line of a batch's jobs file cannot run; the message names the line and what is wrong with it."""


class VideoEncodeError(WanLoraError):
    """Frames that the H.264 encoder cannot take, or ffmpeg failed."""


class WorkerCrashed(WanLoraError):
    """A parallel worker process died during a request (out of memory, a fault, a kill)."""


class CheckpointChanged(WanLoraError):
    """The checkpoint a model was loaded from was rewritten in place: its W0 is gone, so no LoRA can change."""


class WeightsPartlyMerged(WanLoraError):
    """A LoRA merge stopped half-way and could not be undone (its W0 gone with a checkpoint cut short under it):
    the model's weights mix two LoRA sets, and only loading it again gives them back."""


class LoraError(WanLoraError):
    """Base class for everything that can go wrong with a LoRA.

    `ref` is the reference as it may be shown (no secrets), `status` the HTTP status that
    caused it, when one did.
    """

    def __init__(self, message: str, ref: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.ref, self.status = ref, status

    def __reduce__(self):
        return type(self), (str(self), self.ref, self.status)


class LoraNotFound(LoraError):
    """The reference points at nothing: no file, repo, page or model."""


class LoraFileGone(LoraNotFound):
    """A fetched file was removed before it was read (another process cleared the cache): fetch it again."""


class NoSuchHubRepo(LoraNotFound):
    """The Hub has no such repo (or hides a private one): `owner/repo` may be a Replicate model."""


class LoraAuthRequired(LoraError):
    """The host answered 401 or 403: a token is missing or lacks access."""


class LoraDownloadError(LoraError):
    """The download failed: unreachable host, refused address, timeout, too large, no disk space."""


class LoraFormatError(LoraError):
    """The file is not a usable safetensors LoRA, or its keys or values cannot be used."""


class LoraMismatch(LoraError):
    """The LoRA is valid but made for another base model; `widths` are the model widths it fits."""

    def __init__(self, message: str, ref: str | None = None, status: int | None = None, widths: tuple = ()) -> None:
        super().__init__(message, ref, status)
        self.widths = widths

    def __reduce__(self):
        return type(self), (str(self), self.ref, self.status, self.widths)


class OutOfMemory(WanLoraError):
    """The machine or the GPU ran out of memory for this request."""


class InternalError(WanLoraError):
    """A failure wanlora did not foresee: a bug to report. The message names it, without secrets."""

    @classmethod
    def of(cls, exc: Exception) -> WanLoraError:
        text = scrub(str(exc).splitlines()[0] if str(exc) else "")[:500]
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            advice = "try a smaller size, fewer frames, or offload"
            return OutOfMemory(f"out of memory ({text or type(exc).__name__}): {advice}")
        return cls(f"an unexpected {type(exc).__name__} inside wanlora (a bug: please report it): {text}")


def error_boundary(function: Callable[P, R]) -> Callable[P, R]:
    """A public call lets out only WanLoraError (and BaseExceptions: Ctrl-C, a cancellation); anything
    else is a bug, raised as InternalError with its traceback logged (scrubbed) at DEBUG."""

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except WanLoraError:
            raise
        except Exception as exc:
            logging.getLogger("wanlora").debug("%s failed", function.__qualname__, exc_info=True)
            raise InternalError.of(exc) from None

    return call
