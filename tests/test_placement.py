"""Wan2.2 A14B: a LoRA file given for both experts goes on the one its metadata, then its name, says.

The files carry the metadata keys each trainer really writes (read from their code):
- musubi-tuner (kohya's): `lora_unet_` keys; src/musubi_tuner/utils/sai_model_spec.py writes `modelspec.*`,
  with `modelspec.timestep_range` "min,max" only when --min_timestep/--max_timestep were given, and
  training/trainer_base.py `ss_base_model_version` "wan" for every Wan task;
- ai-toolkit: `diffusion_model.` keys (lora_A/lora_B); ss_base_model_version "wan_2.2_14b" in both files, and
  the expert only in the name (wan22_14b_model.py save_lora: NAME_high_noise / NAME_low_noise);
- kohya's sd-scripts metadata with neither.
"""

from __future__ import annotations

import json
import logging

import pytest

from wanlora import WanLoraPipeline
from wanlora.lora.placement import place
from wanlora.lora.selection import LoraRequest
from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .conftest import run_cli

MUSUBI = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "wan2.1/lora",  # musubi's ARCH_WAN for every task, Wan2.2 A14B included
    "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1",
    "modelspec.title": "motion",
    "modelspec.resolution": "1280x720",
    "ss_base_model_version": "wan",
    "ss_network_module": "networks.lora_wan",
    "ss_network_dim": "4",
    "ss_network_alpha": "4",
    "ss_sd_model_name": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
}
AI_TOOLKIT = {
    "ss_base_model_version": "wan_2.2_14b",
    "software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.7"}),
    "format": "pt",
    "training_info": json.dumps({"step": 5000, "epoch": 3}),
    "ss_output_name": "mystyle",
}
KOHYA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "4",
    "ss_base_model_version": "wan",
}


@pytest.fixture(scope="module")
def a14b():
    return WanLoraPipeline.from_pretrained("tiny-t2v-a14b")


def on_experts(pipe) -> dict[str, int]:
    return {expert.name: len(expert.loras.active) for expert in pipe.experts}


@pytest.mark.parametrize(
    ("name", "layout", "metadata", "expert", "why"),
    [
        (
            "motion.safetensors",
            "kohya",
            {**MUSUBI, "modelspec.timestep_range": "875,1000"},
            "high",
            "its modelspec.timestep_range 875,1000 (musubi-tuner) is the high-noise end",
        ),
        (
            "motion.safetensors",
            "kohya",
            {**MUSUBI, "modelspec.timestep_range": "0,900"},
            "low",
            "its modelspec.timestep_range 0,900 (musubi-tuner) is the low-noise end",
        ),
        (
            "mystyle_000005000_high_noise.safetensors",
            "original-peft",
            AI_TOOLKIT,
            "high",
            "its file name mystyle_000005000_high_noise.safetensors says high-noise",
        ),
        (
            "mystyle_low_noise.safetensors",
            "original-peft",
            AI_TOOLKIT,
            "low",
            "its file name mystyle_low_noise.safetensors says low-noise",
        ),
        ("wan22-SmoothMotion-LowNoise.safetensors", "kohya", KOHYA, "low", "says low-noise"),
    ],
)
def test_a_file_for_both_goes_on_the_expert_its_metadata_or_name_says(
    a14b, tmp_path, caplog, name, layout, metadata, expert, why
):
    path = tmp_path / name
    write_lora(path, tiny_transformer(), layout, metadata=metadata, seed=3)
    caplog.set_level(logging.INFO, logger="wanlora")
    a14b.set_loras([(str(path), 0.8)])
    assert on_experts(a14b) == {"high": int(expert == "high"), "low": int(expert == "low")}
    (line,) = [r for r in caplog.records if "expert only" in r.getMessage()]
    assert line.levelno == logging.INFO and f"goes on the {expert}-noise expert only" in line.getMessage()
    assert why in line.getMessage()


def test_a_file_that_says_nothing_goes_on_both_and_an_explicit_expert_always_wins(a14b, tmp_path, caplog):
    plain, musubi_high = tmp_path / "style.safetensors", tmp_path / "motion.safetensors"
    write_lora(plain, tiny_transformer(), "kohya", metadata=KOHYA, seed=4)
    write_lora(musubi_high, tiny_transformer(), "kohya", metadata={**MUSUBI, "modelspec.timestep_range": "875,1000"})
    caplog.set_level(logging.INFO, logger="wanlora")
    a14b.set_loras([(str(plain), 1.0)])
    assert on_experts(a14b) == {"high": 1, "low": 1}
    assert "style.safetensors goes on both experts: neither its metadata nor its name says" in caplog.text
    a14b.set_loras([(str(musubi_high), 1.0, "low")])  # `--lora-low`: the user's word over the file's
    assert on_experts(a14b) == {"high": 0, "low": 1}
    a14b.set_loras([LoraRequest(str(musubi_high), 1.0, "both", explicit=True)])  # fal's transformer: "both"
    assert on_experts(a14b) == {"high": 1, "low": 1}
    a14b.set_loras([(str(musubi_high), {"high": 1.0, "low": 0.5})])
    assert on_experts(a14b) == {"high": 1, "low": 1}


def test_placement_reads_ranges_it_can_trust_only():
    assert place({"modelspec.timestep_range": "900, 1000"}, "x.safetensors").expert == "high"
    assert place({"modelspec.timestep_range": "0,1000"}, "x.safetensors").expert is None  # all the steps
    assert place({"modelspec.timestep_range": "1000,0"}, "x.safetensors").expert is None  # not a range
    assert place({"modelspec.timestep_range": "high"}, "x_low_noise.safetensors").expert == "low"  # then the name
    assert place({"ss_base_model_version": "wan_2.2_5b"}, "x.safetensors").base_model == "Wan2.2 TI2V-5B"
    assert place({"ss_base_model_version": "wan"}, "x.safetensors").base_model is None  # musubi: every Wan model


def test_lora_inspect_shows_what_it_read_and_decided(tmp_path):
    path = tmp_path / "mystyle_high_noise.safetensors"
    write_lora(path, tiny_transformer(), "original-peft", metadata=AI_TOOLKIT)
    info = json.loads(run_cli("lora", "inspect", str(path), "--json").stdout)
    assert (info["expert"], info["metadata_base_model"]) == ("high", "Wan2.2 A14B")
    assert info["expert_reason"] == "its file name mystyle_high_noise.safetensors says high-noise"
    musubi = tmp_path / "motion.safetensors"
    write_lora(musubi, tiny_transformer(), "kohya", metadata={**MUSUBI, "modelspec.timestep_range": "0,875"})
    shown = run_cli("lora", "inspect", str(musubi))
    assert shown.returncode == 0, shown.stderr
    assert "the low-noise expert (Wan2.2 A14B): its modelspec.timestep_range 0,875 (musubi-tuner)" in shown.stdout
