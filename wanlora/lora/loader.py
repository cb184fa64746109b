"""From a user's LoRA request to a parsed `LoraFile`: strengths checked, files resolved and cached."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInput
from .fetch import Credentials, fetch_lora
from .formats import LoraFile, read_lora

logger = logging.getLogger(__name__)

Strength = float | tuple[float, ...]


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA and its strength: a number, or a schedule of numbers over equal phases."""

    ref: str
    strength: Strength = 1.0


def _check_strength(ref: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput("lora strength", value, f"a finite number (for {ref})")
    return float(value)


def parse_requests(loras: Sequence[tuple[str, float | Sequence[float]]]) -> list[LoraRequest]:
    """Check references and strengths; a list strength becomes a schedule."""
    requests = []
    for item in loras:
        ref, strength = (item, 1.0) if isinstance(item, str) else item
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput("lora", ref, "a LoRA reference (a path, URL or repo id)")
        if isinstance(strength, (list, tuple)):
            if not strength:
                raise InvalidInput("lora strength", strength, f"a number or a non-empty list of numbers (for {ref})")
            schedule = tuple(_check_strength(ref, s) for s in strength)
            requests.append(LoraRequest(ref.strip(), schedule if len(schedule) > 1 else schedule[0]))
        else:
            requests.append(LoraRequest(ref.strip(), _check_strength(ref, strength)))
    return requests


def phase_strengths(strength: Strength, phase: int) -> float:
    """The strength in effect in `phase`; a single number holds in every phase.

    A shorter schedule than the longest one keeps its last value.
    """
    if isinstance(strength, tuple):
        return strength[min(phase, len(strength) - 1)]
    return strength


class LoraLoader:
    """Fetches references to verified files and keeps the last few parsed LoRAs for fast swaps.

    A reference seen recently is not fetched again: swapping back to it costs no network.
    A local file is re-read when it changes on disk.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._parsed: OrderedDict[str, tuple[tuple, LoraFile]] = OrderedDict()

    def load(self, ref: str, credentials: Credentials | None = None) -> LoraFile:
        known = self._parsed.get(ref)
        if known and known[0] == _identity(known[1].path):
            self._parsed.move_to_end(ref)
            return known[1]
        started = time.perf_counter()
        fetched = fetch_lora(ref, credentials)
        lora = read_lora(fetched.path)
        lora.trigger_words = fetched.trigger_words
        self._parsed[ref] = (_identity(lora.path), lora)
        while len(self._parsed) > self.capacity:
            self._parsed.popitem(last=False)
        logger.info(
            "LoRA %s: %s, rank %s, %d parameters, trigger words %s, fetched and read in %.2fs",
            ref,
            lora.layout,
            "/".join(map(str, lora.ranks)) or "-",
            len(lora.deltas),
            ", ".join(lora.trigger_words) or "none found",
            time.perf_counter() - started,
        )
        return lora


def _identity(path: str) -> tuple:
    """Changes when the file does: its size and modification time."""
    try:
        stat = Path(path).stat()
    except OSError:
        return ()
    return (path, stat.st_size, stat.st_mtime_ns)
