"""Step-distillation LoRAs ("accelerators"): a few steps without guidance instead of 50 with it.

A preset names the distillation LoRA for each base model and the sampling it was trained
for. It stacks with the user's style LoRAs, and fills in steps, guidance and shift unless
the caller set them. lightx2v's LoRAs were distilled on four fixed timesteps
(1000, 750, 500, 250, shifted by 5) with flow-matching Euler; wanlora samples exactly those.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import InvalidInput

KIJAI = "Kijai/WanVideo_comfy"


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
    # CFG and step distillation; the I2V LoRA was trained at 480p and serves 720p too.
    "lightx2v-4step": Accelerator(
        name="lightx2v-4step",
        loras={
            "t2v-14b": f"{KIJAI}/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors",
            "i2v-14b-480p": f"{KIJAI}/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
            "i2v-14b-720p": f"{KIJAI}/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
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


def accelerator_for(name: str, model: str) -> tuple[Accelerator, str]:
    """The preset `name` and its LoRA for base model `model`, or a clear error."""
    if name not in ACCELERATORS:
        raise InvalidInput("accelerator", name, f"one of {', '.join(ACCELERATORS)}")
    preset = ACCELERATORS[name]
    if model not in preset.loras:
        raise InvalidInput("accelerator", name, f"available for {', '.join(preset.loras)}, not {model}")
    return preset, preset.loras[model]


def accelerator_refs() -> set[str]:
    return {ref for preset in ACCELERATORS.values() for ref in preset.loras.values()}


def fixed_timestep_scheduler(preset: Accelerator):
    """Flow-matching Euler on the preset's timesteps, whatever step count the pipeline asks for."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=preset.shift)
    sigmas = [t / 1000 for t in preset.timesteps]
    scheduler.set_timesteps = functools.partial(scheduler.set_timesteps, sigmas=sigmas)
    return scheduler
