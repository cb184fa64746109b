"""The LoRA state of one transformer: exact merges from its own pristine copies, and the set now active.

A pipeline holds one of these per transformer (Wan2.2's A14B models have two experts).
`apply_together` changes several of them as one step: every plan is fitted and
range-checked first, and a write that fails on one puts the others back too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .formats import LoraFile
from .merge import LoraMerger, Plan
from .selection import LoraRequest, phase_count, strength_at


@dataclass(frozen=True)
class Chosen:
    """A requested LoRA and the file it was read from."""

    request: LoraRequest
    lora: LoraFile


class TransformerLoras:
    def __init__(self, module: torch.nn.Module) -> None:
        self.merger = LoraMerger(module)
        self.active: list[Chosen] = []

    @property
    def phases(self) -> int:
        return phase_count([c.request for c in self.active])

    def prepare(self, chosen: Sequence[Chosen], phase: int = 0) -> Plan:
        return self.merger.prepare([(c.lora, strength_at(c.request.strength, phase)) for c in chosen])

    def merge_phase(self, phase: int) -> None:
        """Re-merge the active set at the strengths of schedule phase `phase`."""
        self.merger.write(self.prepare(self.active, phase))


def apply_together(changes: Sequence[tuple[TransformerLoras, list[Chosen]]]) -> int:
    """Make each state hold its chosen set (at phase 0), all or none; return tensors rewritten."""
    plans = [(state, chosen, state.prepare(chosen)) for state, chosen in changes]
    done: list[tuple[TransformerLoras, list[Chosen], Plan]] = []
    rewritten = 0
    try:
        for state, chosen, plan in plans:
            done.append((state, state.active, state.merger.plan))
            rewritten += state.merger.write(plan)
            state.active = list(chosen)
    except BaseException:
        for state, active, plan in done:
            state.merger.write(plan)
            state.active = active
        raise
    return rewritten
