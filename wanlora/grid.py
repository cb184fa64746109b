"""A sweep's grid: the cells' frames in rows and columns, under column headers and beside row headers.

Pure drawing (numpy and PIL): what the headers say is the sweep's business (wanlora.sweep).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidInput
from .video import MAX_SIDE


@dataclass(frozen=True)
class Headers:
    """A grid's labels: what varies across and each column's value; down and each row's (two axes only)."""

    column_title: str
    columns: list[str]
    row_title: str | None = None
    rows: list[str] = field(default_factory=list)


def compose(frames: dict[tuple[int, int], np.ndarray], headers: Headers, max_width: int) -> np.ndarray:
    """The cells' frames in rows and columns, a thin gap between them, under column headers and beside
    row headers; scaled so that the whole is at most `max_width` across. Each cell is its frames,
    untouched but for the scaling; every header shows its value in full (wrapped, or a smaller font)."""
    rows = 1 + max(r for r, _ in frames)
    columns = 1 + max(c for _, c in frames)
    count, height, width, _ = next(iter(frames.values())).shape
    layout = grid_layout(headers, rows, columns, width, height, max_width)
    grid = np.empty((count, layout.height, layout.width, 3), dtype=np.uint8)
    grid[:] = np.asarray(layout.render(), dtype=np.uint8)[None]
    for (row, column), cell in frames.items():
        x, y = layout.cell_origin(row, column)
        grid[:, y : y + layout.cell_h, x : x + layout.cell_w] = _resize(cell, layout.cell_w, layout.cell_h)
    return grid


GAP = 2  # pixels between cells, and between the headers and the cells
MIN_FONT = 10  # the smallest a header's text gets, in pixels
MAX_FONT = 28
BACKGROUND = (18, 18, 18)  # the headers' and the gaps'
INK = (255, 255, 255)


@dataclass(frozen=True)
class Text:
    """A header's text, wrapped into lines, at one font size, in its box (x, y, width, height) on the grid."""

    text: str
    lines: tuple[str, ...]
    size: int
    box: tuple[int, int, int, int]
    turned: bool = False  # drawn reading upwards (the row title)
    left_aligned: bool = False  # else centred across its box (the row values are left-aligned)


@dataclass(frozen=True)
class GridLayout:
    width: int
    height: int
    cell_w: int
    cell_h: int
    left: int  # the row headers' width (0 with one axis)
    top: int  # the column headers' height
    texts: tuple[Text, ...]

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        return self.left + column * (self.cell_w + GAP), self.top + row * (self.cell_h + GAP)

    def render(self):
        """The grid's background with every header drawn: an RGB PIL image."""
        from PIL import Image, ImageDraw

        canvas = Image.new("RGB", (self.width, self.height), BACKGROUND)
        for text in self.texts:
            x, y, width, height = text.box
            across, down = (height, width) if text.turned else (width, height)
            block = Image.new("RGB", (across, down), BACKGROUND)
            draw = ImageDraw.Draw(block)
            line_h = _line_height(text.size)
            first = (down - len(text.lines) * line_h) // 2  # the lines centred in the box
            for number, line in enumerate(text.lines):
                indent = 0 if text.left_aligned else (across - _text_width(line, text.size)) // 2
                draw.text((indent, first + number * line_h), line, fill=INK, font=_font(text.size))
            canvas.paste(block.rotate(90, expand=True) if text.turned else block, (x, y))
        return canvas


def grid_layout(headers: Headers, rows: int, columns: int, width: int, height: int, max_width: int) -> GridLayout:
    """Where every cell and header goes: cells scaled (never up) until the grid, headers included, is at
    most `max_width` across and MAX_SIDE (H.264's) down; refused if the headers cannot fit beside them."""
    scale = min(1.0, (max_width - (columns - 1) * GAP) / (columns * width))
    for _ in range(12):  # the headers' size depends on the cells': settle both
        cell_w, cell_h = int(width * scale) // 2 * 2, int(height * scale) // 2 * 2
        if min(cell_w, cell_h) < 2:
            break
        layout = _layout(headers, rows, columns, cell_w, cell_h)
        if layout.width <= max_width and layout.height <= MAX_SIDE:
            return layout
        across = (max_width - layout.left - (columns - 1) * GAP) / (columns * cell_w)
        down = (MAX_SIDE - layout.top - (rows - 1) * GAP) / (rows * cell_h)
        scale *= max(0.0, min(across, down, 0.97))
    raise InvalidInput("max_width", max_width, f"wider: the headers of a {rows} x {columns} grid do not fit in it")


def _layout(headers: Headers, rows: int, columns: int, cell_w: int, cell_h: int) -> GridLayout:
    size = max(MIN_FONT, min(MAX_FONT, cell_h // 12))
    pad = max(2, size // 3)
    cells_w = columns * cell_w + (columns - 1) * GAP
    cells_h = rows * cell_h + (rows - 1) * GAP
    texts: list[Text] = []
    # the row headers: each row's value beside its row, the axis title turned along them all
    left = 0
    if headers.row_title is not None:
        title_size = size
        title_lines = _wrap(headers.row_title, cells_h - 2 * pad, title_size)
        title_w = len(title_lines) * _line_height(title_size) + 2 * pad
        values_w, value_size = _fit_column(headers.rows, cell_h - 2 * pad, size, cell_w)
        left = _even(title_w + values_w + 2 * pad + GAP)
    # the column headers: the title across them all, then each column's value
    column_size = _fit_row(headers.columns, cell_w - 2 * pad, size, cell_h)
    value_lines = [_wrap(text, cell_w - 2 * pad, column_size) for text in headers.columns]
    values_h = max(len(lines) for lines in value_lines) * _line_height(column_size)
    title = _wrap(headers.column_title, cells_w - 2 * pad, size)
    title_h = len(title) * _line_height(size)
    top = _even(pad + title_h + pad + values_h + pad + GAP)
    texts.append(Text(headers.column_title, title, size, (left + pad, pad, cells_w - 2 * pad, title_h)))
    for column, (text, lines) in enumerate(zip(headers.columns, value_lines, strict=True)):
        x = left + column * (cell_w + GAP) + pad
        texts.append(Text(text, lines, column_size, (x, pad + title_h + pad, cell_w - 2 * pad, values_h)))
    if headers.row_title is not None:
        title_box = (pad, top + pad, len(title_lines) * _line_height(title_size), cells_h - 2 * pad)
        texts.append(Text(headers.row_title, title_lines, title_size, title_box, turned=True))
        for row, text in enumerate(headers.rows):
            lines = _wrap(text, values_w, value_size)
            y = top + row * (cell_h + GAP) + pad
            box = (title_w + pad, y, values_w, cell_h - 2 * pad)
            texts.append(Text(text, lines, value_size, box, left_aligned=True))
    return GridLayout(left + cells_w, top + cells_h, cell_w, cell_h, left, top, tuple(texts))


def _fit_row(texts: list[str], width: int, size: int, most_height: int) -> int:
    """The largest font, from `size` down to MIN_FONT, at which every text wrapped to `width` is at
    most `most_height` high (at MIN_FONT they may be higher: the band grows to hold them)."""
    while size > MIN_FONT and any(len(_wrap(t, width, size)) * _line_height(size) > most_height for t in texts):
        size -= 1
    return size


def _fit_column(texts: list[str], height: int, size: int, cell_w: int) -> tuple[int, int]:
    """The width and font for row values, each in `height`: as narrow as the widest value, up to a
    cell's width; a smaller font, then a wider band, where a value would not fit."""
    most = max(cell_w, 4 * size)

    def fits(width: int, at: int) -> bool:
        return all(len(_wrap(text, width, at)) * _line_height(at) <= height for text in texts)

    widest = max(_text_width(text, size) for text in texts)
    width = min(widest, most)
    while size > MIN_FONT and not fits(width, size):
        size -= 1
    while not fits(width, size):
        width += max(8, width // 4)
    return width, size


def _wrap(text: str, width: int, size: int) -> tuple[str, ...]:
    """`text` in lines at most `width` wide: broken after spaces, `_`, `-`, `/` and `.`, and inside a word
    only when one is wider than the line. Nothing is dropped: joined, the lines are the text."""
    width = max(width, 1)
    pieces = re.findall(r"[^ _\-/.]*[ _\-/.]|[^ _\-/.]+", text) or [""]
    lines: list[str] = []
    line = ""
    for piece in pieces:
        if _text_width(line + piece, size) <= width or not line:
            line += piece
        else:
            lines.append(line)
            line = piece
        while _text_width(line.rstrip(), size) > width and len(line) > 1:  # a word wider than the line
            cut = max(1, max(n for n in range(1, len(line) + 1) if _text_width(line[:n], size) <= width or n == 1))
            lines.append(line[:cut])
            line = line[cut:]
    lines.append(line)
    return tuple(line.rstrip() for line in lines)


@functools.lru_cache(maxsize=64)
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _line_height(size: int) -> int:
    ascent, descent = _font(size).getmetrics()
    return ascent + descent


def _text_width(text: str, size: int) -> int:
    """How wide `text` draws: its advance, or its ink where a glyph reaches past it."""
    text = text.rstrip()
    font = _font(size)
    return math.ceil(max(font.getlength(text), font.getbbox(text)[2] if text else 0))


def _even(value: int) -> int:
    return value + value % 2


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    if frames.shape[1:3] == (height, width):
        return frames
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.LANCZOS)) for f in frames])
