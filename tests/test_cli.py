import numpy as np
import pytest

from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .conftest import file_size_limit, probe, recorded, run_cli

FOX = [
    "generate",
    "a fox",
    "--model",
    "tiny",
    "--frames",
    "9",
    "--width",
    "64",
    "--height",
    "48",
    "--steps",
    "2",
    "--fps",
    "12",
    "--seed",
    "7",
]


def fox_with_preset_steps(model) -> list[str]:
    """FOX on the model folder `model`, its step count left to an accelerator preset."""
    fox = [arg for arg in FOX if arg not in ("--steps", "2")]
    fox[fox.index("tiny")] = str(model)
    return fox


def test_generate_writes_the_requested_mp4_and_is_deterministic(tmp_path):
    first = run_cli(*FOX, "-o", str(tmp_path / "a.mp4"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == str(tmp_path / "a.mp4")
    assert "denoising" in first.stderr  # the tqdm bar
    got = probe(tmp_path / "a.mp4")
    assert (got.codec, got.pix_fmt, got.width, got.height, got.fps, len(got.frames)) == (
        "h264",
        "yuv420p",
        64,
        48,
        12.0,
        9,
    )
    tags = recorded(tmp_path / "a.mp4")
    assert (tags["seed"], tags["model"], tags["prompt"]) == (7, "tiny", "a fox") and "wanlora" in tags

    second = run_cli(*FOX, "-o", str(tmp_path / "b.mp4"))
    assert second.returncode == 0, second.stderr
    assert np.array_equal(probe(tmp_path / "b.mp4").frames, got.frames)


@pytest.mark.parametrize(
    ("flag", "value", "line"),
    [
        ("--frames", "10", "--frames=10 is not allowed: 4k+1 between 5 and 81 (5, 9, 13, ... 81)"),
        ("--width", "65", "--width=65 is not allowed: a multiple of 16 between 16 and 1920 pixels"),
        ("--steps", "0", "--steps=0 is not allowed: between 1 and 100"),
        ("--guidance", "30", "--guidance=30.0 is not allowed: between 0 and 20"),
        ("--fps", "0", "--fps=0 is not allowed: between 1 and 60"),
        ("--quality", "101", "--quality=101 is not allowed: a whole number between 0 (smallest file) and 100 (best)"),
        ("--shift", "0", "--shift=0.0 is not allowed: between 0.1 and 20"),
        ("--model", "t2v-7b", "model 't2v-7b' is not a catalogue variant"),
        ("-o", "out.gif", "--output='out.gif': the output must end in .mp4"),
    ],
)
def test_user_errors_name_the_flag_typed_in_one_line_exit_2_and_write_nothing(cli, tmp_path, flag, value, line):
    args = list(FOX)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wanlora: error: {line}"), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flag", "value"), [("--seed", "x"), ("--resolution", "4k")])
def test_argparse_refusals_are_one_line_too(cli, tmp_path, flag, value):
    result = cli(*FOX, flag, value, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and f"argument {flag}" in lines[0]


def test_resolution_on_small_model_says_why(tmp_path):
    result = run_cli("generate", "a fox", "--model", "t2v-1.3b", "--resolution", "720p", cwd=tmp_path)
    assert result.returncode == 2 and "t2v-1.3b supports 480p only" in result.stderr


def test_tiny_model_writes_the_diffusers_layout_and_generates_from_it(tmp_path):
    folder = tmp_path / "tiny"
    made = run_cli("tiny-model", str(folder))
    assert made.returncode == 0, made.stderr
    for part in [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ]:
        assert (folder / part).is_file(), part
    again = run_cli("tiny-model", str(folder))
    assert again.returncode == 2 and "empty folder" in again.stderr
    args = [a if a != "tiny" else str(folder) for a in FOX]
    result = run_cli(*args, "-o", str(tmp_path / "x.mp4"))
    assert result.returncode == 0, result.stderr
    assert len(probe(tmp_path / "x.mp4").frames) == 9


def test_help_says_tiny_makes_noise():
    result = run_cli("generate", "--help")
    assert "noise, not art" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("civitai:12345", ("civitai:12345", 1.0)),
        ("civitai:12345:0.5", ("civitai:12345", 0.5)),
        ("owner/repo/style.safetensors:-0.3", ("owner/repo/style.safetensors", -0.3)),
        ("style.safetensors:1,0.5", ("style.safetensors", (1.0, 0.5))),
        ("https://host/x.safetensors", ("https://host/x.safetensors", 1.0)),
        ("https://host:8443/x.safetensors:0.7", ("https://host:8443/x.safetensors", 0.7)),
    ],
)
def test_lora_arguments_split_at_a_numeric_strength_only(text, parsed):
    from wanlora.frontends.cli import parse_lora_arg

    assert parse_lora_arg(text) == parsed


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--lora", "style.safetensors:nan"], "--lora=nan is not allowed: a finite number (for style.safetensors)"),
        (["-o", "missing/x.mp4"], "folder missing does not exist"),
        (["-o", "/sys/x.mp4"], "cannot write there"),
        (["--quality", "101"], "--quality=101"),
        (["--prompt-file-that-does-not-exist"], "unrecognized arguments"),
    ],
    ids=["strength", "missing-folder", "read-only-folder", "quality", "usage"],
)
def test_bad_arguments_are_refused_before_the_model_loads(cli, tmp_path, args, words):
    """t2v-14b is not reachable here: only an error raised before loading can name the argument."""
    result = cli("generate", "a fox", "--model", "t2v-14b", *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("device", "words"), [("cuda", "this machine has no CUDA GPU"), ("foo", "cpu, cuda")])
def test_a_device_this_machine_lacks_is_one_line(tmp_path, device, words):
    result = run_cli(*FOX, "--device", device, cwd=tmp_path)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_bad_environment_variable_is_named(tmp_path):
    lora = tmp_path / "style.safetensors"
    write_lora(lora, tiny_transformer(), "original")
    result = run_cli(*FOX, "--lora", str(lora), cwd=tmp_path, env={"WANLORA_MAX_LORA_GB": "lots"})
    assert result.returncode == 2 and "WANLORA_MAX_LORA_GB='lots' is not allowed" in result.stderr


def test_a_full_disk_fails_in_one_line_and_leaves_no_mp4(tmp_path):
    result = run_cli(*FOX, "-o", str(tmp_path / "fox.mp4"), preexec_fn=file_size_limit(3000))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("wanlora: error: ffmpeg could not write") and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".fox*"))


def test_a_reader_that_stops_reading_is_not_an_error():
    # `wanlora models | head -1`: the pipe is closed before wanlora writes to it
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "wanlora.frontends.cli", "models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert stderr == ""


def test_an_existing_output_is_kept_unless_overwrite_is_given(cli, tmp_path):
    (tmp_path / "fox.mp4").write_bytes(b"yesterday's video")
    refused = cli(*FOX, "-o", "fox.mp4", cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "--output='fox.mp4' is not allowed: a file that is not there yet (--overwrite replaces it)" in lines[0]
    assert (tmp_path / "fox.mp4").read_bytes() == b"yesterday's video"
    assert [path.name for path in tmp_path.iterdir()] == ["fox.mp4"]
    replaced = cli(*FOX, "-o", "fox.mp4", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert len(probe(tmp_path / "fox.mp4").frames) == 9
