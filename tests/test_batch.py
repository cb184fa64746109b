"""Batches: every line checked first, grouped by model and LoRA set, a manifest, and resuming."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wanlora import WanLoraPipeline
from wanlora.errors import BatchLineError, InvalidInput
from wanlora.frontends.batch import JobRunner, Manifest, read_jobs, run_batch, run_order
from wanlora.tiny import tiny_transformer

from .builders import block_linears, write_lora
from .conftest import probe, recorded
from .servers import FileServer, Route

ROOT = Path(__file__).resolve().parent.parent
STEPS = {"num_frames": 9, "num_inference_steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch-loras")
    model = tiny_transformer()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    made = {}
    for name, layout, seed in (("style", "original", 3), ("motion", "kohya", 4)):
        made[name] = str(folder / f"{name}.safetensors")
        write_lora(made[name], model, layout, seed=seed, targets=block_linears(shapes, [0]))
    return made


def eight_jobs(loras) -> list[dict]:
    """8 jobs over 2 models and 3 LoRA sets (style at 1, motion at 0.5, none), interleaved."""
    style, motion = [[loras["style"], 1.0]], [[loras["motion"], 0.5]]
    plan = [("tiny", style), ("tiny-t2v-a14b", style), ("tiny", motion), ("tiny", style),
            ("tiny-t2v-a14b", []), ("tiny", []), ("tiny-t2v-a14b", style), ("tiny", motion)]  # fmt: skip
    return [
        {"prompt": f"a fox, take {n}", "model": model, "loras": set_, "seed": n, **STEPS, "output": f"fox-{n}.mp4"}
        for n, (model, set_) in enumerate(plan, start=1)
    ]


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


@pytest.mark.slow
def test_jobs_run_grouped_by_model_then_lora_set_each_model_loaded_once(loras, tmp_path, monkeypatch):
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", eight_jobs(loras)))
    assert [job.line for job in run_order(jobs)] == [1, 4, 3, 8, 6, 2, 7, 5]

    loads = []
    original = WanLoraPipeline.from_pretrained.__func__
    monkeypatch.setattr(
        WanLoraPipeline, "from_pretrained", classmethod(lambda cls, m, **kw: loads.append(m) or original(cls, m, **kw))
    )
    runner = JobRunner()
    summary = run_batch(jobs, tmp_path / "out", runner=runner, progress=False)
    assert loads == ["tiny", "tiny-t2v-a14b"] and runner.resident.loads == loads
    assert (summary.done, summary.skipped, summary.failed, summary.exit_status) == (8, 0, [], 0)

    entries = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [e["line"] for e in entries] == list(range(1, 9))  # compacted in the file's order
    for entry, job in zip(entries, eight_jobs(loras), strict=True):
        path = tmp_path / "out" / job["output"]
        assert entry["status"] == "done" and entry["seed"] == job["seed"] and entry["bytes"] == path.stat().st_size
        assert recorded(path)["seed"] == job["seed"] and entry["timings"]["denoising_seconds"] > 0

    pipe = WanLoraPipeline.from_pretrained("tiny")  # a batch's video is the one a single generate gives
    third = eight_jobs(loras)[2]
    single = pipe.generate(third["prompt"], loras=third["loras"], seed=3, **STEPS)
    assert np.array_equal(probe(single.save(tmp_path / "single.mp4")).frames, probe(tmp_path / "out/fox-3.mp4").frames)


@pytest.mark.slow
def test_each_lora_set_is_merged_once(loras, tmp_path, monkeypatch):
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [j for j in eight_jobs(loras) if j["model"] == "tiny"]))
    runner = JobRunner()
    sets = []
    original = WanLoraPipeline.set_loras
    monkeypatch.setattr(
        WanLoraPipeline,
        "set_loras",
        lambda self, requests, *a: sets.append(tuple(requests)) or original(self, requests, *a),
    )
    run_batch(jobs, tmp_path / "out", runner=runner, progress=False)
    changes = [b for a, b in zip([None, *sets], sets, strict=False) if a != b]
    assert len(sets) == 5 and len(changes) == 3  # style, motion, none: each set once


def test_a_killed_batch_resumes_where_it_stopped_and_skips_what_was_done(loras, tmp_path):
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", eight_jobs(loras)), tmp_path / "out"
    command = [sys.executable, "-m", "wanlora.frontends.cli", "batch", str(jobs), "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = {json.loads(line)["output"]: json.loads(line) for line in manifest.read_text().splitlines()}
    assert 3 <= len(done) < 8, "the batch was to be killed half-way"
    before = {name: (out / name).stat().st_mtime_ns for name in done}

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"8 jobs: {8 - len(done)} done, {len(done)} already done, 0 failed" in second.stdout
    assert {name: (out / name).stat().st_mtime_ns for name in done} == before  # not run again
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(entries) == 8 and all(e["status"] == "done" for e in entries)
    assert all(Manifest(out).finished(job, out) for job in read_jobs(jobs))

    (out / "fox-2.mp4").write_bytes(b"")  # a damaged output is run again, alone
    third = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "8 jobs: 1 done, 7 already done, 0 failed" in third.stdout and probe(out / "fox-2.mp4").width == 64


@pytest.mark.slow
def test_a_failed_job_does_not_stop_the_others_and_the_exit_status_says_some_failed(loras, tmp_path, cli):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    jobs = eight_jobs(loras)[:3]
    jobs[1] = {**jobs[1], "loras": [[str(broken), 1.0]]}
    result = cli("batch", str(write_jobs(tmp_path / "jobs.jsonl", jobs)), "--out", str(tmp_path / "out"))
    assert result.returncode == 3, result.stderr  # "some jobs failed": neither 1 (a bug) nor 2 (an input error)
    assert "3 jobs: 2 done, 0 already done, 1 failed (line 2)" in result.stdout
    entries = [json.loads(line) for line in (tmp_path / "out/manifest.jsonl").read_text().splitlines()]
    entry = entries[1]
    assert entry["status"] == "failed" and "broken.safetensors" in entry["error"] and entry["seed"] == 2
    assert not (tmp_path / "out/fox-2.mp4").exists() and (tmp_path / "out/fox-3.mp4").exists()


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"hf_api_token": "hf_secret" "prompt": "x"}', "line 2: not one JSON object (Expecting ','"),
        ('["a fox"]', "line 2: a JSON list, not one object of a request's fields"),
        ('{"prompt": "a fox", "model": "tiny", "num_frames": 500}', "line 2: num_frames=500"),
        ('{"prompt": "a fox", "model": "tiny", "shfit": 3}', "not an option of a batch line; did you mean flow_shift?"),
        ('{"prompt": "a fox", "model": "tiny", "output": "../x.mp4"}', "line 2: output has an empty, '.' or '..' part"),
        ('{"prompt": "a fox", "model": "tiny", "output": "x.gif"}', "line 2: output='x.gif'"),
        ('{"prompt": "a fox", "model": "tiny", "quality": 101}', "line 2: quality=101"),
        ('{"prompt": "a fox", "model": "nope"}', "line 2: model 'nope' is not a catalogue variant"),
        ('{"prompt": "a fox", "model": "tiny", "output": "job-0001.mp4"}', "output 'job-0001.mp4' is line 1's as well"),
        ('{"prompt": "a fox", "lora_weights": "./missing.safetensors"}', "missing.safetensors does not exist"),
        ('{"prompt": "", "model": "14b"}', "line 2: prompt=''"),
    ],
)  # fmt: skip
def test_every_line_is_checked_before_any_work_and_errors_name_the_line(tmp_path, cli, line, words):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a fox", "model": "tiny"}\n' + line + "\n")
    with pytest.raises(BatchLineError, match="^jobs.jsonl line 2: ") as caught:
        read_jobs(jobs)
    assert words in str(caught.value)
    result = cli("batch", str(jobs), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and words in result.stderr and not (tmp_path / "out").exists()
    assert "hf_secret" not in result.stderr


@pytest.fixture(scope="module")
def image_server():
    """A PNG and a web page over loopback, as an image link may give either."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (320, 180), (20, 120, 200)).save(png, format="PNG")
    with FileServer() as server:
        server.routes["/start.png"] = Route(body=png.getvalue(), content_type="image/png")
        server.routes["/page"] = Route(body=b"<html>sign in</html>", content_type="text/html")
        yield server


@pytest.mark.parametrize("sample", sorted((ROOT / "samples").glob("*.json")), ids=lambda p: p.name)
def test_a_samples_file_is_a_valid_line(sample, tmp_path, image_server, monkeypatch):
    monkeypatch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1")  # the stand-in for the sample's image host
    fields = json.loads(sample.read_text())
    if "image" in fields:
        fields["image"] = f"{image_server.url}/start.png"
    (job,) = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [fields]))
    assert job.request.settings.prompt == fields["prompt"]
    assert job.request.settings.seed == fields.get("seed", job.request.settings.seed)  # without one: a random one
    if "image" in fields:  # read when the job runs
        assert job.prepared.for_spec(job.request.spec).images[0].size == (320, 180)


def test_an_image_link_is_checked_by_its_form_and_fetched_as_lora_links_are_when_its_job_runs(
    tmp_path, image_server, monkeypatch
):
    line = {"prompt": "the sea", "model": "tiny-i2v", "image": f"{image_server.url}/start.png"}
    with pytest.raises(BatchLineError, match="only https:// links are allowed"):
        read_jobs(write_jobs(tmp_path / "jobs.jsonl", [line]))
    monkeypatch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1")
    fetched = image_server.requests["/start.png"]
    (job,) = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [line]))
    assert image_server.requests["/start.png"] == fetched  # not fetched while lines are checked
    assert job.prepared.for_spec(job.request.spec).images[0].getpixel((0, 0)) == (20, 120, 200)
    (page,) = read_jobs(write_jobs(tmp_path / "jobs.jsonl", [{**line, "image": f"{image_server.url}/page"}]))
    with pytest.raises(InvalidInput, match=r"image='\(the image at the link\)' is not allowed: a readable image"):
        page.prepared.for_spec(page.request.spec)


def test_a_batch_needs_a_folder_and_ray_options_need_ray(tmp_path, cli):
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a fox", "model": "tiny"}])
    (tmp_path / "file").write_text("")
    assert "--out='" in cli("batch", str(jobs), "--out", str(tmp_path / "file")).stderr
    assert "--actors=2 is not allowed: only with --ray" in cli("batch", str(jobs), "--out", "o", "--actors", "2").stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "this one has none" in cli("batch", str(empty), "--out", "o").stderr
    with pytest.raises(InvalidInput, match="readable UTF-8"):
        read_jobs(tmp_path / "absent.jsonl")


def test_an_option_marked_for_the_predictor_is_an_input_and_a_predictor_line_field_without_a_service_edit(
    monkeypatch, tiny_dir
):
    """An input named as an option marked `predictor=True` passes through PredictorInputs and a predictor-form
    batch line as it is: a new predictor option needs no field or table row in wanlora/frontends/service.py."""
    import dataclasses

    from wanlora.frontends import batch, service
    from wanlora.frontends.service import PredictorInputs, VideoService
    from wanlora.options import described

    with pytest.raises(InvalidInput, match="not an option of the predictor"):
        PredictorInputs.of(prompt="a fox", width=64)  # an option the predictor does not offer: refused, not dropped
    with pytest.raises(InvalidInput, match="not an option of the predictor's options"):
        PredictorInputs(prompt="a fox", options={"width": 64})
    marked = {**described(), "cfg_batch": dataclasses.replace(described()["cfg_batch"], predictor=True)}
    monkeypatch.setattr(service, "described", lambda: marked)  # as options.py would mark it
    monkeypatch.setattr(batch, "PREDICTOR_FIELDS", (*service.declared_inputs(), *service.carried_options()))
    assert service.carried_options() == ["cfg_batch"] and service.option_inputs()["cfg_batch"] == "cfg_batch"
    inputs = PredictorInputs.of(prompt="a fox", cfg_batch=True, hf_api_token="hf_SECRET")
    assert inputs.options == {"cfg_batch": True} and "hf_SECRET" not in repr(inputs)
    resolved = VideoService(override=str(tiny_dir), i2v_override="").resolve(inputs)
    assert resolved.request.cfg_batch is True
    assert (
        VideoService(override=str(tiny_dir), i2v_override="")
        .resolve(PredictorInputs.of(prompt="a fox"))
        .request.cfg_batch
        is False
    )  # the option's default
    line = {"prompt": "a fox", "model": "1.3b", "lora_scale": 0.5, "cfg_batch": True}  # the predictor's form
    assert batch.parse_job(1, json.dumps(line)).request.cfg_batch is True
    with pytest.raises(InvalidInput, match="not an option of the predictor; it takes"):
        PredictorInputs.of(prompt="a fox", num_inference_steps=2)  # the predictor's name for it is sample_steps
