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
CPU_CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32 rows: stays in L2 while the LoRA rows are added


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
        self._buffers: dict[torch.device, torch.Tensor] = {}

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
        """param = round(pristine + sum(strength * delta)), computed in fp32.

        A lone LoRA whose factors are exact in the weight's dtype is one GEMM (fp32
        accumulation, one rounding at the output). Anything else is summed in an fp32
        accumulator in row chunks, small on CPU so that they stay in cache.
        """
        param = self.params[name]
        if name not in self.pristine:
            self.pristine[name] = _host_copy(param)
        base = self.pristine[name]
        with torch.no_grad():
            if not entries:
                param.copy_(base, non_blocking=True)
                return
            if len(entries) == 1 and param.dim() == 2:
                delta, strength = entries[0]
                factors = delta.gemm_factors(param.dtype, param.device)
                if factors is not None:  # one GEMM: fp32 accumulation, one rounding
                    source = base.to(param.device, non_blocking=True)
                    torch.addmm(source, *factors, alpha=strength * delta.scale, out=param.data)
                    return
            adders = [(delta.row_adder(param.shape, param.device), strength) for delta, strength in entries]
            rows, target, source = param.shape[0], param.view(param.shape[0], -1), base.view(param.shape[0], -1)
            step = rows if param.device.type == "cuda" else max(1, CPU_CHUNK_ELEMENTS // target.shape[1])
            workspace = self._workspace(param.device, min(step, rows) * target.shape[1])
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                acc = workspace[: (stop - start) * target.shape[1]].view(stop - start, -1)
                acc.copy_(source[start:stop], non_blocking=True)
                for add, strength in adders:
                    add(acc, start, stop, strength)
                target[start:stop].copy_(acc)  # the one rounding to the model dtype

    def _workspace(self, device: torch.device, elements: int) -> torch.Tensor:
        """A reused fp32 buffer: allocating a fresh one per tensor costs more than the math."""
        buffer = self._buffers.get(device)
        if buffer is None or buffer.numel() < elements:
            buffer = self._buffers[device] = torch.empty(elements, dtype=torch.float32, device=device)
        return buffer


def _host_copy(param: torch.nn.Parameter) -> torch.Tensor:
    copy = param.detach().to("cpu", copy=True)
    return copy.pin_memory() if param.device.type == "cuda" else copy


def _same(a: list[tuple[Delta, float]] | None, b: list[tuple[Delta, float]] | None) -> bool:
    return [(id(d), s) for d, s in a or []] == [(id(d), s) for d, s in b or []]
