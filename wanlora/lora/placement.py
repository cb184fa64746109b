"""Which Wan2.2 A14B expert a LoRA file is for, by what the file says: its metadata, then its name. Pure Python.

Trainers record it in different places (docs/loras.md, "Experts"):
- musubi-tuner writes `modelspec.timestep_range` ("875,1000": the high-noise expert's steps) when the
  LoRA was trained on part of the timesteps, and `ss_base_model_version` "wan" for every Wan model;
- ai-toolkit writes `ss_base_model_version` ("wan_2.1", "wan_2.2_14b", "wan_2.2_5b") and puts the
  expert in the file name (`NAME_high_noise.safetensors`, `NAME_low_noise.safetensors`), or, in one
  "combo" file for both experts, in its keys (`diffusion_model.transformer_1.`: keys.EXPERT_MARKERS);
  a combo file with both halves is a pair (lora.loader), one with a single half says its expert here;
- lightx2v names its files `high_noise_model` / `low_noise_model`, Kijai `..._HIGH_...` / `..._LOW_...`.
A file that says nothing goes where its request aims; a request that names an expert always wins.

The base model a file's metadata (ai-toolkit's `ss_base_model_version`) or its Civitai version
(`baseModel`, from Civitai's API: lora.fetch) names is checked against the model before any merge:
a LoRA named for a model of another width is refused, naming what said so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraMismatch
from ..models import CATALOGUE_ROWS, ModelSpec
from ..pairs import expert_of
from .keys import MARKER_OF

TIMESTEP_RANGE = "modelspec.timestep_range"  # musubi-tuner (sai_model_spec.py): "min,max" of 0..1000
BASE_MODEL_VERSION = "ss_base_model_version"
# ai-toolkit's values (toolkit/models/wan21, extensions_built_in/diffusion_models/wan22); musubi's "wan" says nothing
BASE_MODELS = {"wan_2.1": "Wan2.1", "wan_2.2_14b": "Wan2.2 A14B", "wan_2.2_5b": "Wan2.2 TI2V-5B"}
# Civitai's Wan base models (civitai/civitai src/shared/constants/base-model.constants.ts): the family each is
CIVITAI_BASE_MODELS = {
    "Wan Video 1.3B t2v": "Wan2.1 1.3B",
    "Wan Video 14B t2v": "Wan2.1 14B",
    "Wan Video 14B i2v 480p": "Wan2.1 14B",
    "Wan Video 14B i2v 720p": "Wan2.1 14B",
    "Wan Video 2.2 TI2V-5B": "Wan2.2 TI2V-5B",
    "Wan Video 2.2 I2V-A14B": "Wan2.2 A14B",
    "Wan Video 2.2 T2V-A14B": "Wan2.2 A14B",
}
FAMILY_WIDTHS = {spec.family: spec.arch.dim for spec in CATALOGUE_ROWS}  # "Wan2.1" alone is 1.3B or 14B: none


@dataclass(frozen=True)
class Placement:
    """The expert a file says it is for ("high", "low", or None: it does not say), what said so, and the base
    model its metadata names."""

    expert: str | None
    why: str
    base_model: str | None = None
    base_said: str = ""  # what named the base model


def timestep_range(metadata: dict[str, str]) -> tuple[float, float] | None:
    """musubi-tuner's `modelspec.timestep_range` as (min, max), or None when absent or unreadable."""
    parts = re.split(r"\s*,\s*", metadata.get(TIMESTEP_RANGE, "").strip())
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        return None
    return (low, high) if 0 <= low < high <= 1000 else None


def base_model(metadata: dict[str, str], civitai: str | None = None) -> tuple[str | None, str]:
    """The base model family a file's metadata, else its Civitai page, names, and what named it."""
    version = metadata.get(BASE_MODEL_VERSION, "").strip()
    if version in BASE_MODELS:
        return BASE_MODELS[version], f"its {BASE_MODEL_VERSION} {version} (ai-toolkit)"
    if civitai in CIVITAI_BASE_MODELS:
        return CIVITAI_BASE_MODELS[civitai], f"its Civitai base model {civitai!r}"
    return None, ""


def place(
    metadata: dict[str, str], path: str | Path, civitai: str | None = None, keyed: str | None = None
) -> Placement:
    """Where a file's keys, then its metadata, then its name, put it (`civitai`: its Civitai version's base
    model; `keyed`: the expert its keys name, LoraFile.expert)."""
    base, base_said = base_model(metadata, civitai)
    if keyed is not None:
        why = f"its keys name ai-toolkit's {MARKER_OF[keyed]}, the {keyed}-noise expert"
        return Placement(keyed, why, base, base_said)
    found = timestep_range(metadata)
    if found is not None:
        low, high = found
        said = f"its {TIMESTEP_RANGE} {low:g},{high:g} (musubi-tuner)"
        if low > 0 and high >= 1000:
            return Placement("high", f"{said} is the high-noise end of the steps", base, base_said)
        if low <= 0 and high < 1000:
            return Placement("low", f"{said} is the low-noise end of the steps", base, base_said)
    named = expert_of(path)
    if named is not None:
        return Placement(named, f"its file name {Path(path).name} says {named}-noise", base, base_said)
    return Placement(None, "neither its metadata nor its name says which expert", base, base_said)


def refuse_other_base(placement: Placement, spec: ModelSpec, label: str) -> None:
    """A LoRA whose metadata or Civitai page names a model of another width than `spec`'s family is refused."""
    width, own = FAMILY_WIDTHS.get(placement.base_model or ""), FAMILY_WIDTHS.get(spec.family)
    if width is None or own is None or width == own:
        return
    message = f"{label} is for {placement.base_model}, as {placement.base_said} says; {spec.name} is {spec.family}"
    raise LoraMismatch(message, label, widths=(width,))
