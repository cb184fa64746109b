"""A model folder is not taken on its word: its configs, its components and its weights are checked, and a
dtype asked for too; each fault is named before the model is used, never an internal error at first use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanlora import WanLoraPipeline
from wanlora.errors import InvalidInput, ModelNotFound
from wanlora.models import CATALOGUE, resolve_model

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def configs(folder, index: object = None, config: object = None):
    """A folder of a diffusers layout's two configs: t2v-1.3b's unless given (text, or JSON values)."""
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    config = CATALOGUE["t2v-1.3b"].arch.transformer_config() if config is None else config
    for name, value in (("model_index.json", {} if index is None else index), ("transformer/config.json", config)):
        (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return str(folder)


def config_with(**fields) -> dict:
    return {**CATALOGUE["t2v-1.3b"].arch.transformer_config(), **fields}


@pytest.mark.parametrize(
    "index, config, words",
    [
        ("{not json", None, "model_index.json does not read as a JSON config"),
        (None, "\xff\xfe", "config.json does not read as a JSON config"),
        (None, [1, 2], "config.json holds a JSON list, not the config object"),
        (None, config_with(num_attention_heads="12"), "num_attention_heads '12' \\(a whole number above 0\\)"),
        (None, config_with(num_layers=0), "num_layers 0"),
        (None, config_with(ffn_dim=True), "ffn_dim True"),
        (None, config_with(image_dim=1.5), "image_dim 1.5"),
        (None, {"in_channels": 16}, "num_layers absent"),
        ({"boundary_ratio": "lots"}, None, "boundary_ratio 'lots' \\(a number between 0 and 1\\)"),
        ({"boundary_ratio": 9}, None, "boundary_ratio 9"),
        ({"expand_timesteps": "false"}, None, "expand_timesteps 'false' \\(true or false\\)"),
    ],
)
def test_a_config_that_does_not_read_or_holds_wrong_values_is_named(tmp_path, index, config, words):
    with pytest.raises(ModelNotFound, match=words):
        resolve_model(configs(tmp_path, index, config))


def test_sound_configs_still_read(tmp_path):
    spec = resolve_model(configs(tmp_path, {"boundary_ratio": 0.875}, config_with(image_dim=None)))
    assert spec.boundary_ratio == 0.875 and spec.experts == ("high", "low")


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model", ignore=shutil.ignore_patterns("accelerators", "loras"))


def test_a_weight_its_files_lack_is_named_at_load_not_at_first_use(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    weights = load_file(folder / WEIGHTS)
    del weights["blocks.0.attn1.to_q.weight"]  # a shard without it, or a config of a deeper variant
    save_file(weights, folder / WEIGHTS)
    with pytest.raises(ModelNotFound, match="not a whole .* \\(transformer lacks blocks.0.attn1.to_q.weight\\)"):
        WanLoraPipeline.from_pretrained(str(folder), device="cpu")


def test_a_config_of_a_deeper_variant_than_its_weights_is_named_at_load(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    with pytest.raises(ModelNotFound, match="transformer lacks blocks.2.scale_shift_table and .* more"):
        WanLoraPipeline.from_pretrained(str(folder), device="cpu")


def test_an_index_that_claims_a_second_expert_the_folder_lacks_is_named(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.9}))  # Wan2.2 A14B's layout
    with pytest.raises(ModelNotFound, match="not a whole .* model \\(no transformer_2\\)"):
        WanLoraPipeline.from_pretrained(str(folder), device="cpu")


@pytest.mark.parametrize(
    "dtype, words",
    [
        ("bf16", "torch.bfloat16, torch.float16 or torch.float32$"),
        (torch.int8, "torch.float32$"),
        (torch.float8_e4m3fn, "quantize='fp8'"),
        (torch.complex64, "torch.float32$"),
    ],
)
def test_a_dtype_wan_does_not_compute_in_is_refused_before_anything_loads(dtype, words):
    with pytest.raises(InvalidInput, match=f"dtype=.* is not allowed: .*{words}"):
        WanLoraPipeline.from_pretrained("tiny", device="cpu", dtype=dtype)
