"""The frictions a newcomer met (issue 31): each answered in the product, held here."""

from __future__ import annotations

import pytest

from wanlora.errors import InvalidInput
from wanlora.lora.selection import parse_requests
from wanlora.settings import LORA_STRENGTH_RANGE
from wanlora.sweep import sweep_axes

# ---------------------------------------------------------------------------- 1. strengths have a range


@pytest.mark.parametrize("strength", ["99", "1e30", "-11", "1,20"])
def test_the_cli_refuses_a_strength_outside_the_range_and_says_the_range(cli, tmp_path, strength):
    result = cli("generate", "a fox", "--model", "tiny", "--lora", f"style.safetensors:{strength}", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("wanlora: error: --lora=") and "a strength from -10 to 10" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "loras",
    [
        [("style.safetensors", 10.5)],
        [("style.safetensors", -1e6, "high")],
        [("style.safetensors", [1.0, 0.5, 40])],
        [("style.safetensors", {"high": 1.0, "low": -11})],
        [["style.safetensors", 1e30]],
    ],
    ids=["tuple", "aimed", "schedule", "experts", "list"],
)
def test_the_library_refuses_a_strength_outside_the_range(loras):
    with pytest.raises(InvalidInput, match="a strength from -10 to 10 \\(for style.safetensors\\)"):
        parse_requests(loras)


def test_the_range_ends_are_strengths_and_a_sweep_has_the_same_range():
    low, high = LORA_STRENGTH_RANGE
    assert [r.strength for r in parse_requests([("a", low), ("b", high), ("c", [low, high])])] == [
        low,
        high,
        (low, high),
    ]
    (request,) = parse_requests([("style.safetensors", 1.0)])
    with pytest.raises(InvalidInput, match="strengths=12.0 is not allowed: a strength from -10 to 10"):
        sweep_axes([request], strengths=[0, 1, 12.0])


# ---------------------------------------------------------------------------- 6. messages name real flags


@pytest.mark.parametrize(
    ("axes", "words"),
    [
        (
            ["--strengths", "0,1,2,3,4,5,6", "--seeds", "1,2,3,4,5,6"],
            "--strengths x --seeds is not allowed: 7 x 6 = 42 cells; a sweep makes at most 36",
        ),
        ([], "sweep axis is missing: one or two of --strengths, --strengths-2, --seeds, --prompts"),
        (
            ["--strengths", "0,1", "--strengths-2", "0,1", "--seeds", "1,2"],
            "--strengths and --strengths-2 and --seeds is not allowed: all at once",
        ),
    ],
    ids=["cells", "none", "three"],
)
def test_a_sweep_refused_names_its_flags(cli, tmp_path, axes, words):
    result = cli("sweep", "a fox", "--model", "tiny", "--lora", "a.safetensors", "--lora", "b.safetensors", *axes)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert words in line and "strengths_2" not in line, line


def test_the_accelerator_hint_on_a_tiny_pair_gives_the_whole_command(cli):
    result = cli("generate", "a fox", "--model", "tiny-t2v-a14b", "--accelerator", "lightx2v-4step")
    assert result.returncode == 2
    assert "`wanlora tiny-model DIR --kind t2v-a14b`, then use --model DIR" in result.stderr, result.stderr


def test_counts_are_proper_plurals():
    from wanlora.messages import plural

    assert [plural(1, "LoRA"), plural(2, "LoRA"), plural(0, "GPU")] == ["1 LoRA", "2 LoRAs", "0 GPUs"]


# ---------------------------------------------------------------------------- 8. a mistyped flag


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["generate", "a fox", "--lroa", "style.safetensors"], "--lroa: did you mean --lora?"),
        (["sweep", "a fox", "--stpes=3"], "--stpes: did you mean --steps?"),
        (["lora", "inspect", "style.safetensors", "--jsno"], "--jsno: did you mean --json?"),
        (["batch", "jobs.jsonl", "--out", "runs", "--ary"], "--ary: did you mean --ray?"),
    ],
)
def test_a_mistyped_flag_gets_the_nearest_flag_of_its_command(cli, args, hint):
    result = cli(*args)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("wanlora: error: unrecognized arguments: ") and line.endswith(hint), line


def test_a_flag_like_none_gets_no_guess(cli):
    result = cli("generate", "a fox", "--zzzzqq")
    assert result.returncode == 2 and "did you mean" not in result.stderr


# ---------------------------------------------------------------------------- 3 and 7. batch lines


def batch_line_error(cli, tmp_path, text: str) -> str:
    (tmp_path / "jobs.jsonl").write_text(text)
    result = cli("batch", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "runs"))
    assert result.returncode == 2 and not (tmp_path / "runs").exists()  # refused before any work
    (line,) = result.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (
            {"prompt": "a fox", "num_inference_steps": 2, "lora_scale": 0.5},
            "num_inference_steps is the library's; lora_scale is the predictor's",
        ),
        (
            {"prompt": "a fox", "model": "tiny", "lora_weights": "style.safetensors"},
            "model 'tiny' (the predictor's models: 14b, 1.3b, 2.2-a14b, 2.2-5b) is the library's; lora_weights is",
        ),
        (
            {"prompt": "a fox", "model": "1.3b", "flow_shift": 3, "width": 64},
            "flow_shift and width are the library's; model '1.3b' (the library's names: t2v-14b",
        ),
    ],
    ids=["fields", "tiny-with-predictor-fields", "predictor-model-with-library-fields"],
)
def test_a_line_mixing_the_two_forms_says_which_form_each_field_belongs_to(cli, tmp_path, line, words):
    import json

    error = batch_line_error(cli, tmp_path, json.dumps(line) + "\n")
    assert error.startswith("wanlora: error: jobs.jsonl line 1: a line is in the library's form or the predictor's")
    assert words in error, error


def test_a_pretty_printed_batch_gets_the_one_line_hint(cli, tmp_path):
    error = batch_line_error(cli, tmp_path, '{\n  "prompt": "a fox",\n  "model": "tiny"\n}\n')
    assert "jobs.jsonl line 1: not one JSON object" in error
    assert error.endswith("a job is one line of JSON (JSONL): an object spread over several lines is not one")


def test_every_lines_json_is_read_before_any_line_is_prepared(tmp_path, monkeypatch):
    from wanlora.errors import BatchLineError
    from wanlora.frontends import batch

    prepared = []
    monkeypatch.setattr(batch, "prepare_line", lambda *args: prepared.append(args) or pytest.fail("prepared"))
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a fox", "model": "tiny"}\n{"prompt": "a cat", "model": "tiny"}\n{"prompt": \n')
    with pytest.raises(BatchLineError, match="jobs.jsonl line 3: not one JSON object"):
        batch.read_jobs(jobs)
    assert prepared == []


# ---------------------------------------------------------------------------- 10. an interrupted batch


@pytest.mark.parametrize(("signum", "status"), [(2, 130), (15, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_batch_says_how_far_it_got_and_how_to_resume(tmp_path, signum, status):
    import json
    import subprocess
    import sys
    import time

    from .conftest import SMALL

    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": f"a fox, take {n}", "model": "tiny", "seed": n, **SMALL} for n in range(1, 7)]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "wanlora.frontends.cli", "batch", str(jobs), "--out", str(out)]
    running = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while running.poll() is None and time.monotonic() < deadline:
        if manifest.exists() and manifest.read_text().strip():
            break
        time.sleep(0.02)
    running.send_signal(signum)
    _, stderr = running.communicate(timeout=120)
    done = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert 1 <= len(done) < 6, "the batch was to be stopped part-way"
    assert running.returncode == status, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"wanlora: interrupted: {len(done)} of 6 done; run the same command again to resume", stderr


# ---------------------------------------------------------------------------- 4. what a person should know, without -v


def test_without_v_the_cli_says_the_seed_a_pairs_placement_and_each_loras_coverage_once(tmp_path):
    from wanlora.tiny import write_tiny_model

    from .conftest import run_cli

    model = write_tiny_model(tmp_path / "a14b", kind="t2v-a14b")
    result = run_cli("generate", "a fox", "--model", str(model), "--lora", f"{model}/loras/style.safetensors:0.7",
                     "--accelerator", "lightx2v-4step", "--steps", "4", "--frames", "5", "--width", "64",
                     "--height", "48", "--seed", "7", "-o", str(tmp_path / "fox.mp4"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("wanlora: ")]
    assert said[0] == "wanlora: seed 7 (--seed 7 makes this video again)", said
    pair = f"wanlora: {model}/accelerators/lightx2v-4step is a Wan2.2 pair: high_noise_model.safetensors on the "
    assert [line for line in said if line.startswith(pair)] == [
        pair + "high-noise expert, low_noise_model.safetensors on the low-noise expert"
    ]
    style = f"wanlora: LoRA {model}/loras/style.safetensors: changes 16/20 block linears in 2/2 blocks of "
    assert [line for line in said if line.startswith(style)] == [
        style + "tiny-t2v-a14b, on each of its two experts; original-Wan names, lora_down/up (ComfyUI, kijai), rank 4"
    ]
    assert sum("high-noise expert): changes 20/20" in line for line in said) == 1  # the accelerator's files
    assert sum("low-noise expert): changes 20/20" in line for line in said) == 1
    assert not [line for line in result.stderr.splitlines() if line.startswith("INFO ")]  # -v's lines stay in


def test_offload_auto_says_what_it_chose_for_this_gpu(monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    import torch

    from wanlora.logs import NOTICE
    from wanlora.models import CATALOGUE
    from wanlora.runtime import memory

    spec = CATALOGUE["t2v-14b"]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    with caplog.at_level(NOTICE, logger="wanlora"):
        plan = memory.gpu_plan(torch.device("cuda"), spec, "auto", "bf16", memory.catalogue_sizes(spec, "bf16"))
        memory.gpu_plan(torch.device("cuda"), spec, "model", "bf16", memory.catalogue_sizes(spec, "bf16"))
    notices = [r.getMessage() for r in caplog.records if r.levelno == NOTICE]
    assert notices == [f"offload auto: {plan.mode} on this 80 GiB GPU ({plan.why()})"]
    assert logging.getLevelName(NOTICE) == "NOTICE"


def test_the_cli_says_each_notice_once_and_as_wanlora():
    import io
    import logging

    from wanlora.logs import NOTICE, NoticeFormatter, Once

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(NoticeFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(Once())
    logger = logging.getLogger("wanlora.test-notices")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for strength in (0.0, 0.5, 1.0):  # a sweep's cells
            logger.log(NOTICE, "LoRA %s: changes all of it", "style")
            logger.info("applied style at strength %s", strength)
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "wanlora: LoRA style: changes all of it",
        *[f"INFO wanlora.test-notices: applied style at strength {s}" for s in (0.0, 0.5, 1.0)],
    ]


# ---------------------------------------------------------------------------- 9. models --memory


def test_models_memory_says_what_it_traces_and_explains_its_columns(cli, caplog):
    from wanlora.logs import NOTICE
    from wanlora.models import CATALOGUE

    with caplog.at_level(NOTICE, logger="wanlora"):  # the CLI's handler prints them as `wanlora: ...`
        result = cli("models", "--memory")
    assert result.returncode == 0, result.stderr
    assert [r.getMessage() for r in caplog.records if r.levelno == NOTICE] == [
        f"tracing {name}'s components on the meta device ({number} of {len(CATALOGUE)})"
        for number, name in enumerate(CATALOGUE, start=1)
    ]
    table, legend = result.stdout.rstrip("\n").split("\n\n")
    assert table.startswith("| variant | weights | GB | 24 GB GPU")
    assert legend.startswith("variant: the catalogue's name; weights: the transformer's dtype (--quantize); GB: ")
    assert "then the peak GPU memory / the host memory the weights take, in GB" in legend


def test_a_last_image_on_a_text_to_video_model_names_last_image(cli, tmp_path):
    result = cli("generate", "a fox", "--model", "tiny", "--last-image", "end.png", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("wanlora: error: --last-image='(an image)' is not allowed: tiny is text-to-video")
