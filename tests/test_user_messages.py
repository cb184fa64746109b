"""A newcomer's first hour: each front end speaks in the user's own words, at once, and to the point."""

from __future__ import annotations

import fcntl
import inspect
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import wanlora
from wanlora import InvalidInput, WanLoraPipeline
from wanlora.frontends.service import PredictorInputs, VideoService

from .conftest import SMALL, run_cli
from .test_cli import FOX

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 1. each front end names its own field


def test_each_front_end_names_the_field_in_its_own_words(cli, tiny_pipe, tmp_path):
    assert (
        cli(*FOX, "--steps", "0", cwd=tmp_path).stderr
        == "wanlora: error: --steps=0 is not allowed: between 1 and 100\n"
    )
    with pytest.raises(InvalidInput) as library:
        tiny_pipe.generate("a fox", num_inference_steps=0)
    assert str(library.value) == "num_inference_steps=0 is not allowed: between 1 and 100"
    with pytest.raises(InvalidInput) as predictor:
        VideoService(override="tiny", i2v_override="").resolve(PredictorInputs(prompt="a fox", sample_steps=0))
    assert str(predictor.value) == "sample_steps=0 is not allowed: between 1 and 100"
    with pytest.raises(InvalidInput, match=r"^sample_guide_scale=30 is not allowed"):
        VideoService(override="tiny", i2v_override="").resolve(PredictorInputs(prompt="a fox", sample_guide_scale=30))


# ------------------------------------------------------------------ 2, 3. local paths


def test_a_missing_local_file_is_called_one_and_is_found_out_before_torch_loads(tmp_path):
    code = (
        "import sys; from wanlora.frontends.cli import main; "
        "code = main(['generate', 'a fox', '--lora', 'missing.safetensors']); "
        "print(code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr == (
        f"wanlora: error: {tmp_path / 'missing.safetensors'} does not exist: there is no such LoRA file here; "
        "check the path\n"
    )


def test_a_bad_strength_after_a_local_path_is_a_bad_strength(cli, tiny_dir, tmp_path):
    lora = tiny_dir / "accelerators" / "lightx2v-4step.safetensors"
    result = cli(*FOX, "--lora", f"{lora}:abc", cwd=tmp_path)
    assert result.stderr == (
        f"wanlora: error: --lora='{lora}:abc' is not allowed: REF:STRENGTH with a number after the last ':', "
        "not 'abc'\n"
    )
    folder = cli(*FOX, "--lora", f"{tiny_dir.name}/accelerators/missing.safetensors:0.5", cwd=tiny_dir.parent)
    assert "does not exist: there is no such LoRA file here" in folder.stderr  # a path, not a Hub repo


# ------------------------------------------------------------------ 4, 7. the parser


def test_verbose_goes_before_or_after_the_command(cli, tmp_path):
    for args in (["-v", *FOX, "--steps", "0"], [*FOX, "--steps", "0", "-v"]):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.endswith("--steps=0 is not allowed: between 1 and 100\n")


def test_every_generate_option_has_help_with_its_default_and_short_metavars(cli):
    from wanlora.frontends.cli import build_parser

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    options = [a for a in generate._actions if a.option_strings and a.dest not in ("help", "verbose")]
    assert len(options) > 25
    for action in options:
        assert action.help and "default" in action.help, action.option_strings
        assert action.metavar is None or len(action.metavar) <= 8, action.metavar
    shown = cli("generate", "--help").stdout
    assert "--steps N" in shown and "NUM_INFERENCE_STEPS" not in shown
    assert "default t2v-14b" in shown
    for group in ("model and LoRAs:", "what to generate:", "sampling:", "device, speed and memory:", "output:"):
        assert group in shown


# ------------------------------------------------------------------ 5. generate() takes real keywords


def test_generate_has_real_keywords_and_names_old_and_misspelt_ones(tiny_pipe):
    parameters = inspect.signature(WanLoraPipeline.generate).parameters
    assert {"num_inference_steps", "guidance_scale", "flow_shift", "negative_prompt", "loras", "seed"} <= set(
        parameters
    )
    assert {"seeds", "prompts", "strengths", "loras", "width"} <= set(
        inspect.signature(WanLoraPipeline.sweep).parameters
    )
    with pytest.raises(InvalidInput, match="^steps=3 is not allowed: renamed in wanlora 0.2: use num_inference_steps$"):
        tiny_pipe.generate("a fox", steps=3)
    with pytest.raises(InvalidInput, match="did you mean num_inference_steps"):
        tiny_pipe.generate("a fox", num_inference_step=3)
    with pytest.raises(InvalidInput, match="did you mean flow_shift"):
        tiny_pipe.generate("a fox", shfit=3)


# ------------------------------------------------------------------ 6. inspect reports a misfit


def test_inspect_reports_a_lora_for_another_model_as_a_result(tiny_dir, cli):
    lora = str(tiny_dir / "accelerators" / "lightx2v-4step.safetensors")
    result = cli("lora", "inspect", lora, "--model", "t2v-1.3b")
    assert result.returncode == 0, result.stderr
    verdict = next(line for line in result.stdout.splitlines() if "does not fit" in line)
    assert "made for an unknown Wan model (dim 24)" in verdict and len(verdict) < 200
    details = __import__("json").loads(cli("lora", "inspect", lora, "--model", "t2v-1.3b", "--json").stdout)
    coverage = details["coverage"]
    assert coverage["fits"] is False and coverage["misfit"] and coverage["verdict"].startswith("does not fit")


def test_inspect_is_a_library_call_that_returns_a_report(tiny_dir, tiny_pipe):
    from wanlora.lora.inspect import inspect_lora

    [report] = inspect_lora(
        str(tiny_dir / "accelerators" / "lightx2v-4step.safetensors"), tiny_pipe.transformer, "tiny"
    )
    assert report.coverage.fits and report.coverage.blocks_touched == report.coverage.blocks_total == 2
    assert "lora" in report.delta_kinds and report.as_dict()["coverage"]["model"] == "tiny"


# ------------------------------------------------------------------ 8. the docs say Wan2.2 too


def test_the_package_describes_itself_as_wan21_and_wan22():
    assert "Wan2.2" in wanlora.__doc__
    assert "Wan2.2" in (ROOT / "pyproject.toml").read_text().split("description = ", 1)[1].splitlines()[0]
    assert "multiples of 16" not in (ROOT / "wanlora" / "settings.py").read_text()


# ------------------------------------------------------------------ 9. what is happening, at once


def test_a_terminal_hears_what_happens_at_once_and_sees_one_progress_display(tiny_dir, tmp_path):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws to the width
    args = [a if a != "tiny" else str(tiny_dir) for a in FOX]
    started = time.monotonic()
    command = [sys.executable, "-m", "wanlora.frontends.cli", *args, "-o", str(tmp_path / "f.mp4")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=terminal, cwd=tmp_path)
    os.close(terminal)
    seen, first_at = b"", None
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        try:
            chunk = os.read(controller, 4096) if ready else b""
        except OSError:  # the process closed the terminal
            chunk = b""
        if not chunk:
            break
        first_at = first_at or time.monotonic() - started
        seen += chunk
    assert process.wait(60) == 0
    text = seen.decode(errors="replace")
    assert text.startswith("wanlora: importing torch and diffusers...") and first_at < 3, (first_at, text)
    assert "loading tiny" in text and "denoising" in text
    for theirs in ("Loading weights", "Loading pipeline components", "Writing model shards"):
        assert theirs not in text


def test_tiny_model_shows_none_of_the_libraries_bars(tmp_path):
    result = run_cli("tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0 and "shards" not in result.stderr and "Loading" not in result.stderr


# ------------------------------------------------------------------ 10, 11, 12. wording


def test_tiny_accelerators_point_at_the_tiny_model_folder(cli, tmp_path):
    result = cli(*FOX, "--accelerator", "lightx2v-4step", cwd=tmp_path)
    assert "write it with `wanlora tiny-model DIR --kind t2v`, then use --model DIR" in result.stderr


def test_the_readmes_inspect_example_uses_a_file_the_newcomer_has():
    readme = (ROOT / "README.md").read_text()
    examples = [line for line in readme.splitlines() if "wanlora lora inspect" in line and " REF " not in line]
    assert examples and all(("tiny-wan/accelerators/" in line or "tiny-wan/loras/" in line) for line in examples)


def test_a_missing_image_is_missing_and_an_aimed_lora_says_what_to_do(cli, tmp_path):
    assert cli("generate", "a fox", "--model", "tiny-i2v", cwd=tmp_path).stderr == (
        "wanlora: error: --image is missing: tiny-i2v is image-to-video and needs a start image\n"
    )
    assert cli(*FOX, "--lora-high", "x.safetensors", cwd=tmp_path).stderr == (
        "wanlora: error: --lora-high='x.safetensors' is not allowed: for Wan2.2 A14B's experts; tiny has one "
        "transformer: use --lora\n"
    )
    with pytest.raises(InvalidInput, match="^image is missing: "):
        WanLoraPipeline.from_pretrained("tiny-i2v").generate("a fox")


@pytest.mark.slow
def test_verbose_logs_each_lora_once_without_saying_its_expert_twice(tmp_path, caplog):
    import logging

    from wanlora.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / "a14b", kind="t2v-a14b")
    caplog.set_level(logging.INFO, logger="wanlora")
    pipe = WanLoraPipeline.from_pretrained(str(folder))
    pipe.generate("a fox", loras=[(str(folder / "accelerators" / "lightx2v-4step"), 1.0)], **SMALL, progress=False)
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applied ")]
    assert len(applied) == 2  # one line per file of the pair
    for line in applied:
        assert line.count("noise expert") == 1, line
