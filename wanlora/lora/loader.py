"""From a user's LoRA request to a parsed `LoraFile`: strengths checked, files resolved and cached."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidInput
from .formats import LoraFile, read_lora, trigger_words
from .refs import resolve_local

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
    """Resolves references to files and keeps the last few parsed LoRAs for fast swaps."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[tuple, LoraFile] = OrderedDict()

    def load(self, ref: str) -> LoraFile:
        path = resolve_local(ref)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        started = time.perf_counter()
        lora = read_lora(path)
        lora.fingerprint = f"{key[0]}:{key[1]}:{key[2]}"
        self._cache[key] = lora
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        logger.info(
            "LoRA %s: %s, rank %s, %d parameters, trigger words %s, read in %.2fs",
            ref,
            lora.layout,
            "/".join(map(str, lora.ranks)) or "-",
            len(lora.deltas),
            trigger_words(lora.metadata) or "none found",
            time.perf_counter() - started,
        )
        return lora
