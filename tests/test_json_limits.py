"""JSON past what Python's parser follows: nested thousands deep (RecursionError) or a number of thousands of
digits (a plain ValueError, Python's integer-string limit), not a JSONDecodeError. From a person (fal's list, a
batch line) it is refused in our words; inside a LoRA file it is a format error, or, in an optional hint (the
trigger words), no hint at all: never "a bug"."""

from __future__ import annotations

import json
import struct

import pytest

from wanlora.errors import BatchLineError, InvalidInput, LoraFormatError
from wanlora.frontends.batch import read_jobs
from wanlora.frontends.service import PredictorInputs, VideoService
from wanlora.lora.layouts import read_lora
from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .lora_helpers import fetch_lora

DEEP = "[" * 100_000
LONG_NUMBER = "9" * 5_000
PAST_THE_PARSER = pytest.mark.parametrize("text", [DEEP, LONG_NUMBER], ids=["deep", "long-number"])


@PAST_THE_PARSER
def test_the_predictors_loras_list_is_refused_by_name(text):
    with pytest.raises(InvalidInput, match=r"^loras=.*JSON") as info:
        VideoService(override="", i2v_override="").resolve(PredictorInputs(prompt="a fox", loras=text))
    assert len(str(info.value)) < 300


@PAST_THE_PARSER
def test_a_batch_line_is_refused_by_its_number(text, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    line = text if text is DEEP else json.dumps({"prompt": "a fox", "model": "tiny"})[:-1] + f', "seed": {text}}}'
    jobs.write_text(json.dumps({"prompt": "a fox", "model": "tiny"}) + "\n" + line + "\n")
    with pytest.raises(BatchLineError, match="line 2") as info:
        read_jobs(jobs)
    assert len(str(info.value)) < 300


def test_a_header_with_a_number_of_thousands_of_digits_is_a_format_error(tmp_path):
    raw = ('{"w": {"dtype": "F32", "shape": [' + LONG_NUMBER + '], "data_offsets": [0, 8]}}').encode()
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(LoraFormatError, match="liar.safetensors"):
        fetch_lora(str(path))


@PAST_THE_PARSER
@pytest.mark.parametrize("key", ["trigger_phrase", "ss_tag_frequency"])
def test_trigger_words_past_the_parser_are_no_hint_and_the_lora_still_loads(key, text, tmp_path):
    path = tmp_path / "hinted.safetensors"
    write_lora(path, tiny_transformer(), "kohya", metadata={key: text}, seed=1)
    fetched = fetch_lora(str(path))
    assert fetched.trigger_words == []  # kept as a phrase, it is past a word's length
    assert read_lora(path).deltas


@PAST_THE_PARSER
def test_a_peft_config_past_the_parser_is_a_format_error(text, tmp_path):
    path = tmp_path / "peft.safetensors"
    write_lora(path, tiny_transformer(), "diffusers", metadata={"lora_adapter_metadata": text}, seed=1)
    with pytest.raises(LoraFormatError, match="lora_adapter_metadata"):
        read_lora(path)
