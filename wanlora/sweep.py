"""Sweeps: the same request over one or two axes, as one labelled grid video.

An axis is a LoRA's strengths (the first or the second LoRA of the request, on whatever
expert its request aims at), seeds, or prompts. Every cell is a plain run of the request
with its values, so it is bitwise the video a single call gives; what a sweep saves is the rest:
the model loads once, each prompt is encoded once, and cells run in the order that rewrites
the fewest weights (a LoRA's strength changes only between cells that need it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import InvalidInput
from .lora.refs import display_ref
from .lora.selection import LoraRequest
from .request import Request, check_text
from .video import Video

MAX_CELLS = 36
MAX_WIDTH = 1920  # the grid's width cap, in pixels: cells are scaled down to fit it
PROMPT_CHARS = 32  # of a prompt shown in a label


@dataclass(frozen=True)
class Axis:
    kind: str  # "strength" (of `lora`, the request's first or second LoRA), "seed" or "prompt"
    values: tuple
    lora: int | None = None

    @property
    def changes_weights(self) -> bool:
        return self.kind == "strength"

    def label(self, value: Any, requests: list[LoraRequest]) -> str:
        if self.kind == "seed":
            return f"seed {value}"
        if self.kind == "prompt":
            text = " ".join(str(value).split())
            return text if len(text) <= PROMPT_CHARS else text[: PROMPT_CHARS - 1] + "…"
        assert self.lora is not None
        request = requests[self.lora]
        name = display_ref(request.ref).rstrip("/").rsplit("/", 1)[-1].removesuffix(".safetensors")[:24]
        expert = "" if request.expert == "both" else f" ({request.expert})"
        return f"{name}{expert} {value:g}"


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
    seeds: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
) -> list[Axis]:
    """The sweep's axes, checked: one or two of them, each with values, at most MAX_CELLS cells in all."""
    axes = []
    for kind, values, lora, name in (
        ("strength", strengths, 0, "strengths"),
        ("strength", strengths_2, 1, "strengths_2"),
        ("seed", seeds, None, "seeds"),
        ("prompt", prompts, None, "prompts"),
    ):
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or len(values) == 0:
            raise InvalidInput(name, values, "a non-empty list of values")
        if lora is not None and len(requests) <= lora:
            raise InvalidInput(name, values, f"a sweep with at least {lora + 1} LoRA(s): it varies LoRA {lora + 1}")
        if kind == "strength":
            values = [_strength(name, value) for value in values]
        if kind == "seed":
            values = [_seed(value) for value in values]
        if kind == "prompt":
            values = [check_text(name, value, required=True) for value in values]
        axes.append(Axis(kind, tuple(values), lora))
    if not axes or len(axes) > 2:
        raise InvalidInput("sweep", f"{len(axes)} axes", "one or two of strengths, strengths_2, seeds and prompts")
    cells = int(np.prod([len(axis.values) for axis in axes]))
    if cells > MAX_CELLS:
        raise InvalidInput("sweep", f"{cells} cells", f"at most {MAX_CELLS}")
    return axes


def _strength(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise InvalidInput(name, value, "finite numbers")
    return float(value)


def _seed(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InvalidInput("seeds", value, "whole numbers from 0 to 4294967295")
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


def cell_label(axes: list[Axis], position: tuple[int, int], requests: list[LoraRequest]) -> str:
    return " · ".join(axis.label(value, requests) for axis, value in values_at(axes, position))


def compose(
    frames: dict[tuple[int, int], np.ndarray], labels: dict[tuple[int, int], str], max_width: int
) -> np.ndarray:
    """The cells' frames side by side (rows x columns), scaled to fit `max_width`, each labelled."""
    rows = 1 + max(r for r, _ in frames)
    columns = 1 + max(c for _, c in frames)
    count, height, width, _ = next(iter(frames.values())).shape
    scale = min(1.0, max_width / (columns * width))
    cell_w, cell_h = max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)
    grid = np.zeros((count, rows * cell_h, columns * cell_w, 3), dtype=np.uint8)
    for (row, column), cell in frames.items():
        resized = _resize(cell, cell_w, cell_h)
        _label(resized, labels[(row, column)])
        grid[:, row * cell_h : (row + 1) * cell_h, column * cell_w : (column + 1) * cell_w] = resized
    return grid


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames.copy()
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames])


def _label(frames: np.ndarray, text: str) -> None:
    """White text on a dark band across the top of every frame, sized to the cell (at least 10 px)."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = frames.shape[1:3]
    size = max(10, height // 14)
    font = ImageFont.load_default(size=size)
    band = Image.new("L", (width, size + size // 2), 0)
    ImageDraw.Draw(band).text((size // 3, size // 6), text, fill=255, font=font)
    mask = np.asarray(band, dtype=np.float32)[None, :, :, None] / 255.0
    top = frames[:, : band.height].astype(np.float32)
    shaded = top * 0.35  # the band darkens what is under it, so the text reads on any frame
    frames[:, : band.height] = np.clip(shaded * (1 - mask) + 255.0 * mask, 0, 255).round().astype(np.uint8)
