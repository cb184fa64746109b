"""Sweeps: one labelled grid of exact cells, in the order that rewrites the fewest weights."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.grid import grid_layout
from wanlora.lora.layouts import read_lora
from wanlora.lora.selection import LoraRequest
from wanlora.sweep import Axis, grid_headers
from wanlora.tiny import tiny_transformer

from .builders import block_linears, write_lora
from .conftest import SMALL, probe, recorded


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two LoRAs on different (overlapping) parameters."""
    folder = tmp_path_factory.mktemp("sweep-loras")
    model = tiny_transformer()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    made = []
    for name, layout, seed, blocks in (("style", "original", 3, [0]), ("motion", "kohya", 4, [0, 1])):
        path = folder / f"{name}.safetensors"
        write_lora(path, model, layout, seed=seed, targets=block_linears(shapes, blocks))
        made.append(str(path))
    return made


def count_rewrites(pipe, monkeypatch) -> list[int]:
    written = []
    merger = pipe.experts[0].loras.merger
    original = merger.write
    monkeypatch.setattr(merger, "write", lambda plan: written.append(original(plan)) or written[-1])
    return written


@pytest.mark.slow
def test_a_2x3_sweep_is_a_labelled_grid_of_cells_equal_to_their_single_generates(pair, monkeypatch, tmp_path):
    pipe = WanLoraPipeline.from_pretrained("tiny")
    written = count_rewrites(pipe, monkeypatch)
    loras = [(pair[0], 1.0), (pair[1], 1.0)]
    result = pipe.sweep("a fox", loras=loras, strengths=[0.0, 1.0], strengths_2=[0.0, 0.5, 1.0], seed=5, **SMALL)

    style, motion = (set(read_lora(path).deltas) for path in pair)
    # serpentine: style fixed along each row, motion back and forth; one LoRA changes between cells
    steps = [len(motion)] * 2 + [len(style)] + [len(motion)] * 2
    # the first cell: strength 0 on both is the base, nothing to write; after the last (style 1, motion 0), the set
    # from before the sweep (none) is put back: style's weights
    assert written == [0, *steps, len(style)]
    assert [(c.row, c.column) for c in result.cells] == [(r, c) for r in range(2) for c in range(3)]

    for cell in result.cells:
        strengths = [lora["strength"] for lora in cell.settings["loras"]]
        single = pipe.generate("a fox", loras=list(zip(pair, strengths, strict=True)), seed=5, **SMALL)
        assert np.array_equal(single.frames, cell.video.frames), (cell.row, cell.column)

    height, width = SMALL["height"], SMALL["width"]
    layout = grid_layout(grid_headers(result_axes(result), [LoraRequest(p) for p in pair]), 2, 3, width, height, 1920)
    grid = result.grid.frames
    assert grid.shape == (SMALL["num_frames"], layout.height, layout.width, 3)
    assert (layout.cell_w, layout.cell_h) == (width, height) and layout.left > 0 and layout.top > 0
    for cell in result.cells:  # each cell is its video, untouched: the headers are beside and above them
        x, y = layout.cell_origin(cell.row, cell.column)
        assert np.array_equal(grid[:, y : y + height, x : x + width], cell.video.frames), (cell.row, cell.column)
    header = grid[:, : layout.top].astype(int)
    assert header.max() >= 250 and (header < 64).mean() > 0.5  # white text on a dark band
    assert np.array_equal(grid[:, layout.top - 2 : layout.top], np.full_like(grid[:, :2], 18))  # the thin gap

    path = result.grid.save(tmp_path / "grid.mp4")
    video, tags = probe(path), recorded(path)
    assert (video.width, video.height, len(video.frames)) == (layout.width, layout.height, SMALL["num_frames"])
    cells = tags["sweep"]["cells"]
    assert (
        len(cells) == 6 and cells[4]["loras"][1]["strength"] == 0.5 and tags["sweep"]["axes"][0]["kind"] == "strength"
    )
    assert played_in_chromium(path) == f"ended {layout.width}x{layout.height} decoded {SMALL['num_frames']}"


def test_a_sweep_leaves_the_lora_set_it_found(pair):
    """A sweep's cells are not a choice of the caller's: after one, a generate without `loras` keeps the set from
    before the sweep (here style at 1), as on a pipeline that never swept, frames and tags; not the last cell's."""
    pipe = WanLoraPipeline.from_pretrained("tiny")
    pipe.set_loras([(pair[0], 1.0)])
    pipe.sweep("a bird", loras=[(pair[0], 1.0), (pair[1], 1.0)], strengths=[0.0, 0.5], fast_mode="fast", **SMALL)
    after = pipe.generate("a fox", seed=5, **SMALL)
    never_swept = WanLoraPipeline.from_pretrained("tiny")
    never_swept.set_loras([(pair[0], 1.0)])
    alone = never_swept.generate("a fox", seed=5, **SMALL)
    assert after.metadata == alone.metadata
    assert np.array_equal(after.frames, alone.frames)


def result_axes(result) -> list[Axis]:
    """A sweep's axes, as its grid's tags record them."""
    return [Axis(a["kind"], tuple(a["values"]), a["lora"]) for a in result.grid.metadata["sweep"]["axes"]]


PAGE = """<!doctype html><body><video muted playsinline src="grid.mp4"></video><script>
const video = document.querySelector("video");
const say = (text) => console.log("RESULT " + text);
video.addEventListener("error", () => say("error " + video.error.code));
const size = () => `${video.videoWidth}x${video.videoHeight}`;
video.addEventListener("ended", () => say(`ended ${size()} decoded ${video.webkitDecodedFrameCount}`));
video.play().catch((error) => say("refused " + error));
</script></body>"""


def played_in_chromium(path: Path) -> str:
    """What headless Chromium says after playing `path` to its end: its size and the frames it decoded."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "headless Chromium is needed (apt-get install chromium; .ci/test.sh installs it)"
    page = path.with_name("play.html")
    page.write_text(PAGE.replace("grid.mp4", path.name))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
             "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={path.parent / 'profile'}"]  # fmt: skip
    with subprocess.Popen([browser, *flags, page.as_uri()], stderr=subprocess.PIPE, text=True) as chromium:
        try:
            deadline = time.monotonic() + 60
            for line in chromium.stderr or ():
                if "RESULT " in line:
                    return line.split("RESULT ", 1)[1].split('"', 1)[0]
                assert time.monotonic() < deadline, "Chromium said nothing within 60 s"
            raise AssertionError(f"Chromium exited with {chromium.wait()} before the video ended")
        finally:
            chromium.kill()


@pytest.mark.slow
def test_seeds_and_prompts_axes_encode_each_prompt_once(pair):
    pipe = WanLoraPipeline.from_pretrained("tiny")
    calls = []
    pipe.diffusers_pipeline.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    prompts = ["a fox in the snow", "a red bird"]
    result = pipe.sweep("unused", loras=[(pair[0], 1.0)], prompts=prompts, seeds=[1, 2, 3], **SMALL)
    assert len(calls) == 2 * 2  # each prompt once, with the negative prompt beside it: not once per cell
    # rows are the first axis in the order strengths, strengths_2, seeds, prompts: here seeds
    assert [c.settings["prompt"] for c in result.cells][:2] == prompts
    assert [c.settings["seed"] for c in result.cells][::2] == [1, 2, 3]
    single = pipe.generate("a red bird", loras=[(pair[0], 1.0)], seed=2, **SMALL)
    assert np.array_equal(single.frames, result.cells[3].video.frames)


@pytest.mark.slow
def test_the_grid_is_scaled_to_its_cap(pair):
    pipe = WanLoraPipeline.from_pretrained("tiny")
    result = pipe.sweep("a fox", loras=[(pair[0], 1.0)], strengths=[0, 0.5, 1, 1.5], max_width=200, **SMALL)
    frames = result.grid.frames
    assert len(result.cells) == 4  # one row of four 64x48 cells and 3 gaps, 262 wide: scaled by 194/256, to even
    layout = grid_layout(grid_headers(result_axes(result), [LoraRequest(pair[0])]), 1, 4, 64, 48, 200)
    assert (layout.cell_w, layout.cell_h, layout.width) == (48, 36, 4 * 48 + 3 * 2)
    assert frames.shape[1:3] == (layout.height, layout.width)


@pytest.mark.slow
def test_an_a14b_sweep_on_one_expert_rewrites_only_that_expert(pair, monkeypatch):
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    writes = {}
    for expert in pipe.experts:
        merger = expert.loras.merger
        writes[expert.name] = []
        original = merger.write
        monkeypatch.setattr(merger, "write", lambda plan, o=original, w=writes[expert.name]: w.append(o(plan)) or w[-1])
    request = {"num_frames": 5, "num_inference_steps": 2, "width": 64, "height": 64}
    result = pipe.sweep("a fox", loras=[(pair[0], 1.0, "high")], strengths=[0.5, 1.0, 2.0], **request)
    assert len(result.cells) == 3 and sum(writes["low"]) == 0 and sum(writes["high"]) > 0
    assert result.grid.metadata["sweep"]["cells"][2]["loras"] == [{"ref": pair[0], "strength": 2.0, "expert": "high"}]


@pytest.mark.parametrize(
    ("axes", "words"),
    [
        ({}, "one or two of strengths"),
        ({"strengths": [0, 1], "seeds": [1, 2], "prompts": ["a", "b"]}, "one or two of strengths"),
        ({"strengths_2": [0, 1]}, "a sweep with two LoRAs"),
        ({"strengths": []}, "a non-empty list"),
        ({"strengths": [0, float("nan")]}, "finite numbers"),
        ({"seeds": [1, -2]}, "whole numbers from 0"),
        ({"prompts": ["a fox", " "]}, "a non-empty text"),
        ({"strengths": [0, 1], "shfit": 3}, "did you mean flow_shift"),
        ({"strengths": [0, 1], "max_width": 10}, "64 or more"),
        ({"strengths": list(range(7)), "seeds": list(range(6))}, "at most 36"),
    ],
)
def test_a_sweep_that_cannot_run_is_refused_before_any_work(pair, axes, words):
    pipe = WanLoraPipeline.from_pretrained("tiny")
    with pytest.raises(InvalidInput, match=words):
        pipe.sweep("a fox", loras=[(pair[0], 1.0)], **axes, **SMALL)


@pytest.mark.slow
def test_the_cli_sweeps_into_one_grid_and_keeps_the_cells(cli, pair, tmp_path):
    out, cells = tmp_path / "grid.mp4", tmp_path / "cells"
    result = cli("sweep", "a fox", "--model", "tiny", "--lora", pair[0], "--strengths", "0,1", "--seeds", "1,2",
                 "--frames", "9", "--steps", "2", "--width", "112", "--height", "64", "-o", str(out),
                 "--keep-cells", str(cells))  # fmt: skip
    assert result.returncode == 0, result.stderr
    axes = [Axis("strength", (0.0, 1.0), 0), Axis("seed", (1, 2))]
    layout = grid_layout(grid_headers(axes, [LoraRequest(pair[0])]), 2, 2, 112, 64, 1920)
    assert (probe(out).width, probe(out).height) == (layout.width, layout.height)
    assert (layout.cell_w, layout.cell_h) == (112, 64)
    assert sorted(p.name for p in cells.iterdir()) == [f"cell-{r}-{c}.mp4" for r in range(2) for c in range(2)]
    assert (
        recorded(cells / "cell-1-0.mp4")["seed"] == 1 and recorded(cells / "cell-1-0.mp4")["loras"][0]["strength"] == 1
    )
    refused = cli("sweep", "a fox", "--model", "tiny", "--lora", pair[0], "--strengths", "0,x")
    assert refused.returncode == 2 and "--strengths='0,x' is not allowed: comma-separated numbers" in refused.stderr
    none = cli("sweep", "a fox", "--model", "tiny", "--lora", pair[0])
    assert none.returncode == 2 and "one or two of --strengths, --strengths-2, --seeds, --prompts" in none.stderr


@pytest.mark.parametrize(
    ("keep", "words"),
    [("a-file/cells", "a-file is not a writable folder"), ("/sys/cells", "/sys is not a writable folder")],
)
def test_a_keep_cells_folder_that_cannot_be_made_is_refused_before_any_work(cli, tmp_path, keep, words):
    """t2v-14b is not reachable here: only a refusal before loading names --keep-cells (it was a NotADirectoryError,
    'a bug', after every cell had run, and the grid was never written)."""
    (tmp_path / "a-file").write_text("x")
    result = cli("sweep", "a fox", "--model", "t2v-14b", "--seeds", "1,2", "--keep-cells", keep, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--keep-cells" in lines[0] and words in lines[0], lines
    assert [path.name for path in tmp_path.iterdir()] == ["a-file"]


# ------------------------------------------------------------------ headers that show every value in full

LONG_A = "/loras/my_extremely_long_character_lora_name_v2_final_epoch10.safetensors"
LONG_B = "https://huggingface.co/o/r/resolve/main/another-very-long-style-lora-for-wan-2.1-14b-rank64.safetensors"
HEADER_CASES = {  # (axes, LoRAs, cell width and height, max width): the issue's, and the tightest
    "9:16, two LoRAs": (
        [Axis("strength", (0.0, 0.5, 1.0), 0), Axis("strength", (0.0, 0.5, 1.0), 1)],
        ["/l/lora_a.safetensors", "/l/lora_b.safetensors"], (480, 832), 1920,
    ),
    "64 px cells": (
        [Axis("strength", (-0.25, 0.125, 1.5), 0), Axis("seed", (4294967295, 7))], ["/l/lora_a.safetensors"],
        (64, 48), 1920,
    ),
    "two long names, 6 columns of 832x480": (
        [Axis("strength", (0.0, 1.0), 0), Axis("strength", (0.0, 0.25, 0.5, 0.75, 1.0, 1.25), 1)],
        [LONG_A, LONG_B], (832, 480), 1920,
    ),
    "prompts down, on a narrow grid": (
        [Axis("prompt", ("a fox in the snow, cinematic lighting, 35mm grain", "a red bird")), Axis("seed", (1, 2))],
        [], (64, 48), 320,
    ),
    "one axis of six, 200 px": ([Axis("strength", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), 0)], [LONG_B], (64, 48), 200),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_every_header_shows_its_value_in_full_inside_its_box_beside_untouched_cells(case):
    from PIL import ImageFont

    from wanlora.grid import MIN_FONT

    axes, refs, (width, height), max_width = HEADER_CASES[case]
    headers = grid_headers(axes, [LoraRequest(ref) for ref in refs])
    rows, columns = len(axes[0].values) if len(axes) == 2 else 1, len(axes[-1].values)
    layout = grid_layout(headers, rows, columns, width, height, max_width)
    assert layout.width <= max_width and layout.width % 2 == 0 == layout.height % 2
    shown = [text.text for text in layout.texts]
    values = [[f"{v:g}" if isinstance(v, float) else str(v) for v in axis.values] for axis in axes]
    assert all(value in shown for axis in values for value in axis)  # each value is a header of its own, whole
    if refs:
        assert any(Path(refs[-1]).stem in text for text in shown)  # the LoRA's whole name
    cells = [(*layout.cell_origin(r, c), layout.cell_w, layout.cell_h) for r in range(rows) for c in range(columns)]
    canvas = np.asarray(layout.render())
    for text in layout.texts:
        assert "".join(text.lines).replace(" ", "") == text.text.replace(" ", "")  # wrapped, nothing dropped
        assert text.size >= MIN_FONT
        font = ImageFont.load_default(size=text.size)
        x, y, box_w, box_h = text.box
        across, down = (box_h, box_w) if text.turned else (box_w, box_h)
        assert all(font.getbbox(line)[2] <= across for line in text.lines if line), (case, text)
        assert len(text.lines) * sum(font.getmetrics()) <= down, (case, text)
        assert x >= 0 and y >= 0 and x + box_w <= layout.width and y + box_h <= layout.height
        assert not any(overlap((x, y, box_w, box_h), cell) for cell in cells), (case, text)
        assert (canvas[y : y + box_h, x : x + box_w] > 200).any()  # drawn
    ink = canvas > 200
    for x, y, box_w, box_h in [text.box for text in layout.texts]:
        ink[y : y + box_h, x : x + box_w] = False
    assert not ink.any()  # no text outside its box: nothing spilt, so nothing cut at a box's edge either


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
