import numpy as np
import pytest

from .conftest import comment_tags, probe, run_cli

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
    tags = comment_tags(got.tags)
    assert (tags["seed"], tags["model"], tags["prompt"]) == (7, "tiny", "a fox") and "wanlora" in tags

    second = run_cli(*FOX, "-o", str(tmp_path / "b.mp4"))
    assert second.returncode == 0, second.stderr
    assert np.array_equal(probe(tmp_path / "b.mp4").frames, got.frames)


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--frames", "10", "num_frames"),
        ("--width", "65", "width"),
        ("--steps", "0", "steps"),
        ("--guidance", "-3", "guidance_scale"),
        ("--fps", "0", "fps"),
        ("--resolution", "4k", "resolution"),
        ("--model", "t2v-7b", "t2v-7b"),
        ("--seed", "x", "seed"),
        ("-o", "out.gif", "--output"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path, flag, value, field):
    args = list(FOX)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


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
