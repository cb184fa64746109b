"""Sweeps: the same request over one or two axes, as one labelled grid video.

An axis is a LoRA's strengths (the first or the second LoRA of the request, on whatever
expert its request aims at), or an option's values (`SWEEP_AXES` in wanlora.options: seeds,
prompts). Every cell is a plain run of the request with its values, so it is bitwise the video a
single call gives; what a sweep saves is the rest: the model loads once, each prompt is encoded
once, and cells run in the order that rewrites the fewest weights (a LoRA's strength changes only
between cells that need it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from .errors import InvalidInput, NotShown
from .grid import Headers, compose, grid_layout
from .lora.fetch import Credentials
from .lora.refs import display_ref
from .lora.selection import LoraRequest, check_strength_value
from .options import SWEEP_AXES, describe, refuse_unknown
from .request import Request, check_text
from .video import Video

MAX_CELLS = 36
MAX_WIDTH = 1920  # the grid's width cap, in pixels: cells are scaled down to fit it
PROMPT_CHARS = 300  # of a prompt shown in a header (the tags hold it whole)
LORA_AXES = ("strengths", "strengths_2")  # the first and the second LoRA's strengths


@dataclass(frozen=True)
class Axis:
    kind: str  # "strength" (of `lora`, the request's first or second LoRA), or the option it varies: "seed" ...
    values: tuple
    lora: int | None = None

    @property
    def changes_weights(self) -> bool:
        return self.kind == "strength"


@dataclass
class Cell:
    row: int
    column: int
    settings: dict[str, Any]  # what differs from the sweep's request: the LoRA strengths, seed or prompt
    video: Video


@dataclass
class Sweep:
    grid: Video
    cells: list[Cell]  # in reading order: row by row


def sweep_axes(
    requests: list[LoraRequest],
    strengths: Sequence[float] | None = None,
    strengths_2: Sequence[float] | None = None,
    *,
    names: Mapping[str, str] | None = None,
    **option_values: Sequence | None,
) -> list[Axis]:
    """The sweep's axes, checked: one or two of them, each with values, at most MAX_CELLS cells in all.

    `option_values` are an option's values by its axis name (`seeds`, `prompts`: wanlora.options'
    SWEEP_AXES). With two axes, the first in the order strengths, strengths_2, then SWEEP_AXES' runs
    down the rows. `names`: how the front end spells the axes in its errors (the CLI's flags); default
    the library's names.
    """
    spelled = {name: name for name in [*LORA_AXES, *SWEEP_AXES]} | dict(names or {})
    refuse_unknown(
        {k: v for k, v in option_values.items() if k not in SWEEP_AXES}, [*LORA_AXES, *SWEEP_AXES], "a sweep"
    )
    given: list[tuple[str, Sequence | None, int | None, str]]
    given = [("strength", strengths, 0, "strengths"), ("strength", strengths_2, 1, "strengths_2")]
    given += [(option, option_values.get(name), None, name) for name, option in SWEEP_AXES.items()]
    axes, named = [], []
    for kind, values, lora, name in given:
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise InvalidInput(name, values, "a non-empty list of values")
        if lora is not None and len(requests) <= lora:
            which = "a LoRA" if lora == 0 else "two LoRAs"
            raise InvalidInput(name, values, f"a sweep with {which}: it varies LoRA {lora + 1}'s strength")
        axes.append(Axis(kind, tuple(_checked(kind, name, value) for value in values), lora))
        named.append(spelled[name])
    every = ", ".join(spelled[name] for name in [*LORA_AXES, *SWEEP_AXES])
    if not axes:
        raise InvalidInput("sweep axis", None, f"one or two of {every}")
    if len(axes) > 2:
        raise InvalidInput(" and ".join(named), NotShown, f"all at once: a sweep takes one or two of {every}")
    cells = int(np.prod([len(axis.values) for axis in axes]))
    if cells > MAX_CELLS:
        shape = " x ".join(str(len(axis.values)) for axis in axes)
        fewer = f"{shape} = {cells} cells; a sweep makes at most {MAX_CELLS}: give fewer values"
        raise InvalidInput(" x ".join(named), NotShown, fewer)
    return axes


def _checked(kind: str, name: str, value: object) -> Any:
    """One axis value, checked as the option it varies checks it: text, or a number within its bounds."""
    if kind == "prompt":
        return check_text(name, value, required=True)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise InvalidInput(name, value, "finite numbers")
    if kind == "strength":
        return check_strength_value(value, name, "a LoRA's strength")
    low, high = describe(kind).bounds()
    if not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(name, value, f"whole numbers from {low:g} to {high:g}")
    return value


def check_max_width(value: object, field: str = "max_width") -> int:
    """The grid's widest, in pixels: a whole number, 64 or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 64:
        raise InvalidInput(field, value, "a whole number of pixels, 64 or more")
    return value


def cell_order(axes: list[Axis]) -> list[tuple[int, int]]:
    """(row, column) in the order that rewrites the fewest weights.

    The axis that changes weights goes outermost, so each LoRA set is merged once; with two
    such axes, rows run back and forth (a serpentine), so that only one LoRA changes at a time.
    """
    if len(axes) == 1:  # one row
        return [(0, column) for column in range(len(axes[0].values))]
    rows, columns = len(axes[0].values), len(axes[1].values)
    if axes[1].changes_weights and not axes[0].changes_weights:
        return [(r, c) for c in range(columns) for r in range(rows)]
    serpentine = axes[0].changes_weights and axes[1].changes_weights
    return [
        (r, c)
        for r in range(rows)
        for c in (range(columns) if not (serpentine and r % 2) else reversed(range(columns)))
    ]


def values_at(axes: list[Axis], position: tuple[int, int]) -> list[tuple[Axis, Any]]:
    """Each axis's value at (row, column): two axes are rows and columns, one axis runs along the row."""
    indices = position if len(axes) == 2 else position[1:]
    return [(axis, axis.values[index]) for axis, index in zip(axes, indices, strict=True)]


def cell_request(request: Request, values: list[tuple[Axis, Any]]) -> Request:
    """`request` (with its LoRA set) at one cell: a LoRA's strength, the seed or the prompt replaced."""
    assert request.loras is not None
    loras, settings = list(request.loras), request.settings
    for axis, value in values:
        if axis.kind == "strength":
            assert axis.lora is not None
            loras[axis.lora] = replace(loras[axis.lora], strength=value)
        else:
            settings = replace(settings, **{axis.kind: value})
    return replace(request, settings=settings, loras=tuple(loras))


def axis_title(axis: Axis, requests: list[LoraRequest]) -> str:
    """What an axis varies, in full: a LoRA's name (and expert) and "strength", or "seed", or "prompt"."""
    if axis.kind != "strength":
        return axis.kind
    assert axis.lora is not None
    request = requests[axis.lora]
    name = display_ref(request.ref).rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")
    expert = "" if request.expert == "both" else f" ({request.expert}-noise expert)"
    return f"{name}{expert} strength"


def value_text(axis: Axis, value: Any) -> str:
    """One value of an axis as its header shows it: a number in full (0.5, 1, 0.125), a seed, a prompt."""
    if axis.kind == "prompt":
        text = " ".join(str(value).split())
        return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"
    if axis.kind == "seed":
        return str(value)
    shown = repr(float(value))
    return shown.removesuffix(".0")


def grid_headers(axes: list[Axis], requests: list[LoraRequest]) -> Headers:
    """The headers of a sweep over `axes`: with two, the first runs down the rows, the second across."""
    across = axes[-1]
    columns = [value_text(across, value) for value in across.values]
    if len(axes) == 1:
        return Headers(axis_title(across, requests), columns)
    down = axes[0]
    rows = [value_text(down, value) for value in down.values]
    return Headers(axis_title(across, requests), columns, axis_title(down, requests), rows)


class Runs(Protocol):
    """What a sweep needs of a pipeline (wanlora.pipeline.WanLoraPipeline)."""

    def run(self, request: Request, credentials: Credentials | None = None, progress: bool = True) -> Video | None: ...

    def prompts_encoded_once(self) -> Any: ...


def run_sweep(
    pipe: Runs,
    request: Request,
    axes: list[Axis],
    credentials: Credentials | None = None,
    max_width: int = MAX_WIDTH,
    progress: bool = True,
) -> Sweep | None:
    """A sweep of `request` (with its LoRA set given) over `axes` (`sweep_axes`) on `pipe`.

    In a parallel run every rank runs every cell; only rank 0 gets the Sweep.
    """
    check_max_width(max_width)
    assert request.loras is not None
    rows, columns = len(axes[0].values) if len(axes) == 2 else 1, len(axes[-1].values)
    headers = grid_headers(axes, list(request.loras))
    grid_layout(headers, rows, columns, request.settings.width, request.settings.height, max_width)  # it fits
    cells: dict[tuple[int, int], Cell] = {}
    order = cell_order(axes)
    with tqdm(total=len(order), desc="sweep", unit="cell", leave=False, disable=not progress) as bar:
        with pipe.prompts_encoded_once():
            for position in order:
                cell = cell_request(request, values_at(axes, position))
                video = pipe.run(cell, credentials, progress=False)
                if video is not None:  # None on every rank but 0 of a parallel run
                    changed = {"prompt": cell.settings.prompt, "seed": cell.settings.seed}
                    described = [lora.describe() for lora in cell.loras or ()]
                    cells[position] = Cell(*position, {**changed, "loras": described}, video)
                bar.update()
    if not cells:
        return None
    frames = compose({position: cell.video.frames for position, cell in cells.items()}, headers, max_width)
    ordered = [cells[position] for position in sorted(cells)]
    metadata = {
        **ordered[0].video.metadata,
        "sweep": {
            "axes": [{"kind": a.kind, "values": list(a.values), "lora": a.lora} for a in axes],
            "cells": [{"row": c.row, "column": c.column, **c.video.metadata} for c in ordered],
        },
    }
    grid = Video(frames=frames, fps=ordered[0].video.fps, seed=ordered[0].video.seed, metadata=metadata)
    for name in ordered[0].video.timings:  # the cells' timings, summed
        grid.timings[name] = sum(cell.video.timings.get(name, 0.0) for cell in ordered)
    return Sweep(grid, ordered)
