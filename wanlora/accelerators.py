"""Step-distillation LoRAs ("accelerators"): a few steps without guidance instead of 50 with it.

A preset names the distillation LoRA for each base model and the sampling it was trained
for. It stacks with the user's style LoRAs, and fills in steps, guidance and shift unless
the caller set them. lightx2v's LoRAs were distilled on four fixed timesteps
(1000, 750, 500, 250, shifted by 5) with flow-matching Euler; wanlora samples exactly those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput
from .models import TINY_KINDS, TINY_NAMES, ModelSpec

KIJAI = "Kijai/WanVideo_comfy"
LIGHTNING = "lightx2v/Wan2.2-Lightning"  # a folder per model, each a high/low pair
TINY_FOLDER = "accelerators"  # `wanlora tiny-model` writes a random stand-in for each preset here


@dataclass(frozen=True)
class Accelerator:
    name: str
    loras: dict[str, str]  # base model name -> LoRA reference
    steps: int
    guidance: float
    shift: float
    strength: float = 1.0
    timesteps: tuple[int, ...] | None = None  # the distillation's own schedule, if fixed


ACCELERATORS: dict[str, Accelerator] = {
    # CFG and step distillation; the I2V LoRA was trained at 480p and serves 720p too. For
    # Wan2.2 A14B, Wan2.2-Lightning: a folder holding a LoRA per expert, at strength 1 each,
    # sampled on the same four timesteps (LightX2V's sigmas 1, 0.9375, 0.8333, 0.625).
    "lightx2v-4step": Accelerator(
        name="lightx2v-4step",
        loras={
            "t2v-14b": f"{KIJAI}/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
            "i2v-14b-480p": f"{KIJAI}/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
            "i2v-14b-720p": f"{KIJAI}/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
            "t2v-a14b": f"{LIGHTNING}/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1",
            "i2v-a14b": f"{LIGHTNING}/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1",
        },
        steps=4,
        guidance=1.0,
        shift=5.0,
        timesteps=(1000, 750, 500, 250),
    ),
    # Bidirectional CausVid distillation, sampled with UniPC like the base model.
    "causvid": Accelerator(
        name="causvid",
        loras={
            "t2v-14b": f"{KIJAI}/Wan21_CausVid_14B_T2V_lora_rank32.safetensors",
            "t2v-1.3b": f"{KIJAI}/Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors",
        },
        steps=8,
        guidance=1.0,
        shift=5.0,
    ),
}


def _lora_for(preset: Accelerator, spec: ModelSpec) -> str | None:
    """The preset's LoRA for `spec`: the catalogue's, or, in a tiny model folder, its own random one."""
    if spec.name in preset.loras:
        return preset.loras[spec.name]
    if spec.name not in TINY_NAMES:
        return None
    folder = Path(spec.source) / TINY_FOLDER
    found = [p for p in (folder / f"{preset.name}.safetensors", folder / preset.name) if p.exists()]
    return str(found[0]) if found else None


def accelerator_for(name: str, spec: ModelSpec) -> tuple[Accelerator, str]:
    """The preset `name` and its LoRA for the base model `spec`, or a clear error."""
    if name not in ACCELERATORS:
        raise InvalidInput("accelerator", name, f"one of {', '.join(ACCELERATORS)}")
    preset = ACCELERATORS[name]
    ref = _lora_for(preset, spec)
    if ref is None and spec.name in TINY_NAMES and TINY_NAMES[spec.name] in _tiny_kinds_for(preset):
        why = "a tiny stand-in has a random one only in a folder: write it with `wanlora tiny-model DIR`, load DIR"
        raise InvalidInput("accelerator", name, why)
    if ref is None:
        raise InvalidInput("accelerator", name, f"available for {', '.join(preset.loras)}, not {spec.name}")
    return preset, ref


def _tiny_kinds_for(preset: Accelerator) -> set[str]:
    """The tiny kinds whose `wanlora tiny-model` folder carries a stand-in for `preset`."""
    return {kind for kind, (like, _) in TINY_KINDS.items() if like in preset.loras}


def accelerator_refs(spec: ModelSpec) -> set[str]:
    """Every preset's LoRA for `spec`: what a new preset replaces in the LoRA set."""
    return {ref for preset in ACCELERATORS.values() if (ref := _lora_for(preset, spec)) is not None}
