"""Which LoRAs a request asks for, at which strengths, on which experts. Pure Python: checked before any work.

Wan2.2's A14B models have two experts: "high" denoises the high-noise steps, "low" the
rest. A LoRA goes on both unless the request aims it at one:

    ("style.safetensors", 0.8)                          # both experts, 0.8
    ("style.safetensors", {"high": 0.8})                # the high-noise expert only
    ("lightning.safetensors", {"high": 3.0, "low": 1.0})  # each its own strength
    ("style.safetensors", [1.0, 0.5])                   # a schedule over equal phases of the steps
    ("style.safetensors", {"low": [1.0, 0.5]})          # a schedule over the low-noise expert's steps
    {"path": "style.safetensors", "scale": 0.8, "transformer": "high"}  # fal's form (`fal_loras`)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidInput
from ..pairs import EVERY_EXPERT, EXPERT_TARGETS
from ..settings import LORA_STRENGTH_RANGE
from .refs import display_ref

Strength = float | tuple[float, ...]


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA, its strength (a number, or a schedule over equal phases), and the expert(s) it is for."""

    ref: str
    strength: Strength = 1.0
    expert: str = EVERY_EXPERT
    builtin: bool = False  # chosen by wanlora (an accelerator preset), not by a user: may be a local file
    # The expert was chosen, not left to the file: an expert named ("high", "low"), a {"high", "low"} strength,
    # fal's `transformer`, or a preset's. Otherwise a file for both goes where its metadata or name says.
    explicit: bool = False

    @property
    def label(self) -> str:
        """The reference as it may be shown: in logs, errors and the video's tags."""
        return display_ref(self.ref)

    def describe(self) -> dict:
        """How the video's tags record it."""
        return {"ref": self.label, "strength": self.strength} | (
            {} if self.expert == EVERY_EXPERT else {"expert": self.expert}
        )


def check_strength_value(item: object, field: str, whose: str) -> float:
    """One strength (a number of a schedule, a sweep's value): finite and within LORA_STRENGTH_RANGE."""
    if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
        raise InvalidInput(field, item, f"a finite number ({whose})")
    low, high = LORA_STRENGTH_RANGE
    if not low <= item <= high:
        raise InvalidInput(field, item, f"a strength from {low:g} to {high:g} ({whose})")
    return float(item)


def _check_strength(ref: str, value: object) -> Strength:
    def number(item: object) -> float:
        return check_strength_value(item, "lora strength", f"for {display_ref(ref)}")

    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInput(
                "lora strength", value, f"a number or a non-empty list of numbers (for {display_ref(ref)})"
            )
        schedule = tuple(number(item) for item in value)
        return schedule if len(schedule) > 1 else schedule[0]
    return number(value)


def parse_requests(loras: Sequence) -> list[LoraRequest]:
    """Check references, strengths and experts: `ref`, `(ref, strength)` or `(ref, strength, expert)`.

    A strength may be a dict of experts, `{"high": s1, "low": s2}`, which makes one request each. A file
    for "both" on Wan2.2 A14B goes on one expert when its metadata or name says so (`lora.placement`);
    `LoraRequest(ref, strength, "both", explicit=True)` keeps it on both whatever it says.
    """
    if isinstance(loras, (str, bytes)) or not isinstance(loras, Sequence):
        raise InvalidInput("loras", type(loras).__name__, "a list of (reference, strength) pairs")
    requests = []
    for item in loras:
        if isinstance(item, LoraRequest):  # already checked
            requests.append(item)
            continue
        if isinstance(item, dict):
            requests.append(fal_lora(item))
            continue
        ref, strength, expert = _parts(item)
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput("lora", ref, "a LoRA reference (a path, URL or repo id)")
        if expert not in EXPERT_TARGETS:
            raise InvalidInput("lora expert", expert, f"one of {', '.join(EXPERT_TARGETS)} (for {display_ref(ref)})")
        if isinstance(strength, dict):
            if expert != EVERY_EXPERT or not strength or set(strength) - {"high", "low"}:
                raise InvalidInput(
                    "lora strength", strength, f'{{"high": s, "low": s}}, one or both (for {display_ref(ref)})'
                )
            for target, value in strength.items():
                requests.append(LoraRequest(ref.strip(), _check_strength(ref, value), target, explicit=True))
        else:
            aimed = expert != EVERY_EXPERT
            requests.append(LoraRequest(ref.strip(), _check_strength(ref, strength), expert, explicit=aimed))
    return requests


MAX_FAL_LORAS = 8  # wanlora's own bound on a `loras` list: fal's schema sets none
FAL_KEYS = ("path", "scale", "transformer", "weight_name")


def fal_lora(item: dict, field: str = "loras") -> LoraRequest:
    """One item of fal's Wan2.2 LoRA list, `{path, scale, transformer, weight_name}` (fal-js LoRAWeight).

    `transformer` is "high", "low" or "both"; left out, the file goes where its metadata or name
    says, else on both experts (fal's own default is "high": see docs/cog.md). `weight_name` picks a
    file in a Hugging Face repo given as `path`.
    """
    unknown = sorted(set(item) - set(FAL_KEYS))
    if unknown:
        keys = ", ".join(map(str, unknown))
        raise InvalidInput(f"{field} item", item, f"fal's keys {', '.join(FAL_KEYS)} only, not {keys}")
    ref, weight_name = item.get("path"), item.get("weight_name")
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInput(f"{field} path", type(ref).__name__, "a LoRA reference (a link or repo id) in every item")
    ref = ref.strip()
    if weight_name is not None:
        if not isinstance(weight_name, str) or not weight_name.strip().endswith(".safetensors"):
            raise InvalidInput(
                f"{field} weight_name", weight_name, f"a .safetensors file name (for {display_ref(ref)})"
            )
        if ref.count("/") != 1 or "://" in ref or ref.startswith((".", "/")):
            raise InvalidInput(
                f"{field} weight_name", weight_name, f"left out: {display_ref(ref)} is not a Hugging Face repo id"
            )
        ref = f"{ref}/{weight_name.strip()}"
    transformer = item.get("transformer")
    if transformer is not None and transformer not in EXPERT_TARGETS:
        raise InvalidInput(f"{field} transformer", transformer, f"high, low or both (for {display_ref(ref)})")
    strength = _check_strength(ref, item.get("scale", 1.0))
    return LoraRequest(ref, strength, transformer or EVERY_EXPERT, explicit=transformer is not None)


def fal_loras(value: object, field: str = "loras") -> list[LoraRequest]:
    """fal's `loras`: a JSON text (Cog's inputs are text) or a list, of at most MAX_FAL_LORAS items."""
    if isinstance(value, str):
        try:  # never echoed: a link in it may hold a token
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidInput(field, f"text not JSON ({exc.msg} at column {exc.colno})", _FAL_FORM) from None
        except (ValueError, RecursionError):  # past Python's parser: nested thousands deep, a number too long
            raise InvalidInput(field, "JSON nested too deeply or with a number too long", _FAL_FORM) from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InvalidInput(field, f"a JSON {type(value).__name__}", _FAL_FORM)
    if len(value) > MAX_FAL_LORAS:
        raise InvalidInput(field, f"{len(value)} items", f"at most {MAX_FAL_LORAS}")
    return [fal_lora(item, field) for item in value]


_FAL_FORM = 'a JSON list of {"path": ..., "scale": 1, "transformer": "high" | "low" | "both"}'


def _parts(item: object) -> tuple[object, object, object]:
    if isinstance(item, str):
        return item, 1.0, EVERY_EXPERT
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise InvalidInput("lora", item, "a reference, (reference, strength) or (reference, strength, expert)")
    return item[0], item[1], item[2] if len(item) == 3 else EVERY_EXPERT


def check_targets(requests: list[LoraRequest], names: tuple[str, ...], model: str) -> None:
    """Refuse a request aimed at an expert the model does not have."""
    for request in requests:
        if request.expert != EVERY_EXPERT and request.expert not in names:
            raise InvalidInput(
                "lora expert",
                request.expert,
                f"left out (or 'both') for {request.label}: {model} has one transformer, not Wan2.2 A14B's two experts",
            )


def strength_at(strength: Strength, step: int, steps: int) -> float:
    """The strength in effect at `step` of an expert's `steps`: a schedule of n values splits those steps into n
    equal phases, each schedule its own (two of different lengths stay aligned to the steps); a single number
    holds throughout."""
    if isinstance(strength, tuple):
        return strength[min(step * len(strength) // max(1, steps), len(strength) - 1)]
    return strength
