"""What a LoRA is and how it lands on a model: a report, not an error, whether or not it fits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from ..errors import LoraMismatch, error_boundary
from ..models import ModelSpec
from ..pairs import EVERY_EXPERT
from .fetch import Credentials, fetch_lora_files
from .keys import MARKER_OF
from .layouts import LoraFile, read_lora_files
from .merge import check_fit
from .placement import Placement, place, refuse_other_base
from .refs import display_ref


@dataclass(frozen=True)
class Coverage:
    """How much of one model a LoRA changes, and whether it fits that model at all."""

    model: str
    fits: bool
    verdict: str  # "fits", or "does not fit: made for ...; this model ..."
    parameters_changed: int
    block_linears_changed: int
    block_linears_total: int
    blocks_touched: int
    blocks_total: int
    skipped_image_parts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # parameters this model lacks
    misfit: list[str] = field(default_factory=list)  # "name (lora shape) vs (model shape)"


@dataclass(frozen=True)
class FileReport:
    """One LoRA file: where it came from, its layout, and what it targets."""

    source: str
    path: str
    layout: str
    tensors: int
    parameters: int
    ranks: list[int]
    alphas: list[float]
    delta_kinds: list[str]
    targets: list[str]
    base_model: str
    expert: str | None  # the Wan2.2 A14B expert it goes on when given for both: its pair's, keys', metadata's or name's
    expert_reason: str  # what decided it
    metadata_base_model: str | None  # the base model its metadata or Civitai page names
    base_model_said_by: str  # which of the two ("" when neither names one)
    trigger_words: list[str]
    coverage: Coverage | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@error_boundary
def inspect_lora(
    ref: str,
    model: torch.nn.Module | None = None,
    model_name: str = "the model",
    credentials: Credentials | None = None,
    spec: ModelSpec | None = None,
) -> list[FileReport]:
    """Fetch and read `ref` (one file, or two for a Wan2.2 pair), and report on each file (on each half of
    an ai-toolkit file that holds both experts' LoRAs).

    With `model` (any Wan transformer, on the meta device is enough) each report says whether
    the LoRA fits it and how much of it the LoRA changes; a LoRA made for another model is a
    report that says so, not an error. With `spec`, the model's catalogue row, the verdict also
    holds what generating would refuse that shapes cannot tell: a Wan2.2 pair on a model of one
    transformer, a base model named for another family.
    """
    params = dict(model.named_parameters()) if model is not None else None
    reports = []
    for role, fetched in fetch_lora_files(ref, credentials):
        halves = read_lora_files(fetched.path, label=display_ref(ref))
        for lora in halves:
            placement = place(lora.metadata, fetched.path, fetched.base_model, lora.expert)
            coverage = None if params is None else coverage_of(lora, params, model_name)
            if coverage is not None and spec is not None:
                pair = role != EVERY_EXPERT or (len(halves) > 1 and lora.expert is not None)
                coverage = _refused_by(coverage, spec, placement, pair, display_ref(ref))
            reports.append(
                FileReport(
                    source=fetched.source,
                    path=str(fetched.path),
                    layout=lora.layout,
                    tensors=lora.tensor_count,
                    parameters=len(lora.deltas),
                    ranks=lora.ranks,
                    alphas=lora.alphas,
                    delta_kinds=sorted({d.kind for d in lora.deltas.values()}),
                    targets=lora.module_kinds,
                    base_model=lora.base_model_hint(),
                    **_placement(role, placement, lora, halves),
                    trigger_words=fetched.trigger_words,
                    coverage=coverage,
                )
            )
    return reports


def _refused_by(coverage: Coverage, spec: ModelSpec, placement: Placement, pair: bool, label: str) -> Coverage:
    """`coverage`, its verdict turned to what generating on `spec` would refuse (as the pipeline refuses it)."""
    if pair and len(spec.experts) == 1:
        why = f"does not fit: it is half of a Wan2.2 high/low pair, and {spec.name} has one transformer"
        return replace(coverage, fits=False, verdict=why)
    try:
        refuse_other_base(placement, spec, label)
    except LoraMismatch as exc:
        return replace(coverage, fits=False, verdict=f"does not fit: {exc}")
    return coverage


def _placement(role: str, placement: Placement, lora: LoraFile, halves: list[LoraFile]) -> dict:
    """What `lora.placement.place` decides for the file, or its role in a Wan2.2 pair (of files, or in one file)."""
    if len(halves) > 1 and lora.expert is not None:
        total = sum(half.tensor_count for half in halves)
        why = (
            f"the {lora.expert}-noise half of an ai-toolkit file that holds both experts' LoRAs: "
            f"{lora.tensor_count} of its {total} tensors, under {MARKER_OF[lora.expert]}"
        )
        return {"expert": lora.expert, "expert_reason": why, **_base(placement)}
    if role != EVERY_EXPERT:
        why = f"the {role}-noise file of a Wan2.2 pair"
        return {"expert": role, "expert_reason": why, **_base(placement)}
    return {"expert": placement.expert, "expert_reason": placement.why, **_base(placement)}


def _base(placement: Placement) -> dict:
    return {"metadata_base_model": placement.base_model, "base_model_said_by": placement.base_said}


def coverage_of(lora, params: dict[str, torch.nn.Parameter], model_name: str) -> Coverage:
    """How much of the model with `params` `lora` changes, and whether it fits it at all."""
    fit = check_fit(lora, params)
    linears = [n for n, p in params.items() if n.startswith("blocks.") and n.endswith(".weight") and p.dim() == 2]
    return Coverage(
        model=model_name,
        fits=fit.fits,
        verdict=fit.verdict,
        parameters_changed=len(fit.deltas),
        block_linears_changed=sum(1 for n in linears if n in fit.deltas),
        block_linears_total=len(linears),
        blocks_touched=len({name.split(".")[1] for name in fit.deltas if name.startswith("blocks.")}),
        blocks_total=sum(1 for n in params if n.endswith("attn1.to_q.weight")),
        skipped_image_parts=fit.skipped,
        missing=fit.missing,
        misfit=fit.misfit,
    )


def coverage_line(coverage: Coverage) -> str:
    """`24/240 block linears in 2/30 blocks of t2v-1.3b`: a fitting LoRA's coverage, in one line."""
    c = coverage
    return (
        f"{c.block_linears_changed}/{c.block_linears_total} block linears in {c.blocks_touched}/{c.blocks_total} "
        f"blocks of {c.model}"
    )
