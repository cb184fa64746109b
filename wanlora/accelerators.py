"""Step-distillation LoRAs ("accelerators"): a few steps without guidance instead of 40 or 50 with it.

A preset is the sampling a distillation was trained for, held to its own reference code in
tests/test_reference.py; each catalogue row names the preset's LoRA(s) for that variant and
what its recipe sets there (`models.Distilled`: strengths per expert, rCM's first sigma). A
preset stacks with the user's style LoRAs, and fills in steps, guidance and shift unless the
caller set them.

Three samplers:
- "euler": flow-matching Euler on fixed sigmas, shifted. lightx2v's and Wan2.2-Lightning's
  releases were all distilled on sigmas 1, 0.75, 0.5, 0.25 at shift 5 (LightX2V's
  `denoising_step_list` [1000, 750, 500, 250]; Lightning's `EulerScheduler`).
- "rcm": NVlabs' rCM: four fixed TrigFlow times, no shift, a stochastic step (fresh noise),
  the first latent scaled by its first sigma, timesteps given to the model in bf16.
- "unipc": the base model's own sampler (CausVid on 14B, which has no reference code sampling it so).
A row may put its own recipe in place of the preset's sampler: CausVid on 1.3B samples Wan2GP's
fixed timesteps with Euler (`Distilled.timesteps`), as Wan2GP's profile for that file does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .errors import InvalidInput
from .models import ACCELERATORS, CATALOGUE, TINY_KINDS, TINY_NAMES, Accelerator, Distilled, ModelSpec

__all__ = ["ACCELERATORS", "Accelerator", "accelerator_for", "accelerator_refs"]

# The presets themselves (`Accelerator`, `ACCELERATORS`) are catalogue data, in wanlora/models.py.
TINY_FOLDER = "accelerators"  # `wanlora tiny-model` writes a random stand-in for each preset here


def _distilled_for(preset: Accelerator, spec: ModelSpec) -> Distilled | None:
    """The preset's LoRA(s) for `spec`: its catalogue row's, or, in a tiny model folder, its own random one
    (a file, or a high/low pair folder) with the real row's strengths and sigma."""
    if spec.name not in TINY_NAMES:
        return spec.accelerators.get(preset.name)
    real = CATALOGUE[TINY_KINDS[TINY_NAMES[spec.name]]].accelerators.get(preset.name)
    folder = Path(spec.source) / TINY_FOLDER
    found = [p for p in (folder / f"{preset.name}.safetensors", folder / preset.name) if p.exists()]
    if not found or real is None:
        return None
    return replace(real, lora=str(found[0]), high=None, low=None)


def accelerator_for(name: str, spec: ModelSpec) -> tuple[Accelerator, Distilled]:
    """The preset `name` and its LoRA(s) for the base model `spec`, or a clear error."""
    if not isinstance(name, str) or name not in ACCELERATORS:
        raise InvalidInput("accelerator", name, f"one of {', '.join(ACCELERATORS)}")
    preset = ACCELERATORS[name]
    distilled = _distilled_for(preset, spec)
    stands_in_for = CATALOGUE[TINY_KINDS[TINY_NAMES[spec.name]]] if spec.name in TINY_NAMES else None
    if distilled is None and stands_in_for is not None and name in stands_in_for.accelerators:
        kind = TINY_NAMES[spec.name]
        why = (
            f"a tiny stand-in has a random one only in a folder: write it with `wanlora tiny-model DIR --kind {kind}`, "
            "then use --model DIR"
        )
        raise InvalidInput("accelerator", name, why)
    if distilled is None:
        having = [spec.name for spec in CATALOGUE.values() if name in spec.accelerators]
        raise InvalidInput("accelerator", name, f"available for {', '.join(having)}, not {spec.name}")
    return preset, distilled


def accelerator_refs(spec: ModelSpec) -> set[str]:
    """Every preset's LoRA for `spec`: what a new preset replaces in the LoRA set."""
    return {ref for preset in ACCELERATORS.values() if (d := _distilled_for(preset, spec)) for ref in d.refs}
