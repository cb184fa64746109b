"""What a downloaded file really is, judged by its bytes and never by its name.

A LoRA must be a safetensors file whose header is sane: a plausible length, JSON that
parses, known dtypes, and tensor offsets that fit the file. Pickles, web pages and
truncated files are refused with a message that says what they are.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import LoraFormatError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def is_tar(head: bytes) -> bool:
    return len(head) > 262 and head[257:262] == b"ustar"


def has_safetensors_framing(head: bytes, size: int) -> bool:
    """A header length that fits the file, followed by the JSON object's `{`.

    Checked before any other signature: a header of 640 bytes starts with the bytes of a
    pickle's protocol marker, one of 123 bytes with `{`, one of 35615 with gzip's magic.
    """
    return len(head) > 8 and 2 <= int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{"


def describe_non_safetensors(head: bytes) -> str | None:
    """A readable name for well-known non-safetensors content, or None."""
    stripped = head.lstrip()
    lowered = stripped[:64].lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head[:1024].lower():
        return "an HTML page (a login, error or download page), not a weights file"
    if stripped.startswith((b"{", b"[")):
        return "a JSON document (an API or error response), not a weights file"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<Error>"):
        return "an XML document (often a storage error such as an expired signed URL), not a weights file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive: a PyTorch pickle checkpoint (.pt/.pth/.ckpt/.bin), which can run code when loaded"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle (.pt/.ckpt/.bin), which can run arbitrary code when loaded"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive"
    return None


def read_header(path: str | os.PathLike, label: str) -> dict[str, Any]:
    """Validate `path` as safetensors and return its header (with `__metadata__`, if any).

    `label` names the file in errors: the reference the user gave, not a cache path.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(1024)
        what = None if has_safetensors_framing(head, size) else describe_non_safetensors(head)
        if what:
            raise LoraFormatError(f"{label} is {what}. wanlora only loads .safetensors LoRA files", label)
        if size < 8:
            raise LoraFormatError(f"{label} is {size} bytes: too short to be a safetensors file", label)
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len < 2 or header_len > min(MAX_HEADER_BYTES, size - 8):
            raise LoraFormatError(
                f"{label} is not a safetensors file (its first 8 bytes do not give a sane header length)", label
            )
        handle.seek(8)
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraFormatError(f"{label} has a safetensors header that is not valid JSON: {exc}", label) from exc
    except RecursionError as exc:  # a header nested thousands deep: an attack, not a LoRA
        raise LoraFormatError(f"{label} has a safetensors header nested too deeply to be real", label) from exc
    except ValueError as exc:  # a number of thousands of digits, past Python's integer-string limit
        raise LoraFormatError(f"{label} has a safetensors header with a number too long to be real", label) from exc
    if not isinstance(header, dict):
        raise LoraFormatError(f"{label} has a safetensors header that is not a JSON object", label)
    _check_tensors(header, size - 8 - header_len, label)
    return header


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensors(header: dict[str, Any], data_size: int, label: str) -> None:
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise LoraFormatError(f"{label}: tensor {name!r:.80} has a malformed header entry", label)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
            raise LoraFormatError(f"{label}: tensor {name!r:.80} has a malformed shape {shape!r:.80}", label)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
            raise LoraFormatError(f"{label}: tensor {name!r:.80} has malformed data offsets {offsets!r:.80}", label)
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise LoraFormatError(f"{label}: tensor {name!r:.80} has unknown dtype {dtype!r:.40}", label)
        start, end = offsets
        if start > end or end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise LoraFormatError(
                f"{label}: tensor {name!r:.80} has offsets that do not match its shape and dtype", label
            )
        end_max = max(end_max, end)
    if end_max > data_size:
        raise LoraFormatError(
            f"{label} is truncated: its header needs {end_max} data bytes but the file has {data_size}; "
            "download it again",
            label,
        )


def header_metadata(header: dict[str, Any]) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
