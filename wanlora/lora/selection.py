"""Which LoRAs a request asks for, at which strengths. Pure Python: checked before any work."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidInput
from .refs import display_ref

Strength = float | tuple[float, ...]


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA and its strength: a number, or a schedule of numbers over equal phases of the steps."""

    ref: str
    strength: Strength = 1.0
    builtin: bool = False  # chosen by wanlora (an accelerator preset), not by a user: may be a local file

    @property
    def label(self) -> str:
        """The reference as it may be shown: in logs, errors and the video's tags."""
        return display_ref(self.ref)


def _check_strength(ref: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput("lora strength", value, f"a finite number (for {display_ref(ref)})")
    return float(value)


def parse_requests(loras: Sequence[str | tuple[str, float | Sequence[float]]]) -> list[LoraRequest]:
    """Check references and strengths; a list strength becomes a schedule."""
    if isinstance(loras, (str, bytes)) or not isinstance(loras, Sequence):
        raise InvalidInput("loras", type(loras).__name__, "a list of (reference, strength) pairs")
    requests = []
    for item in loras:
        if isinstance(item, LoraRequest):  # already checked
            requests.append(item)
            continue
        ref, strength = (item, 1.0) if isinstance(item, str) else _pair(item)
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput("lora", ref, "a LoRA reference (a path, URL or repo id)")
        if isinstance(strength, (list, tuple)):
            if not strength:
                raise InvalidInput(
                    "lora strength", strength, f"a number or a non-empty list of numbers (for {display_ref(ref)})"
                )
            schedule = tuple(_check_strength(ref, s) for s in strength)
            requests.append(LoraRequest(ref.strip(), schedule if len(schedule) > 1 else schedule[0]))
        else:
            requests.append(LoraRequest(ref.strip(), _check_strength(ref, strength)))
    return requests


def _pair(item: object) -> tuple[object, object]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise InvalidInput("lora", item, "a reference, or a (reference, strength) pair")
    return item[0], item[1]


def strength_at(strength: Strength, phase: int) -> float:
    """The strength in effect in `phase`; a single number holds in every phase.

    A shorter schedule than the longest one keeps its last value.
    """
    if isinstance(strength, tuple):
        return strength[min(phase, len(strength) - 1)]
    return strength


def phase_count(requests: Sequence[LoraRequest]) -> int:
    """How many phases the longest schedule splits the steps into (1: no schedule)."""
    return max((len(r.strength) for r in requests if isinstance(r.strength, tuple)), default=1)
