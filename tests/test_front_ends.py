"""The third adversarial pass, front-end half: each problem it found in batches, sweeps, the predictor and
the errors they show, reproduced. (The classes behind them are closed in test_isolation.py and
test_fuzz_inputs.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanlora import WanLoraPipeline
from wanlora.batch import read_jobs
from wanlora.errors import InvalidInput, WanLoraError
from wanlora.service import PredictorInputs, VideoService

from .conftest import SMALL

URL = "https://user:PASSWORD@host.example/x.safetensors?token=SECRET"
HIDDEN = ("PASSWORD", "SECRET")


def write_jobs(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def assert_scrubbed(message: str) -> None:
    assert not any(word in message for word in HIDDEN), message
    assert len(message) < 2000


# ------------------------------------------------------------------ 9. values with secrets echoed in errors

LORAS_ECHOED = {
    "a list in a list": [[URL]],
    "4 elements": [[URL, 1.0, "both", "x"]],
    "a dict item": [{"ref": URL}],
    "a dict strength": [[URL, {"x": URL}]],
}


@pytest.mark.parametrize("case", list(LORAS_ECHOED))
def test_a_malformed_lora_item_holding_a_link_is_echoed_scrubbed(case, tiny_pipe, tmp_path, cli):
    loras = LORAS_ECHOED[case]
    with pytest.raises(InvalidInput) as python:
        tiny_pipe.generate("a fox", loras=loras, **SMALL)
    assert_scrubbed(str(python.value))
    assert "host.example/x.safetensors" in str(python.value)  # still says which input
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a fox", "model": "tiny", "loras": loras}])
    batch = cli("batch", str(jobs), "--out", str(tmp_path / "out"))
    assert batch.returncode == 2 and "jobs.jsonl line 1: lora" in batch.stderr
    assert_scrubbed(batch.stderr + batch.stdout)


def test_an_unknown_batch_field_holding_a_link_or_a_token_is_named_not_echoed(tmp_path, cli):
    for line in ({"prompt": "a fox", "model": "tiny", "lora_url": URL}, {"prompt": "a fox", URL: 1},
                 {"prompt": "a fox", "civitai_tokn": "c0ffee" * 6}):  # fmt: skip
        result = cli("batch", str(write_jobs(tmp_path / "jobs.jsonl", [line])), "--out", str(tmp_path / "out"))
        assert result.returncode == 2 and "not an option of a batch line" in result.stderr
        assert_scrubbed(result.stderr)
        assert "c0ffee" not in result.stderr


def test_generate_and_the_predictor_echo_links_scrubbed(cli, tmp_path, tiny_dir):
    result = cli("generate", "a fox", "--model", "tiny", "--lora", "style.safetensors:token=SECRET", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("wanlora: error: --lora=")
    assert_scrubbed(result.stderr)
    result = cli("generate", "a fox", "--model", URL, cwd=tmp_path)
    assert result.returncode == 2 and "is not a catalogue variant" in result.stderr
    assert_scrubbed(result.stderr)
    service = VideoService(override=str(tiny_dir), i2v_override="")
    for inputs in ({"accelerator": [URL]}, {"model": {URL: 1}}, {"fast_mode": (URL,)}, {"lora_weights": [URL]}):
        with pytest.raises(InvalidInput) as refused:
            service.generate(PredictorInputs(prompt="a fox", **inputs), tmp_path)
        assert_scrubbed(str(refused.value))


# ------------------------------------------------------------------ 10. a model or accelerator of the wrong type


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", ["tiny"]), ("model", {"name": "tiny"}), ("accelerator", ["causvid"]), ("accelerator", {"a": 1})],
)
def test_a_model_or_accelerator_of_the_wrong_type_is_an_input_error(field, value, tmp_path, cli, tiny_pipe):
    line = {"prompt": "a fox", "model": "tiny", field: value}
    result = cli("batch", str(write_jobs(tmp_path / "jobs.jsonl", [line])), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert f"jobs.jsonl line 1: {field}=" in result.stderr and "a bug" not in result.stderr
    with pytest.raises(InvalidInput, match=f"^{field}="):
        if field == "accelerator":
            tiny_pipe.generate("a fox", accelerator=value, **SMALL)
        else:
            WanLoraPipeline.from_pretrained(value)
    with pytest.raises(WanLoraError, match=f"line 1: {field}="):
        read_jobs(tmp_path / "jobs.jsonl")
