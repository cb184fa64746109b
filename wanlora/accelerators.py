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
- "unipc": the base model's own sampler (CausVid, which has no reference code sampling it so).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidInput
from .models import CATALOGUE, CATALOGUE_ROWS, TINY_KINDS, TINY_NAMES, Distilled, ModelSpec

TINY_FOLDER = "accelerators"  # `wanlora tiny-model` writes a random stand-in for each preset here
LIGHTNING_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # before the shift: LightX2V's [1000, 750, 500, 250] / 1000


@dataclass(frozen=True)
class Accelerator:
    name: str
    steps: int
    guidance: float
    shift: float | None  # None: its sampler does not shift (rCM's fixed times)
    sampler: str  # "euler" on `sigmas`, "rcm", or "unipc" (the base model's)
    sigmas: tuple[float, ...] = ()  # "euler": the distillation's sigmas before the shift
    step_counts: tuple[int, ...] = ()  # the step counts it samples; () for any
    reference: str = ""  # the code its schedule is held to

    def check_steps(self, steps: object) -> None:
        if self.step_counts and steps not in self.step_counts:
            counts = " or ".join(map(str, self.step_counts))
            raise InvalidInput("num_inference_steps", steps, f"{counts} with {self.name}: it samples fixed times")


def _lightning(name: str, reference: str) -> Accelerator:
    """A release of the lightx2v / Wan2.2-Lightning family: same schedule, its own files."""
    return Accelerator(name, 4, 1.0, 5.0, "euler", LIGHTNING_SIGMAS, (4,), reference)


LIGHTX2V_CONFIG = "ModelTC/LightX2V configs/distill/wan22/wan_moe_{}.json"
ACCELERATORS: dict[str, Accelerator] = {
    preset.name: preset
    for preset in (
        # Wan2.1: lightx2v's CFG and step distillation; Wan2.2 A14B: Wan2.2-Lightning Seko V1.1 (T2V) / V1 (I2V)
        _lightning("lightx2v-4step", "ModelTC/Wan2.2-Lightning wan/utils/fm_solvers_euler.py, wan/configs"),
        _lightning("lightning-250928", "ModelTC/Wan2.2-Lightning (250928 changed no code)"),
        _lightning("lightx2v-1217", LIGHTX2V_CONFIG.format("t2v_distill_lora")),
        _lightning("lightx2v-1022", LIGHTX2V_CONFIG.format("i2v_distill_with_lora")),
        _lightning("lightx2v-moe", LIGHTX2V_CONFIG.format("i2v_distill_with_lora")),
        _lightning("lightx2v-260412", LIGHTX2V_CONFIG.format("i2v_distill_with_lora")),
        Accelerator("rcm", 4, 1.0, None, "rcm", step_counts=(1, 2, 3, 4), reference="NVlabs/rcm rcm/inference/"),
        # Bidirectional CausVid distillation, sampled with UniPC like the base model: no reference does this.
        Accelerator("causvid", 8, 1.0, 5.0, "unipc", reference="none: a community recipe"),
    )
}


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
        why = "a tiny stand-in has a random one only in a folder: write it with `wanlora tiny-model DIR`, load DIR"
        raise InvalidInput("accelerator", name, why)
    if distilled is None:
        having = [spec.name for spec in CATALOGUE.values() if name in spec.accelerators]
        raise InvalidInput("accelerator", name, f"available for {', '.join(having)}, not {spec.name}")
    return preset, distilled


def accelerator_refs(spec: ModelSpec) -> set[str]:
    """Every preset's LoRA for `spec`: what a new preset replaces in the LoRA set."""
    return {ref for preset in ACCELERATORS.values() if (d := _distilled_for(preset, spec)) for ref in d.refs}


def schedule_words(preset: Accelerator, distilled: Distilled) -> str:
    if preset.sampler == "euler":
        sigmas = ", ".join(f"{s:g}" for s in preset.sigmas)
        return f"Euler on sigmas {sigmas}, shift {preset.shift:g}"
    if preset.sampler == "rcm":
        return f"rCM (stochastic), sigma_max {distilled.sigma_max:g}"
    return f"UniPC, shift {preset.shift:g}"


def accelerators_markdown() -> str:
    """Each variant's accelerators as a Markdown table: part of what `wanlora models` prints."""
    lines = [
        "| accelerator | variant | LoRA(s) | steps | guidance | sampling | strengths | schedule held to |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in CATALOGUE_ROWS:
        for name, distilled in spec.accelerators.items():
            preset = ACCELERATORS[name]
            files = f"`{distilled.lora}`" if distilled.lora else f"high: `{distilled.high}`<br>low: `{distilled.low}`"
            two = spec.boundary_ratio is not None
            strengths = "{:g} / {:g}".format(*distilled.strengths) if two else f"{distilled.strengths[0]:g}"
            reference = preset.reference + (f"; {distilled.note}" if distilled.note else "")
            steps = "/".join(map(str, preset.step_counts)) or f"{preset.steps}"
            lines.append(
                f"| `{name}` | `{spec.name}` | {files} | {steps} | {preset.guidance:g} | "
                f"{schedule_words(preset, distilled)} | {strengths} | {reference} |"
            )
    return "\n".join(lines) + "\n"
