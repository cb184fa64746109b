"""The README and docs/ say what the code does: the quick start runs as written, every link resolves,
the snippets run, and the tiny model carries LoRAs to try them on."""

from __future__ import annotations

import numpy as np
from safetensors import safe_open

from wanlora import WanLoraPipeline
from wanlora.lora.layouts import read_lora

from .conftest import SMALL


def test_a_tiny_model_carries_two_loras_in_published_layouts(tiny_dir):
    style, motion = tiny_dir / "loras" / "style.safetensors", tiny_dir / "loras" / "motion.safetensors"
    with safe_open(str(style), "pt") as file:
        assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in file.keys()
    with safe_open(str(motion), "pt") as file:
        assert "lora_unet_blocks_0_ffn_0.lora_up.weight" in file.keys()
    assert read_lora(style).layout == "original-Wan names, lora_down/up (ComfyUI, kijai)"
    assert read_lora(motion).layout == "kohya / musubi-tuner"
    assert {kind.split(".")[0] for kind in read_lora(style).module_kinds} == {"attn1", "attn2"}
    assert set(read_lora(motion).module_kinds) == {"ffn.net.0.proj", "ffn.net.2"}

    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir))
    base = pipe.generate("a fox", **SMALL, seed=1, progress=False)
    both = pipe.generate("a fox", **SMALL, seed=1, loras=[(str(style), 0.8), (str(motion), 0.5)], progress=False)
    assert base is not None and both is not None
    assert not np.array_equal(base.frames, both.frames)
