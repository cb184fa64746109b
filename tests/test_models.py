import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanlora.errors import InvalidInput, ModelNotFound
from wanlora.models import CATALOGUE, resolve_model


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_transformer_matches_published_size(name):
    spec = CATALOGUE[name]
    with torch.device("meta"):
        model = WanTransformer3DModel(**spec.arch.transformer_config())
    assert sum(p.numel() for p in model.parameters()) == spec.published_params


def test_catalogue_repos_and_defaults():
    assert CATALOGUE["t2v-1.3b"].source == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert CATALOGUE["t2v-14b"].source == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    for spec in CATALOGUE.values():
        assert spec.default_steps == (50 if spec.task == "t2v" else 40)
        assert (spec.default_guidance, spec.default_fps, spec.default_frames) == (5.0, 16, 81)
        for resolution in spec.resolutions:
            for aspect in ("16:9", "9:16", "1:1"):
                width, height = spec.size(resolution, aspect)
                assert width % 16 == 0 and height % 16 == 0
    t2v = CATALOGUE["t2v-14b"]
    assert t2v.size("480p", "16:9") == (832, 480) and t2v.size("720p", "9:16") == (720, 1280)
    assert t2v.default_shift(832, 480) == 3.0 and t2v.default_shift(1280, 720) == 5.0
    assert CATALOGUE["i2v-14b-480p"].arch.in_channels == 36


def test_small_model_refuses_720p_by_name():
    with pytest.raises(InvalidInput, match="t2v-1.3b supports 480p only"):
        CATALOGUE["t2v-1.3b"].size("720p")


def test_resolve_tiny_folder_and_repo_ids(tiny_dir, tmp_path):
    assert resolve_model("tiny").name == "tiny"
    assert resolve_model(str(tiny_dir)).name == "tiny" and resolve_model(str(tiny_dir)).source == str(tiny_dir)
    assert resolve_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").name == "t2v-1.3b"
    assert resolve_model("someone/wan-finetune").source == "someone/wan-finetune"
    with pytest.raises(ModelNotFound, match="not a catalogue variant"):
        resolve_model("t2v-7b")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelNotFound, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_folder_with_real_config_gets_catalogue_defaults(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    config = CATALOGUE["t2v-1.3b"].arch.transformer_config()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(tmp_path))
    assert spec.resolutions == ("480p",) and spec.source == str(tmp_path)
