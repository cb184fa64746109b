import re

import pytest

from wanlora.errors import InvalidInput
from wanlora.models import CATALOGUE, tiny_spec
from wanlora.options import GenerationOptions
from wanlora.request import resolve_settings

SPEC = tiny_spec()
GOOD = {
    "width": 64,
    "height": 48,
    "num_frames": 9,
    "num_inference_steps": 2,
    "fps": 12,
    "guidance_scale": 5.0,
    "seed": 1,
}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_frames", 10, "4k+1 between 5 and 81"),
        ("num_frames", 1, "4k+1 between 5 and 81"),
        ("num_frames", 85, "4k+1 between 5 and 81"),
        ("width", 65, "multiple of 16"),
        ("height", 8, "multiple of 16"),
        ("width", 4096, "multiple of 16 between 16 and 1920"),
        ("num_inference_steps", 0, "between 1 and 100"),
        ("num_inference_steps", 101, "between 1 and 100"),
        ("guidance_scale", -3, "between 0 and 20"),
        ("guidance_scale", float("nan"), "finite number"),
        ("fps", 0, "between 1 and 60"),
        ("fps", 61, "between 1 and 60"),
        ("flow_shift", 0, "between 0.1 and 20"),
        ("seed", -1, "between 0 and"),
        ("seed", 2**63, f"between 0 and {2**63 - 1}"),  # the bound as it is, not 9.22337e+18
        ("num_inference_steps", 2.5, "whole number"),
    ],
)
def test_each_bad_value_names_field_value_and_range(field, value, message):
    with pytest.raises(InvalidInput, match=re.escape(message)) as info:
        resolve_settings(SPEC, GenerationOptions("a fox", **{**GOOD, field: value}))
    assert info.value.field == field and (info.value.value == value or value != value)  # nan != nan
    assert field in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("prompt", ["", "   ", None])
def test_prompt_must_be_text(prompt):
    with pytest.raises(InvalidInput, match="prompt"):
        resolve_settings(SPEC, GenerationOptions(prompt, **GOOD))


def test_width_and_height_come_together():
    with pytest.raises(InvalidInput, match="together"):
        resolve_settings(SPEC, GenerationOptions("a fox", width=64))


def test_a_frame_past_the_models_position_table_is_refused_before_the_forward_would_fail():
    """A tiny stand-in's rotary table covers 32 patches a side (16 pixels each): 512 pixels; a published model's
    1024 patches cover every size the catalogue allows."""
    with pytest.raises(InvalidInput, match="width=832 is not allowed: at most 512 for tiny: its positions cover 32"):
        resolve_settings(SPEC, GenerationOptions("a fox", width=832, height=480))
    assert resolve_settings(SPEC, GenerationOptions("a fox", width=512, height=288)).width == 512
    big = CATALOGUE["t2v-14b"]
    assert resolve_settings(big, GenerationOptions("a fox", width=1280, height=720)).width == 1280


def test_defaults_follow_the_model():
    settings = resolve_settings(CATALOGUE["t2v-14b"], GenerationOptions("a fox", resolution="720p", seed=3))
    assert (settings.width, settings.height, settings.flow_shift) == (1280, 720, 5.0)
    assert (settings.num_frames, settings.fps, settings.num_inference_steps, settings.guidance_scale) == (
        81,
        16,
        50,
        5.0,
    )
    i2v = resolve_settings(CATALOGUE["i2v-14b-480p"], GenerationOptions("a fox", aspect_ratio="9:16"))
    assert (i2v.width, i2v.height, i2v.num_inference_steps, i2v.flow_shift) == (480, 832, 40, 3.0)
    with pytest.raises(InvalidInput, match="supports 480p only"):
        resolve_settings(CATALOGUE["t2v-1.3b"], GenerationOptions("a fox", resolution="720p"))


def test_random_seed_is_reported():
    seeds = {resolve_settings(SPEC, GenerationOptions("a fox", width=64, height=48)).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
