"""Cold start: models and accelerator LoRAs from the weights folder (Cog's managed weights) or the Hub."""

from __future__ import annotations

import logging
import shutil

import huggingface_hub.constants as constants
import pytest

from wanlora import WanLoraPipeline
from wanlora.frontends.service import PredictorInputs, VideoService

from .conftest import probe
from .lora_helpers import fetch_lora
from .servers import HubRepo

SMALL = {"num_frames": 9, "sample_steps": 2, "fps": 12, "seed": 4}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No Hub at all: anything that tries it fails."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_the_service_loads_a_catalogue_model_from_the_weights_folder(tiny_dir, tmp_path, monkeypatch, offline_hub):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_dir, weights / "Wan-AI" / "Wan2.1-T2V-14B-Diffusers")
    monkeypatch.setenv("WANLORA_WEIGHTS", str(weights))
    service = VideoService(override="", i2v_override="")
    pipe = service.load(service.model_for("14b"))
    assert pipe.spec.source == str(weights / "Wan-AI" / "Wan2.1-T2V-14B-Diffusers")
    assert set(pipe.load_timings) == {"load_seconds"}  # nothing was downloaded
    result = service.generate(PredictorInputs(prompt="a fox", **SMALL), tmp_path)
    assert len(probe(result.path).frames) == 9


def test_an_accelerator_lora_comes_from_the_weights_folder(tiny_dir, tmp_path, monkeypatch, offline_hub):
    name = "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"
    weights = tmp_path / "weights"
    (weights / "Kijai" / "WanVideo_comfy").mkdir(parents=True)
    shutil.copy(tiny_dir / "accelerators" / "lightx2v-4step.safetensors", weights / "Kijai" / "WanVideo_comfy" / name)
    monkeypatch.setenv("WANLORA_WEIGHTS", str(weights))
    fetched = fetch_lora(f"Kijai/WanVideo_comfy/{name}")
    assert fetched.path == weights / "Kijai" / "WanVideo_comfy" / name and not fetched.protected


def test_a_hub_model_is_downloaded_once_then_loaded_with_both_times_reported(tiny_dir, fake_hub, tmp_path, caplog):
    files = {str(p.relative_to(tiny_dir)): p.read_bytes() for p in tiny_dir.rglob("*") if p.is_file()}
    fake_hub.repos["someone/tiny-wan"] = HubRepo(files)
    fake_hub.repos["mirror/tiny-wan"] = HubRepo(dict(files))  # the same files under another name
    caplog.set_level(logging.INFO, logger="wanlora")
    shared = WanLoraPipeline.from_pretrained("someone/tiny-wan")
    pipe = WanLoraPipeline.from_pretrained("mirror/tiny-wan", share_from=shared)
    assert pipe.spec.name == "tiny" and set(pipe.load_timings) == {"download_seconds", "load_seconds"}
    assert "downloaded mirror/tiny-wan in" in caplog.text
    transformer, encoder = (
        f"mirror/tiny-wan/{c}"
        for c in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")
    )
    assert (fake_hub.downloads[transformer], fake_hub.downloads[encoder]) == (1, 0)  # shared parts are not fetched
    assert pipe.diffusers_pipeline.text_encoder is shared.diffusers_pipeline.text_encoder  # the Hub's hashes agree
    assert pipe.generate("a fox", num_inference_steps=2, num_frames=9, seed=1).frames.shape[0] == 9
    WanLoraPipeline.from_pretrained("mirror/tiny-wan")
    assert (fake_hub.downloads[transformer], fake_hub.downloads[encoder]) == (1, 1)  # the Hub cache serves the rest


@pytest.mark.slow
def test_the_first_prediction_reports_the_setup_times(fake_hub, tiny_dir, tmp_path, monkeypatch):
    files = {str(p.relative_to(tiny_dir)): p.read_bytes() for p in tiny_dir.rglob("*") if p.is_file()}
    fake_hub.repos["someone/tiny-wan"] = HubRepo(files)
    service = VideoService(override="someone/tiny-wan", i2v_override="")
    service.load(service.model_for("14b"))
    first = service.generate(PredictorInputs(prompt="a fox", **SMALL), tmp_path)
    assert {"setup_download_seconds", "setup_load_seconds"} <= set(first.timings)
    assert "setup_load_seconds" not in service.generate(PredictorInputs(prompt="a fox", **SMALL), tmp_path).timings


def test_a_folder_with_its_own_vae_and_text_encoder_run_after_another_is_itself(tmp_path):
    """As a batch runs two models' jobs: the second folder gives what `generate --model` on it gives, bitwise."""
    import numpy as np

    from wanlora.resident import load_in_place_of
    from wanlora.tiny import write_tiny_model

    first, other = write_tiny_model(tmp_path / "first"), write_tiny_model(tmp_path / "other", seed=7)
    second = shutil.copytree(first, tmp_path / "second")
    for part in ("vae", "text_encoder"):  # its own VAE and text encoder, the same transformer
        shutil.rmtree(second / part)
        shutil.copytree(other / part, second / part)
    request = {"prompt": "a fox", "num_frames": 5, "num_inference_steps": 2, "seed": 3, "width": 64, "height": 48}
    pipe = load_in_place_of(None, str(first))
    pipe.generate(**request)
    pipe = load_in_place_of(pipe, str(second))
    alone = WanLoraPipeline.from_pretrained(str(second)).generate(**request)
    assert np.array_equal(pipe.generate(**request).frames, alone.frames)
    again = load_in_place_of(pipe, str(second))  # the same folder again: the same files, shared
    assert again.diffusers_pipeline.vae is pipe.diffusers_pipeline.vae
    assert again.diffusers_pipeline.text_encoder is pipe.diffusers_pipeline.text_encoder
