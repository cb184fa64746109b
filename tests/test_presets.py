"""Every accelerator preset runs on its tiny stand-in in each front end: Python, the CLI (a batch of one line per
preset) and the predictor's service. The stand-in folder (`wanlora tiny-model`) holds a random LoRA, or a high/low
pair on A14B, for each preset the real variant has; each run must sample the preset's own step count and put its
file(s) on the right expert."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from wanlora import WanLoraPipeline
from wanlora.accelerators import ACCELERATORS
from wanlora.frontends.service import PredictorInputs, VideoService
from wanlora.models import CATALOGUE, TINY_KINDS
from wanlora.tiny import write_tiny_model

from .conftest import recorded, run_cli

KINDS = [kind for kind, variant in TINY_KINDS.items() if CATALOGUE[variant].accelerators]
PREDICTOR_MODEL = {"t2v": "14b", "i2v": "14b", "t2v-a14b": "2.2-a14b", "i2v-a14b": "2.2-a14b"}
SMALL = {"width": 64, "height": 48, "num_frames": 5, "seed": 3}


def default_steps(preset: str) -> int:
    return ACCELERATORS[preset].steps


@pytest.fixture(scope="module", params=KINDS)
def stand_in(request, tmp_path_factory):
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    model = write_tiny_model(folder / "model", kind=kind)
    image = None
    if kind.startswith("i2v"):
        image = folder / "start.png"
        Image.new("RGB", (96, 64), (200, 40, 40)).save(image)
    return kind, model, image, sorted(CATALOGUE[TINY_KINDS[kind]].accelerators)


def test_every_preset_runs_in_python(stand_in):
    kind, model, image, presets = stand_in
    pipe = WanLoraPipeline.from_pretrained(str(model))
    for preset in presets:
        conditioning = {} if image is None else {"image": Image.open(image)}
        video = pipe.generate("a fox", accelerator=preset, progress=False, **SMALL, **conditioning)
        assert (video.metadata["accelerator"], video.metadata["num_inference_steps"]) == (preset, default_steps(preset))
        taken = {expert.name: [c.lora.path for c in expert.loras.active] for expert in pipe.experts}
        own = model / "accelerators"
        assert all(len(paths) == 1 and paths[0].startswith(str(own / preset)) for paths in taken.values()), taken
        if len(pipe.experts) == 2:  # each file of the pair on its own expert
            assert taken["high"][0].endswith("high_noise_model.safetensors"), taken
            assert taken["low"][0].endswith("low_noise_model.safetensors"), taken


def test_every_preset_runs_in_the_cli(stand_in, tmp_path):
    kind, model, image, presets = stand_in
    lines = [
        {"prompt": "a fox", "model": str(model), "accelerator": preset, "output": f"{preset}.mp4", **SMALL}
        | ({} if image is None else {"image": str(image)})
        for preset in presets
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli("batch", str(jobs), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    for preset in presets:
        tags = recorded(tmp_path / "out" / f"{preset}.mp4")
        assert (tags["accelerator"], tags["num_inference_steps"]) == (preset, default_steps(preset))


def test_every_preset_runs_in_the_predictor(stand_in, tmp_path):
    kind, model, image, presets = stand_in
    service = VideoService(override=str(model), i2v_override=str(model))
    for preset in presets:
        inputs = PredictorInputs(
            prompt="a fox",
            model=PREDICTOR_MODEL[kind],
            accelerator=preset,
            num_frames=5,
            seed=3,
            image=None if image is None else str(image),
        )
        made = service.generate(inputs, tmp_path)  # each checked before the next overwrites it
        assert made.steps == default_steps(preset)
        assert recorded(made.path)["accelerator"] == preset
