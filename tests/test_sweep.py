"""Sweeps: one labelled grid of exact cells, in the order that rewrites the fewest weights."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.lora.formats import read_lora
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


def test_a_2x3_sweep_is_a_labelled_grid_of_cells_equal_to_their_single_generates(pair, monkeypatch, tmp_path):
    pipe = WanLoraPipeline.from_pretrained("tiny")
    written = count_rewrites(pipe, monkeypatch)
    loras = [(pair[0], 1.0), (pair[1], 1.0)]
    result = pipe.sweep("a fox", loras=loras, strengths=[0.0, 1.0], strengths_2=[0.0, 0.5, 1.0], seed=5, **SMALL)

    style, motion = (set(read_lora(path).deltas) for path in pair)
    # serpentine: style fixed along each row, motion back and forth; one LoRA changes between cells
    steps = [len(motion)] * 2 + [len(style)] + [len(motion)] * 2
    assert written == [0] + [n for n in steps]  # the first cell: strength 0 on both is the base, nothing to write
    assert [(c.row, c.column) for c in result.cells] == [(r, c) for r in range(2) for c in range(3)]

    for cell in result.cells:
        strengths = [lora["strength"] for lora in cell.settings["loras"]]
        single = pipe.generate("a fox", loras=list(zip(pair, strengths, strict=True)), seed=5, **SMALL)
        assert np.array_equal(single.frames, cell.video.frames), (cell.row, cell.column)

    height, width = SMALL["height"], SMALL["width"]
    grid = result.grid.frames
    assert grid.shape == (SMALL["num_frames"], 2 * height, 3 * width, 3)
    band = grid[:, :10, :width].astype(int)
    assert band.max() >= 250 and (band < 128).mean() > 0.5  # white text on a darkened band
    below = grid[:, height // 2 : height, :width]
    assert np.array_equal(below, result.cells[0].video.frames[:, height // 2 :])  # the cell itself, untouched

    path = result.grid.save(tmp_path / "grid.mp4")
    video, tags = probe(path), recorded(path)
    assert (video.width, video.height, len(video.frames)) == (3 * width, 2 * height, SMALL["num_frames"])
    cells = tags["sweep"]["cells"]
    assert (
        len(cells) == 6 and cells[4]["loras"][1]["strength"] == 0.5 and tags["sweep"]["axes"][0]["kind"] == "strength"
    )
    assert played_in_chromium(path) == f"ended {3 * width}x{2 * height} decoded {SMALL['num_frames']}"


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


def test_the_grid_is_scaled_to_its_cap(pair):
    pipe = WanLoraPipeline.from_pretrained("tiny")
    result = pipe.sweep("a fox", loras=[(pair[0], 1.0)], strengths=[0, 0.5, 1, 1.5], max_width=200, **SMALL)
    frames = result.grid.frames
    assert len(result.cells) == 4  # one row of four 64x48 cells, 256 wide: scaled by 200/256, to even sizes
    assert frames.shape[1:3] == (36, 200)


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
        ({"strengths_2": [0, 1]}, "at least 2 LoRA"),
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


def test_the_cli_sweeps_into_one_grid_and_keeps_the_cells(cli, pair, tmp_path):
    out, cells = tmp_path / "grid.mp4", tmp_path / "cells"
    result = cli("sweep", "a fox", "--model", "tiny", "--lora", pair[0], "--strengths", "0,1", "--seeds", "1,2",
                 "--frames", "9", "--steps", "2", "--width", "112", "--height", "64", "-o", str(out),
                 "--keep-cells", str(cells))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (probe(out).width, probe(out).height) == (224, 128)
    assert sorted(p.name for p in cells.iterdir()) == [f"cell-{r}-{c}.mp4" for r in range(2) for c in range(2)]
    assert (
        recorded(cells / "cell-1-0.mp4")["seed"] == 1 and recorded(cells / "cell-1-0.mp4")["loras"][0]["strength"] == 1
    )
    refused = cli("sweep", "a fox", "--model", "tiny", "--lora", pair[0], "--strengths", "0,x")
    assert refused.returncode == 2 and "--strengths='0,x' is not allowed: comma-separated numbers" in refused.stderr
    none = cli("sweep", "a fox", "--model", "tiny", "--lora", pair[0])
    assert none.returncode == 2 and "one or two of strengths" in none.stderr
