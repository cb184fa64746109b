"""The transformers of a pipeline, as LoRAs see them: one, or Wan2.2 A14B's two experts.

`transformer` denoises the steps whose timestep is at least `boundary_ratio` x 1000
(diffusers' rule), `transformer_2` the rest. Each has its own LoRA state, and a LoRA goes
on the experts its request names. A strength schedule spans the steps of its expert.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from .errors import InvalidInput
from .logs import NOTICE
from .lora.keys import MARKER_OF
from .lora.layouts import LoraFile
from .lora.placement import place
from .lora.selection import LoraRequest
from .lora.state import Chosen, TransformerLoras
from .pairs import EVERY_EXPERT
from .runtime.fastmode import restart_step_cache
from .weights.pristine import PristineSource

logger = logging.getLogger(__name__)

ATTRIBUTES = {"transformer": "transformer", "high": "transformer", "low": "transformer_2"}
WORDS = {"transformer": "the transformer", "high": "the high-noise expert", "low": "the low-noise expert"}


@dataclass
class Expert:
    name: str  # "transformer" (the only one), or "high" / "low" (Wan2.2 A14B)
    module: WanTransformer3DModel
    loras: TransformerLoras


def experts_of(
    diffusers_pipeline: Any,
    names: tuple[str, ...],
    checkpoints: dict[str, PristineSource] | None = None,
    compute: torch.device | None = None,
) -> list[Expert]:
    """The pipeline's transformers by expert name, each with its LoRA state (W0 from `checkpoints[name]`;
    `compute`: the GPU that merges weights held in host memory)."""
    checkpoints = checkpoints or {}
    return [
        Expert(name, module, TransformerLoras(module, checkpoints.get(name), compute))
        for name, module in ((name, getattr(diffusers_pipeline, ATTRIBUTES[name])) for name in names)
    ]


def assign(loaded: list[tuple[LoraRequest, list[tuple[str, LoraFile]]]], names: tuple[str, ...]) -> dict:
    """Which LoRA files each expert takes: {expert name: [Chosen]}.

    A file for "both" goes where its request aims; each file of a Wan2.2 pair goes to its
    own expert (and a request aimed at one expert takes only that one's file).
    """
    chosen: dict[str, list[Chosen]] = {name: [] for name in names}
    for request, files in loaded:
        placed = []
        for role, lora in files:
            if role != EVERY_EXPERT and role not in names:
                what = "a Wan2.2 high/low pair"
                if lora.expert is not None:
                    what += " in one file (ai-toolkit's transformer_1 and transformer_2 keys)"
                raise InvalidInput(
                    "lora", request.label, f"a single file here: it is {what}, and this model has one transformer"
                )
            aimed = names if request.expert == EVERY_EXPERT else (request.expert,)
            if role == EVERY_EXPERT and len(aimed) == 2 and not request.explicit:
                aimed = placed_by_file(request, lora, names)
            for name in aimed if role == EVERY_EXPERT else [role] if role in aimed else []:
                chosen[name].append(Chosen(request, lora))
                placed.append(f"{_part_name(lora)} on {WORDS[name]}")
        if len(files) > 1:  # a request aimed at one expert takes its file alone
            logger.log(NOTICE, "%s is a Wan2.2 pair: %s", request.label, ", ".join(placed))
    return chosen


def _part_name(lora: LoraFile) -> str:
    """A pair's file by its name; a combo file's half by the keys that hold it."""
    name = Path(lora.path).name
    return name if lora.expert is None else f"{name}'s {MARKER_OF[lora.expert]} keys"


def placed_by_file(request: LoraRequest, lora: LoraFile, names: tuple[str, ...]) -> tuple[str, ...]:
    """The experts a file given for both goes on: the one its metadata or name says, else both; one log line."""
    placement = place(lora.metadata, lora.path, lora.civitai_base_model, lora.expert)
    if placement.expert is None:
        logger.info("%s goes on both experts: %s", request.label, placement.why)
        return names
    logger.log(  # it changes the video: said without -v, as a pair's placement is
        NOTICE,
        "%s goes on the %s-noise expert only: %s (aim it at both to override)",
        request.label,
        placement.expert,
        placement.why,
    )
    return (placement.expert,)


def expert_steps(scheduler: Any, steps: int, boundary_ratio: float | None, names: tuple[str, ...]) -> dict[str, range]:
    """The denoising steps each expert takes, as diffusers' loop decides them."""
    if boundary_ratio is None:
        return {names[0]: range(steps)}
    scheduler.set_timesteps(steps)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in scheduler.timesteps if t >= boundary)
    return {"high": range(0, high), "low": range(high, steps)}


def schedule_callback(experts: list[Expert], ranges: dict[str, range]):
    """Re-merge each expert's scheduled strengths where they change, inside its own steps; None without
    schedules."""
    scheduled = [(e, ranges[e.name]) for e in experts if e.loras.scheduled]
    if not scheduled:
        return None
    for expert, steps in scheduled:
        expert.loras.merge_at(0, len(steps))

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        for expert, steps in scheduled:
            if step in steps and step + 1 in steps:
                here, after = step - steps.start, step + 1 - steps.start
                if expert.loras.strengths_at(after, len(steps)) != expert.loras.strengths_at(here, len(steps)):
                    expert.loras.merge_at(after, len(steps))
                    restart_step_cache(expert.module)
        return tensors

    return on_step_end


@contextmanager
def schedules_restarted_after(experts: list[Expert]) -> Iterator[None]:
    """Put each scheduled expert back at its schedules' first values after a run, whatever happens: outside
    `generate` a schedule's first value applies (what `save_merged` writes, what the next run starts from)."""
    try:
        yield
    finally:
        for expert in experts:
            if expert.loras.scheduled:
                expert.loras.merge_at(0, 1)
