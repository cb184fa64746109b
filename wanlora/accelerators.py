"""Step-distillation LoRAs ("accelerators"): a few steps without guidance instead of 50 with it.

A preset is the sampling a distillation was trained for; each catalogue row names its own
LoRA for the presets it has (`ModelSpec.accelerators`). A preset stacks with the user's
style LoRAs, and fills in steps, guidance and shift unless the caller set them. lightx2v's
LoRAs were distilled on four fixed timesteps (1000, 750, 500, 250, shifted by 5) with
flow-matching Euler; wanlora samples exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput
from .models import CATALOGUE, TINY_KINDS, TINY_NAMES, ModelSpec

TINY_FOLDER = "accelerators"  # `wanlora tiny-model` writes a random stand-in for each preset here


@dataclass(frozen=True)
class Accelerator:
    name: str
    steps: int
    guidance: float
    shift: float
    strength: float = 1.0
    timesteps: tuple[int, ...] | None = None  # the distillation's own schedule, if fixed


ACCELERATORS: dict[str, Accelerator] = {
    # CFG and step distillation (lightx2v; Wan2.2-Lightning for A14B, a LoRA per expert at strength 1
    # each), sampled on the four timesteps (LightX2V's sigmas 1, 0.9375, 0.8333, 0.625 once shifted).
    "lightx2v-4step": Accelerator(
        name="lightx2v-4step", steps=4, guidance=1.0, shift=5.0, timesteps=(1000, 750, 500, 250)
    ),
    # Bidirectional CausVid distillation, sampled with UniPC like the base model.
    "causvid": Accelerator("causvid", steps=8, guidance=1.0, shift=5.0),
}


def _lora_for(preset: Accelerator, spec: ModelSpec) -> str | None:
    """The preset's LoRA for `spec`: its catalogue row's, or, in a tiny model folder, its own random one."""
    if spec.name not in TINY_NAMES:
        return spec.accelerators.get(preset.name)
    folder = Path(spec.source) / TINY_FOLDER
    found = [p for p in (folder / f"{preset.name}.safetensors", folder / preset.name) if p.exists()]
    return str(found[0]) if found else None


def accelerator_for(name: str, spec: ModelSpec) -> tuple[Accelerator, str]:
    """The preset `name` and its LoRA for the base model `spec`, or a clear error."""
    if not isinstance(name, str) or name not in ACCELERATORS:
        raise InvalidInput("accelerator", name, f"one of {', '.join(ACCELERATORS)}")
    preset = ACCELERATORS[name]
    ref = _lora_for(preset, spec)
    stands_in_for = CATALOGUE[TINY_KINDS[TINY_NAMES[spec.name]]] if spec.name in TINY_NAMES else None
    if ref is None and stands_in_for is not None and name in stands_in_for.accelerators:
        kind = TINY_NAMES[spec.name]
        why = (
            f"a tiny stand-in has a random one only in a folder: write it with `wanlora tiny-model DIR --kind {kind}`, "
            "then use --model DIR"
        )
        raise InvalidInput("accelerator", name, why)
    if ref is None:
        having = [spec.name for spec in CATALOGUE.values() if name in spec.accelerators]
        raise InvalidInput("accelerator", name, f"available for {', '.join(having)}, not {spec.name}")
    return preset, ref


def accelerator_refs(spec: ModelSpec) -> set[str]:
    """Every preset's LoRA for `spec`: what a new preset replaces in the LoRA set."""
    return {ref for preset in ACCELERATORS.values() if (ref := _lora_for(preset, spec)) is not None}
