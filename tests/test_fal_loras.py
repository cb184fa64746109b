"""fal's `loras` list ({path, scale, transformer}, fal-js LoRAWeight) in the predictor's service, the Python API
and batch lines: the same checks as the named slots, and an omitted `transformer` left to the file."""

from __future__ import annotations

import json

import pytest

from wanlora.errors import InvalidInput
from wanlora.frontends.batch import read_jobs
from wanlora.frontends.service import PredictorInputs, VideoService
from wanlora.lora.selection import LoraRequest, parse_requests

SERVICE = VideoService(override="", i2v_override="")


def listed(loras, **inputs):
    text = loras if isinstance(loras, str) else json.dumps(loras)
    return SERVICE.resolve(PredictorInputs(prompt="a fox", model="2.2-a14b", loras=text, **inputs)).request.loras


def test_the_list_stacks_with_the_slots_each_item_on_its_transformer():
    got = listed(
        [
            {"path": "alice/motion", "scale": 3, "transformer": "high"},
            {"path": "alice/styles", "weight_name": "ink.safetensors", "scale": 0.5, "transformer": "both"},
            {"path": "https://example.com/wan22_low_noise.safetensors"},
        ],
        lora_weights="bob/style",
    )
    assert [(r.ref, r.strength, r.expert, r.explicit) for r in got] == [
        ("bob/style", 1.0, "both", False),
        ("alice/motion", 3.0, "high", True),
        ("alice/styles/ink.safetensors", 0.5, "both", True),  # fal's "both": kept on both whatever the file says
        ("https://example.com/wan22_low_noise.safetensors", 1.0, "both", False),  # left to the file (docs/cog.md)
    ]
    assert listed("") == listed("[]") == ()  # empty: no list


@pytest.mark.parametrize(
    ("loras", "words"),
    [
        ([{"path": "bob/style"}], "loras='bob/style' is not allowed: a LoRA not given in a lora_weights slot"),
        ([{"path": "a/b", "strength": 1}], "fal's keys path, scale, transformer, weight_name only, not strength"),
        ([{"scale": 1}], "a LoRA reference"),
        ([{"path": "a/b", "transformer": "High"}], "high, low or both"),
        ([{"path": "a/b", "scale": 4}], "between -1 and 3"),
        ([{"path": "https://x.org/a.safetensors", "weight_name": "b.safetensors"}], "not a Hugging Face repo id"),
        ([{"path": "a/b"}] * 9, "at most 8"),
        ({"path": "a/b"}, "a JSON list of"),
        ("[{path: 1}]", "not JSON"),
    ],
)
def test_each_wrong_item_is_refused_naming_it(loras, words):
    with pytest.raises(InvalidInput) as caught:
        listed(loras, lora_weights="bob/style")
    assert words in str(caught.value)


def test_a_token_in_a_path_never_reaches_an_error():
    with pytest.raises(InvalidInput) as caught:
        listed([{"path": "https://example.com/a.safetensors?token=SECRET-TOKEN", "transformer": "middle"}])
    assert "SECRET" not in str(caught.value)


def test_the_python_api_and_batch_lines_take_fals_items_too(tmp_path):
    (request,) = parse_requests([{"path": "a/b", "scale": 0.7, "transformer": "low"}])
    assert request == LoraRequest("a/b", 0.7, "low", explicit=True)
    (tmp_path / "mine_high_noise.safetensors").write_bytes(b"")
    lines = [
        {"prompt": "a fox", "model": "t2v-a14b", "loras": [{"path": "mine_high_noise.safetensors", "scale": 0.5}]},
        {"prompt": "a fox", "model": "2.2-a14b", "loras": json.dumps([{"path": "a/b", "transformer": "high"}])},
    ]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    library, predictor = read_jobs(jobs_file)
    (mine,) = library.prepared.request.loras
    assert (mine.ref, mine.strength, mine.expert) == (str(tmp_path / "mine_high_noise.safetensors"), 0.5, "both")
    assert [(r.ref, r.expert) for r in predictor.prepared.request.loras] == [("a/b", "high")]
