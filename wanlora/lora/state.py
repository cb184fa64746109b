"""The LoRA state of one transformer: exact merges from its own pristine copies, and the set now active.

A pipeline holds one of these per transformer (Wan2.2's A14B models have two experts).
`apply_together` changes several of them as one step: every plan is fitted and
range-checked first, and a write that fails on one puts the others back too.

A transformer whose weights wait in host memory (the expert not on the GPU) is `deferred`:
its plan, already checked, is written when it next comes to the GPU (`flush`), where the
merge is fast, rather than by the CPU now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..weights.pristine import PristineSource
from .layouts import LoraFile
from .merge import LoraMerger, Plan
from .selection import LoraRequest, strength_at


@dataclass(frozen=True)
class Chosen:
    """A requested LoRA and the file it was read from."""

    request: LoraRequest
    lora: LoraFile


class TransformerLoras:
    def __init__(
        self, module: torch.nn.Module, checkpoint: PristineSource | None = None, compute: torch.device | None = None
    ) -> None:
        self.merger = LoraMerger(module, checkpoint, compute)
        self.active: list[Chosen] = []  # the set requested, and merged unless a plan is pending
        self.written: list[Chosen] = []  # the set the weights hold now
        self.pending: Plan | None = None
        self.deferred = False

    @property
    def scheduled(self) -> bool:
        """Whether a strength of the active set changes over the steps."""
        return any(isinstance(c.request.strength, tuple) for c in self.active)

    def strengths_at(self, step: int, steps: int) -> tuple[float, ...]:
        return tuple(strength_at(c.request.strength, step, steps) for c in self.active)

    def prepare(self, chosen: Sequence[Chosen], step: int = 0, steps: int = 1, warned: set[str] | None = None) -> Plan:
        """`chosen`'s plan at `step` of this transformer's `steps`; skipped parts are warned about for labels
        not in `warned`."""
        loras = [(c.lora, strength_at(c.request.strength, step, steps)) for c in chosen]
        return self.merger.prepare(loras, warned)

    def commit(self, chosen: Sequence[Chosen], plan: Plan) -> int:
        """Hold `chosen`, merged by `plan` now, or when the transformer is next on the GPU."""
        self.active = list(chosen)
        if self.deferred:
            self.pending = plan
            return 0
        rewritten = self.merger.write(plan)
        self.written, self.pending = list(chosen), None
        return rewritten

    def flush(self) -> None:
        """Write a pending plan; if that fails, the weights and the active set stay as they were."""
        if self.pending is None:
            return
        plan, self.pending = self.pending, None
        try:
            self.merger.write(plan)
        except BaseException:
            self.active = self.written
            raise
        self.written = self.active

    def merge_at(self, step: int, steps: int) -> None:
        """Re-merge the active set at its strengths for `step` of this transformer's `steps`."""
        warned = {c.lora.label for c in self.active}
        self.commit(self.active, self.prepare(self.active, step, steps, warned=warned))


def apply_together(changes: Sequence[tuple[TransformerLoras, list[Chosen]]]) -> int:
    """Make each state hold its chosen set (at phase 0), all or none; return tensors rewritten."""
    warned: set[str] = set()  # a LoRA on both experts is warned about once
    plans = [(state, chosen, state.prepare(chosen, warned=warned)) for state, chosen in changes]
    done: list[tuple[TransformerLoras, list[Chosen], list[Chosen], Plan, Plan | None]] = []
    rewritten = 0
    try:
        for state, chosen, plan in plans:
            done.append((state, state.active, state.written, state.merger.plan, state.pending))
            rewritten += state.commit(chosen, plan)
    except BaseException:
        for state, active, written, plan, pending in done:
            state.merger.write(plan)
            state.active, state.written, state.pending = active, written, pending
        raise
    return rewritten
