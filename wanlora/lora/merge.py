"""Merging LoRA deltas into a module tree exactly, and swapping them without drift.

The weights always equal `W0 + sum(strength_i * delta_i)`, computed in float32 from a
pristine copy of `W0` and rounded once to the parameter's dtype. Nothing is ever
"unfused", so the result depends only on the base and the requested set, bitwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import LoraMismatch
from .formats import I2V_ONLY, Delta, LoraFile, _listing

logger = logging.getLogger(__name__)

Plan = dict[str, list[tuple[Delta, float]]]  # parameter name -> its deltas and strengths


@dataclass(frozen=True)
class Fit:
    """How one LoRA lands on one model: the deltas that apply and the I2V parts skipped."""

    deltas: dict[str, Delta]
    skipped: list[str]


def model_width(params: dict[str, torch.nn.Parameter]) -> int | None:
    weight = params.get("blocks.0.attn1.to_q.weight")
    return None if weight is None else weight.shape[0]


def fit_lora(lora: LoraFile, params: dict[str, torch.nn.Parameter]) -> Fit:
    """Check every delta of `lora` against the model's parameters.

    Image-to-video parts on a text-to-video model are skipped (the caller warns); any
    other missing target or wrong shape is a `LoraMismatch` that names the base model the
    LoRA was made for.
    """
    width = model_width(params)
    is_i2v_model = any(I2V_ONLY.search(name) for name in params)
    this_model = f"this model is {'image' if is_i2v_model else 'text'}-to-video with dim {width}"
    deltas, skipped, missing, misfit = {}, [], [], []
    for name, delta in lora.deltas.items():
        param = params.get(name)
        if param is None:
            (skipped if I2V_ONLY.search(name) and not is_i2v_model else missing).append(name)
        elif not delta.fits(param.shape):
            misfit.append(f"{name} {tuple(delta.dense_shape())} vs {tuple(param.shape)}")
        else:
            deltas[name] = delta
    if misfit:
        raise LoraMismatch(
            _listing(f"{lora.path} was made for {lora.base_model_hint()}; {this_model}. Shapes differ", misfit)
        )
    if missing:
        raise LoraMismatch(
            _listing(
                f"{lora.path} (made for {lora.base_model_hint()}) has deltas for parameters {this_model} does not have",
                missing,
            )
        )
    return Fit(deltas, skipped)


class LoraMerger:
    """Owns the LoRA state of one module tree: pristine copies and the current plan.

    Pristine copies of touched weights live in host memory (pinned for CUDA), so GPU
    memory does not double; only touched tensors are ever rewritten.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.params = dict(module.named_parameters())
        self.pristine: dict[str, torch.Tensor] = {}
        self.plan: Plan = {}

    def check(self, loras: Sequence[tuple[LoraFile, float]]) -> list[Fit]:
        """Fit every LoRA without changing anything; raises on the first that does not fit."""
        return [fit_lora(lora, self.params) for lora, _ in loras]

    def apply(self, loras: Sequence[tuple[LoraFile, float]]) -> int:
        """Make the weights equal to base + the weighted sum of `loras`; return tensors rewritten.

        All LoRAs are checked first. If writing is interrupted (an error, a cancellation),
        the weights written so far are put back to the previous set before re-raising.
        """
        fits = self.check(loras)
        for (lora, _), fit in zip(loras, fits, strict=True):
            if fit.skipped:
                logger.warning(
                    "%s: skipping its image-to-video parts on this text-to-video model: %s",
                    lora.path,
                    _listing("", fit.skipped).lstrip(": "),
                )
        plan: Plan = {}
        for (_, strength), fit in zip(loras, fits, strict=True):
            if strength == 0:
                continue
            for name, delta in fit.deltas.items():
                plan.setdefault(name, []).append((delta, float(strength)))
        changed = [
            name for name in sorted(set(plan) | set(self.plan)) if not _same(plan.get(name), self.plan.get(name))
        ]
        if not changed:
            return 0
        started = time.perf_counter()
        written: list[str] = []
        try:
            for name in changed:
                self._write(name, plan.get(name, []))
                written.append(name)
        except BaseException:
            for name in written:
                self._write(name, self.plan.get(name, []))
            raise
        self.plan = plan
        logger.debug("rewrote %d tensors in %.3fs", len(changed), time.perf_counter() - started)
        return len(changed)

    def _write(self, name: str, entries: list[tuple[Delta, float]]) -> None:
        param = self.params[name]
        if name not in self.pristine:
            self.pristine[name] = _host_copy(param)
        base = self.pristine[name]
        with torch.no_grad():
            if not entries:
                param.copy_(base, non_blocking=True)
                return
            acc = base.to(device=param.device, dtype=torch.float32, copy=True, non_blocking=True)
            for delta, strength in entries:
                delta.add_to(acc, strength)
            param.copy_(acc)  # the one rounding to the model dtype


def _host_copy(param: torch.nn.Parameter) -> torch.Tensor:
    copy = param.detach().to("cpu", copy=True)
    return copy.pin_memory() if param.device.type == "cuda" else copy


def _same(a: list[tuple[Delta, float]] | None, b: list[tuple[Delta, float]] | None) -> bool:
    return [(id(d), s) for d, s in a or []] == [(id(d), s) for d, s in b or []]
