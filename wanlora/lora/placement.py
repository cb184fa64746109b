"""Which Wan2.2 A14B expert a LoRA file is for, by what the file says: its metadata, then its name. Pure Python.

Trainers record it in different places (docs/loras.md, "Experts"):
- musubi-tuner writes `modelspec.timestep_range` ("875,1000": the high-noise expert's steps) when the
  LoRA was trained on part of the timesteps, and `ss_base_model_version` "wan" for every Wan model;
- ai-toolkit writes `ss_base_model_version` ("wan_2.1", "wan_2.2_14b", "wan_2.2_5b") and puts the
  expert only in the file name (`NAME_high_noise.safetensors`, `NAME_low_noise.safetensors`);
- lightx2v names its files `high_noise_model` / `low_noise_model`, Kijai `..._HIGH_...` / `..._LOW_...`.
A file that says nothing goes where its request aims; a request that names an expert always wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..pairs import expert_of

TIMESTEP_RANGE = "modelspec.timestep_range"  # musubi-tuner (sai_model_spec.py): "min,max" of 0..1000
BASE_MODEL_VERSION = "ss_base_model_version"
# ai-toolkit's values (toolkit/models/wan21, extensions_built_in/diffusion_models/wan22); musubi's "wan" says nothing
BASE_MODELS = {"wan_2.1": "Wan2.1", "wan_2.2_14b": "Wan2.2 A14B", "wan_2.2_5b": "Wan2.2 TI2V-5B"}


@dataclass(frozen=True)
class Placement:
    """The expert a file says it is for ("high", "low", or None: it does not say), what said so, and the base
    model its metadata names."""

    expert: str | None
    why: str
    base_model: str | None = None


def timestep_range(metadata: dict[str, str]) -> tuple[float, float] | None:
    """musubi-tuner's `modelspec.timestep_range` as (min, max), or None when absent or unreadable."""
    parts = re.split(r"\s*,\s*", metadata.get(TIMESTEP_RANGE, "").strip())
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        return None
    return (low, high) if 0 <= low < high <= 1000 else None


def place(metadata: dict[str, str], path: str | Path) -> Placement:
    """Where a file's own metadata, then its name, put it."""
    version = metadata.get(BASE_MODEL_VERSION, "").strip()
    base = BASE_MODELS.get(version)
    found = timestep_range(metadata)
    if found is not None:
        low, high = found
        said = f"its {TIMESTEP_RANGE} {low:g},{high:g} (musubi-tuner)"
        if low > 0 and high >= 1000:
            return Placement("high", f"{said} is the high-noise end of the steps", base)
        if low <= 0 and high < 1000:
            return Placement("low", f"{said} is the low-noise end of the steps", base)
    named = expert_of(path)
    if named is not None:
        return Placement(named, f"its file name {Path(path).name} says {named}-noise", base)
    return Placement(None, "neither its metadata nor its name says which expert", base)
