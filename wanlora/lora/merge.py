"""Merging LoRA deltas into a module tree exactly, and swapping them without drift.

The weights always equal `W0 + sum(strength_i * delta_i)`, computed in float32 from a
pristine `W0` (wanlora.weights.pristine) and handed to the weight's format for its final rounding
(wanlora.weights.formats: full precision rounds once to the parameter's dtype; a quantized format
encodes the sum once, its scales computed from it). Nothing is ever subtracted back out, so the
result depends only on the base and the requested set, bitwise. A format may instead apply the
terms its own way (`apply_terms`: beside the matmul, or into a finer copy), its stored tensors
untouched and read as W0 in place.

All or nothing: every LoRA is fitted, and every new weight is proven finite and within
its dtype's range, before the first write. If a write still fails (a cancellation, an
error on the device), every tensor touched so far, the failing one included, is put back
to the previous set.

Where the math runs: on the GPU for a weight there; for a weight in host memory, on the GPU
too when the pipeline has one with room for that layer's work (the rows in fp32, a few
times over), else on the CPU, one weight per core (lora/spread.py: robust to busy cores).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import LoraFormatError, LoraMismatch, WeightsPartlyMerged
from ..messages import listing
from ..models import transformer_kind
from ..weights import formats
from ..weights.formats.base import Stored
from ..weights.pristine import HostCopy, InPlace, Pristine, PristineSource
from ..weights.spread import run_spread, single_threaded_ops
from .deltas import Delta
from .keys import I2V_ONLY
from .layouts import LoraFile

logger = logging.getLogger(__name__)

CPU_CHUNK_ELEMENTS = 1 << 21  # 8 MiB of fp32 rows: big enough for an efficient GEMM, small enough for L3 (measured)
GPU_WORK_COPIES = 3  # a layer merged on the GPU needs its rows in fp32 this many times over (the sum, temporaries)
FP32_MAX = torch.finfo(torch.float32).max


class Term(NamedTuple):
    """One LoRA's share of one parameter: its delta, its strength, and whose it is."""

    delta: Delta
    strength: float
    label: str


Plan = dict[str, list[Term]]  # parameter name -> its terms


@dataclass(frozen=True)
class Fit:
    """How one LoRA lands on one model: the deltas that apply, the image-branch parts skipped and why,
    and what does not fit (parameters the model lacks, shapes that differ)."""

    deltas: dict[str, Delta]
    skipped: list[str]
    why_skipped: str
    missing: list[str]
    misfit: list[str]
    made_for: str  # the LoRA's base model, as far as its shapes tell
    this_model: str  # this model's kind and width

    @property
    def fits(self) -> bool:
        return not self.missing and not self.misfit

    @property
    def verdict(self) -> str:
        """One short line: whether it fits, and if not, what it was made for."""
        if self.fits:
            return "fits"
        return f"does not fit: made for {self.made_for}; {self.this_model}"

    def mismatch(self, lora: LoraFile) -> LoraMismatch:
        """The error for a LoRA that does not fit, naming the parameters that differ."""
        if self.misfit:
            message = listing(
                f"{lora.label} was made for {self.made_for}; {self.this_model}. Shapes differ", self.misfit
            )
        else:
            message = listing(
                f"{lora.label} (made for {self.made_for}) has deltas for parameters {self.this_model} lacks",
                self.missing,
            )
        return LoraMismatch(message, lora.label, widths=tuple(sorted(lora.inner_dims())))


def model_width(params: dict[str, torch.nn.Parameter]) -> int | None:
    weight = params.get("blocks.0.attn1.to_q.weight")
    return None if weight is None else weight.shape[0]


def in_channels(params: dict[str, torch.nn.Parameter]) -> int | None:
    patch = params.get("patch_embedding.weight")
    return None if patch is None else patch.shape[1]


def model_kind(params: dict[str, torch.nn.Parameter]) -> str:
    """What kind of Wan transformer these parameters are, as far as LoRAs care (the catalogue names it)."""
    return transformer_kind(model_width(params), in_channels(params), any(I2V_ONLY.search(name) for name in params))


def check_fit(lora: LoraFile, params: dict[str, torch.nn.Parameter]) -> Fit:
    """How every delta of `lora` meets the model's parameters; nothing raises.

    Image-branch parts (Wan2.1 I2V's `add_k_proj`, `image_embedder`, ...) on a model without
    that branch are skipped, with the reason (the caller warns); any other missing target or
    wrong shape makes the LoRA not fit.
    """
    kind = model_kind(params)
    deltas: dict[str, Delta] = {}
    skipped, missing, misfit = list[str](), list[str](), list[str]()
    for name, delta in lora.deltas.items():
        param = params.get(name)
        if param is None:
            (skipped if I2V_ONLY.search(name) else missing).append(name)
        elif not delta.fits(param.shape):
            misfit.append(f"{name} {tuple(delta.dense_shape())} vs {tuple(param.shape)}")
        else:
            deltas[name] = delta
    takes_image_latents = in_channels(params) not in (None, 16, 48)  # Wan2.2 I2V: image latents beside the noise
    why = (
        f"{kind} takes the image through its latents and has no image branch"
        if takes_image_latents
        else f"this {kind} model has no image branch"
    )
    this_model = f"this model ({kind}) has dim {model_width(params)}"
    return Fit(deltas, skipped, why if skipped else "", missing, misfit, lora.base_model_hint(), this_model)


def fit_lora(lora: LoraFile, params: dict[str, torch.nn.Parameter]) -> Fit:
    """`check_fit`, raising a `LoraMismatch` that names the base model when the LoRA does not fit."""
    fit = check_fit(lora, params)
    if not fit.fits:
        raise fit.mismatch(lora)
    return fit


class LoraMerger:
    """Owns the LoRA state of one module tree: the pristine W0 of touched weights and the current plan.

    W0 is read from the checkpoint file where `checkpoint` gives it back exactly, else copied
    to host memory (pinned for CUDA) on first touch, so GPU memory does not double; only
    touched tensors are ever rewritten. `compute`: a GPU to merge host-memory weights on.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        checkpoint: PristineSource | None = None,
        compute: torch.device | None = None,
    ) -> None:
        self.stored = stored_weights(module)
        self.params = dict(module.named_parameters())  # what LoRAs are fitted to: every weight at W's own shape
        for name, stored in self.stored.items():
            if name not in self.params or tuple(self.params[name].shape) != stored.shape:
                self.params[name] = torch.nn.Parameter(torch.empty(stored.shape, device="meta"), requires_grad=False)
        self.checkpoint = checkpoint
        self.compute = compute if compute is not None and compute.type == "cuda" else None
        self.pristine: dict[str, Pristine] = {}
        self.plan: Plan = {}
        self.damaged: WeightsPartlyMerged | None = None  # set when a write could not be undone: nothing runs on it
        self._local = threading.local()  # each thread's workspaces
        self._lock = threading.Lock()

    def check(self, loras: Sequence[tuple[LoraFile, float]]) -> list[Fit]:
        """Fit every LoRA without changing anything; raises on the first that does not fit."""
        return [fit_lora(lora, self.params) for lora, _ in loras]

    def prepare(self, loras: Sequence[tuple[LoraFile, float]], warned: set[str] | None = None) -> Plan:
        """The plan for `loras`, fitted and range-checked; nothing is written.

        Skipped image-branch parts are warned about once per LoRA label not in `warned`
        (which collects them), so that two experts taking one LoRA warn once.
        """
        if self.damaged is not None:  # every request, the same set too: the weights are neither set's
            raise WeightsPartlyMerged(str(self.damaged))  # a new one each time: a raise adds to its traceback
        fits = self.check(loras)
        warned = set() if warned is None else warned
        for (lora, _), fit in zip(loras, fits, strict=True):
            if fit.skipped and lora.label not in warned:
                warned.add(lora.label)
                logger.warning(
                    "%s: skipping its %d image-branch parameters (%s); applying the rest: %s",
                    lora.label,
                    len(fit.skipped),
                    fit.why_skipped,
                    listing("", fit.skipped).lstrip(": "),
                )
        plan: Plan = {}
        for (lora, strength), fit in zip(loras, fits, strict=True):
            if strength == 0:
                continue
            for name, delta in fit.deltas.items():
                plan.setdefault(name, []).append(Term(delta, float(strength), lora.label))
        changes = self._changes(plan)
        if changes and self.checkpoint is not None:
            self.checkpoint.check_unchanged()  # before anything is written: W0 must still be there
        self._spread(changes, self._base)  # first touches read or copy W0: a core each
        for name in changes:  # nothing is written before every result is known to be representable
            self._check_range(name, plan.get(name, []))
        return plan

    def write(self, plan: Plan) -> int:
        """Write a prepared plan; return tensors rewritten. An interrupted write puts the previous set back."""
        changed = self._changes(plan)
        if not changed:
            return 0
        full = formats.full_precision()
        for dtype in {self.stored[n].weight.dtype for n in changed if self.stored[n].format is full}:
            native_gemm_is_faster(dtype, "cpu")  # measured once, here: never by two threads at once
        started = time.perf_counter()
        touched: list[str] = []

        def write_one(name: str) -> None:
            touched.append(name)  # before the write: a write that fails half-way is undone too
            self._write(name, plan.get(name, []))

        try:
            self._spread(changed, write_one)
        except BaseException:
            try:
                for name in touched:
                    self._write(name, self.plan.get(name, []))
            except BaseException as undo:
                self.damaged = WeightsPartlyMerged(
                    f"a LoRA merge stopped half-way and could not be undone ({undo}); the weights mix two LoRA "
                    "sets, so this model refuses every request; load the model again"
                )
                raise self.damaged from undo
            raise
        self.plan = plan
        logger.debug("rewrote %d tensors in %.3fs", len(changed), time.perf_counter() - started)
        return len(changed)

    def _spread(self, names: list[str], job) -> None:
        """`job(name)` for each name: on the GPU in turn, the CPU's share spread over its cores."""
        on_cpu = [name for name in names if self._device_for(name).type == "cpu"]
        for name in names:
            if name not in on_cpu:
                job(name)
        run_spread([(math.prod(self.stored[name].shape), functools.partial(job, name)) for name in on_cpu])

    def _device_for(self, name: str) -> torch.device:
        """Where `name`'s merge runs: where it lives, or the compute GPU for a host weight when it has room."""
        stored = self.stored[name]
        home = stored.weight.device
        if home.type != "cpu" or self.compute is None:
            return home
        return self.compute if gpu_room(self.compute) >= GPU_WORK_COPIES * 4 * math.prod(stored.shape) else home

    def _changes(self, plan: Plan) -> list[str]:
        return [name for name in sorted(set(plan) | set(self.plan)) if not _same(plan.get(name), self.plan.get(name))]

    def _base(self, name: str) -> Pristine:
        """The pristine W0 of `name`: from the checkpoint where exact, else copied the first time it is needed."""
        found = self.pristine.get(name)
        if found is None:
            stored = self.stored[name]  # never written yet: it holds W0
            if stored.format.keeps_w0:  # LoRAs go beside the stored tensors, which keep W0 for good
                found = InPlace(stored)
            else:
                found = self.checkpoint.pristine(name, stored) if self.checkpoint is not None else None
            if found is None:
                found = HostCopy(stored)
            with self._lock:
                found = self.pristine.setdefault(name, found)
        return found

    def _check_range(self, name: str, terms: list[Term]) -> None:
        """Prove that the new `name` is finite and fits its dtype, cheaply when a bound allows."""
        if not terms:
            return
        stored = self.stored[name]
        base = self._base(name)
        limit = stored.format.limit(stored.data)
        if any(not abs(t.strength * t.delta.alpha_scale) <= FP32_MAX for t in terms):  # the kernels take it as fp32
            raise _overflow(name, terms, stored.weight.dtype)
        if limit == math.inf:  # applied beside the weight: nothing is rounded into a range
            return
        bound = base.peak + sum(abs(t.strength) * t.delta.bound for t in terms)
        if math.isfinite(bound) and bound <= limit:
            return
        for _, _, rows in self._summed_rows(name, terms):  # the bound cannot vouch: compute it and look
            if not bool(torch.isfinite(rows).all()) or float(rows.abs().max()) > limit:
                raise _overflow(name, terms, stored.weight.dtype)

    def _write(self, name: str, terms: list[Term]) -> None:
        """param = round(pristine + sum(strength * delta)), computed in fp32.

        A lone LoRA whose factors are exact in the weight's dtype is one GEMM (fp32
        accumulation, one rounding at the output) where that kernel is the fast one.
        Anything else is summed in an fp32 accumulator in row chunks (on a CPU, sized for its
        cache). Both round once; they differ only in summation order. The format rounds each chunk
        of rows (a quantized one with scales from the rows' own amax).
        """
        stored = self.stored[name]
        base = self._base(name)
        device = self._device_for(name)
        with torch.no_grad():
            if stored.format.apply_terms(stored, terms, lambda: self._summed_rows(name, terms, device)):
                return
            if not terms and base.restore(stored):
                return
            weight = stored.weight
            dense = stored.format is formats.full_precision()
            lone = dense and len(terms) == 1 and weight.dim() == 2 and device == weight.device
            if lone and native_gemm_is_faster(weight.dtype, weight.device.type):
                delta, strength, _ = terms[0]
                factors = delta.gemm_factors(weight.dtype, weight.device)
                if factors is not None and base.restore(stored):  # one GEMM: fp32 accumulation, one rounding
                    weight.addmm_(*factors, alpha=strength * delta.alpha_scale)
                    return
            for start, stop, rows in self._summed_rows(name, terms, device):
                stored.format.encode_into(rows, stored.rows(start, stop))

    def _summed_rows(
        self, name: str, terms: list[Term], device: torch.device | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, rows) of pristine + sum(strength * delta) in fp32, a chunk of rows at a time, on
        `device` (default: the parameter's)."""
        shape = torch.Size(self.stored[name].shape)
        device = self.stored[name].weight.device if device is None else device
        adders = [(t.delta.row_adder(shape, device), t.strength) for t in terms]
        rows = shape[0]
        source = self._base(name)
        width = math.prod(shape[1:]) if rows else 0
        step = rows if device.type == "cuda" else max(1, CPU_CHUNK_ELEMENTS // max(width, 1))
        workspace = self._workspace(device, min(step, rows) * width)
        for start in range(0, rows, step):
            stop = min(start + step, rows)
            acc = workspace[: (stop - start) * width].view(stop - start, -1)
            source.fill(acc, start, stop)
            for add, strength in adders:
                add(acc, start, stop, strength)
            yield start, stop, acc

    def _workspace(self, device: torch.device, elements: int) -> torch.Tensor:
        """A reused fp32 buffer, one per thread: allocating a fresh one per tensor costs more than the math."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(device)
        if buffer is None or buffer.numel() < elements:
            buffer = buffers[device] = torch.empty(elements, dtype=torch.float32, device=device)
        return buffer


def gpu_room(device: torch.device) -> int:
    """The bytes this process can still allocate on `device`: what the driver has free, and what PyTorch's caching
    allocator holds reserved but unused (after a generation, often most of the card: `mem_get_info` counts it as
    taken, though the next allocation reuses it)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _overflow(name: str, terms: list[Term], dtype: torch.dtype) -> LoraFormatError:
    """The refusal for terms that would push `name` out of its dtype's range, naming the likeliest culprit.

    Built only when raised: an error masks secrets in its message, which cost more than the whole range
    check of a weight when made for every one of them.
    """
    worst = max(terms, key=lambda t: abs(t.strength) * t.delta.bound)
    return LoraFormatError(
        f"{worst.label} at strength {worst.strength:g} would push {name} beyond what {dtype} "
        "can hold: its alpha or factors are far too large for this strength",
        worst.label,
    )


def stored_weights(module: torch.nn.Module) -> dict[str, Stored]:
    """Every parameter of `module` as its format stores it: full precision, or a format's layer's tensors."""
    full = formats.full_precision()
    stored = {name: Stored(full, (param,)) for name, param in module.named_parameters()}
    for fmt in formats.every():
        stored |= {name: fmt.stored(layer) for name, layer in fmt.layers(module).items()}
    return stored


@functools.cache
def native_gemm_is_faster(dtype: torch.dtype, device_type: str) -> bool:
    """Whether one GEMM in `dtype` beats fp32 math and one rounding on this machine; measured once.

    On CUDA it does. On a CPU it depends on the instruction set: without native bf16 (AVX2
    only), a bf16 GEMM runs about 20x slower than an fp32 one, with AVX-512 BF16 or AMX it
    is the faster. So the first merge times both at a real shape (a 1536-wide weight, rank 32), on
    one thread, as merges run on a CPU (lora/spread.py).
    """
    if device_type != "cpu" or dtype == torch.float32:
        return True
    with single_threaded_ops():
        return _native_is_faster(dtype)


def _native_is_faster(dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    shapes = ((1536, 1536), (1536, 32), (32, 1536))
    weight, up, down = (torch.randn(shape, generator=generator).to(dtype) for shape in shapes)
    out, acc = torch.empty_like(weight), torch.empty(weight.shape)

    def native() -> None:
        torch.addmm(weight, up, down, out=out)

    def fp32() -> None:
        acc.copy_(weight).addmm_(up.float(), down.float())
        out.copy_(acc)

    native_seconds, fp32_seconds = _best_of(native), _best_of(fp32)
    logger.debug("merge GEMM in %s: %.4fs, in fp32: %.4fs", dtype, native_seconds, fp32_seconds)
    return native_seconds < fp32_seconds


def _best_of(run, repeats: int = 3) -> float:
    run()  # warm-up: first-call dispatch and allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _same(a: list[Term] | None, b: list[Term] | None) -> bool:
    return [(id(t.delta), t.strength) for t in a or []] == [(id(t.delta), t.strength) for t in b or []]
