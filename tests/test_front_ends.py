"""The front ends' problems found in batches, sweeps, the predictor and the errors they show, each reproduced.
(The classes behind them are closed in test_isolation.py and test_secrets_in_errors.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanlora import WanLoraPipeline
from wanlora.errors import InvalidInput, WanLoraError
from wanlora.frontends.batch import read_jobs
from wanlora.frontends.service import PredictorInputs, VideoService

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


def test_a_token_as_a_links_user_name_is_not_echoed(cli, tmp_path):
    """`https://TOKEN@host/...`, as git and many servers take a token; only `user:PASSWORD@` was masked."""
    result = cli("generate", "a fox", "--model", "https://hf_T0KEN@huggingface.co/owner/repo", cwd=tmp_path)
    assert result.returncode == 2 and "is not a catalogue variant" in result.stderr
    assert "T0KEN" not in result.stderr and "https://***@huggingface.co/owner/repo" in result.stderr


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


@pytest.mark.parametrize("quality", [101, -1, 80.0, True])
def test_the_services_output_quality_is_checked_before_any_work(quality):
    """Cog's schema bounds it for its server; the service itself (a worker, a caller of it) is held to the same."""
    service = VideoService(override="", i2v_override="")
    with pytest.raises(InvalidInput, match=r"^output_quality=.* between 0\b.*and 100"):
        service.resolve(PredictorInputs.of(prompt="a fox", output_quality=quality))


# ------------------------------------------------------------------ 1. a batch line means only what it says

STEPS = {"num_frames": 5, "num_inference_steps": 2, "width": 64, "height": 48}


@pytest.fixture(scope="module")
def style(tmp_path_factory) -> str:
    from wanlora.tiny import tiny_transformer

    from .builders import block_linears, write_lora

    model = tiny_transformer()
    path = tmp_path_factory.mktemp("front-loras") / "style.safetensors"
    write_lora(
        path, model, "original", seed=3, targets=block_linears({n: p.shape for n, p in model.named_parameters()})
    )
    return str(path)


@pytest.mark.slow
def test_a_line_without_loras_or_accelerator_runs_with_none_whatever_ran_before(style, tiny_dir, tmp_path):
    from wanlora.frontends.batch import JobRunner, run_order

    from .conftest import probe, recorded

    model = str(tiny_dir)
    lines = [
        {"prompt": "a fox", "model": model, "loras": [[style, 1.0]], "seed": 1, **STEPS, "output": "styled.mp4"},
        {"prompt": "a fox", "model": model, "seed": 2, **STEPS, "output": "plain.mp4"},
        {"prompt": "a fox", "model": model, "accelerator": "causvid", "seed": 3, **STEPS, "output": "fast.mp4"},
        {"prompt": "a fox", "model": model, "loras": None, "seed": 4, **STEPS, "output": "after.mp4"},
    ]
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines))
    assert jobs[1].lora_set == () and [job.line for job in run_order(jobs)] == [1, 2, 4, 3]  # grouped as run
    runner, out = JobRunner(), tmp_path / "out"
    out.mkdir()
    for job in jobs:  # in the file's order, the one that would inherit if anything did
        assert runner.run(job, out)["status"] == "done"
    fresh = WanLoraPipeline.from_pretrained(model)
    for name, seed in (("plain", 2), ("after", 4)):
        assert recorded(tmp_path / "out" / f"{name}.mp4")["loras"] == []
        alone = fresh.generate("a fox", seed=seed, **STEPS).save(tmp_path / f"alone-{name}.mp4")
        assert (probe(alone).frames == probe(tmp_path / "out" / f"{name}.mp4").frames).all(), name


@pytest.mark.slow
def test_the_library_keeps_the_callers_set_but_never_a_presets_lora_and_a_sweep_inherits_nothing(
    style, tiny_dir, tmp_path
):
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir))
    pipe.generate("a fox", accelerator="causvid", loras=[(style, 0.5)], **STEPS)
    kept = pipe.generate("a fox", seed=1, **STEPS)  # loras=None: the caller's set, without causvid's LoRA
    assert kept.metadata["loras"] == [{"ref": style, "strength": 0.5}]
    swept = pipe.sweep("a fox", seeds=[1, 2], **STEPS)  # no loras: none, not the set generate left
    assert all(cell.video.metadata["loras"] == [] for cell in swept.cells)
    alone = WanLoraPipeline.from_pretrained(str(tiny_dir)).generate("a fox", seed=2, **STEPS)
    assert (swept.cells[1].video.frames == alone.frames).all()


def fox_lines(count: int, **extra) -> list[dict]:
    return [{"prompt": "a fox", "model": "tiny", "seed": n, **STEPS, "output": f"fox-{n}.mp4", **extra}
            for n in range(1, count + 1)]  # fmt: skip


def manifest_entries(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ 8. nothing written outside --out


def test_a_symlinked_manifest_is_refused_and_never_followed(tmp_path, cli):
    jobs, out, victim = write_jobs(tmp_path / "jobs.jsonl", fox_lines(1)), tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("precious\n")
    (out / "manifest.jsonl").symlink_to(victim)
    result = cli("batch", str(jobs), "--out", str(out))
    assert result.returncode == 2 and "manifest.jsonl is a symbolic link" in result.stderr
    assert victim.read_text() == "precious\n" and not (out / "fox-1.mp4").exists()


@pytest.mark.slow
def test_the_manifest_is_replaced_by_rename_so_a_link_to_it_or_beside_it_leads_nowhere(tmp_path):
    from wanlora.frontends.batch import run_batch

    jobs, out, victim = read_jobs(write_jobs(tmp_path / "jobs.jsonl", fox_lines(2))), tmp_path / "out", tmp_path / "v"
    out.mkdir()
    victim.write_text("precious\n")
    (out / ".manifest.jsonl.partial").symlink_to(victim)  # where wanlora 0.2 wrote its compacted manifest
    (out / "manifest.jsonl").hardlink_to(victim)  # another name for the same file: written in place, it would change
    assert run_batch(jobs, out, progress=False).failed == []
    assert victim.read_text() == "precious\n"
    assert [entry["output"] for entry in manifest_entries(out)] == ["fox-1.mp4", "fox-2.mp4"]
    assert not (out / "manifest.jsonl").is_symlink() and (out / "manifest.jsonl").stat().st_ino != victim.stat().st_ino


def test_a_collected_mp4_never_follows_a_link_at_its_name(tmp_path):
    import hashlib

    from wanlora.frontends.batch_ray import _written

    (job,) = read_jobs(write_jobs(tmp_path / "jobs.jsonl", fox_lines(1)))
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"precious")
    data = b"an mp4's bytes"
    entry = {**job.entry, "status": "done", "sha256": hashlib.sha256(data).hexdigest()}
    (out / "fox-1.mp4").symlink_to(victim)
    assert _written(out, job, data, entry)["status"] == "failed"  # the name leads outside: refused
    (out / "fox-1.mp4").unlink()
    (out / "fox-1.mp4").hardlink_to(victim)
    assert _written(out, job, data, entry) == entry
    assert victim.read_bytes() == b"precious" and (out / "fox-1.mp4").read_bytes() == data


# ------------------------------------------------------------------ 11. a manifest that cannot be written


@pytest.mark.slow
def test_a_full_disk_while_the_manifest_is_written_stops_the_batch_cleanly_and_a_rerun_resumes(
    tmp_path, cli, monkeypatch
):
    import errno
    import os

    jobs, out = write_jobs(tmp_path / "jobs.jsonl", fox_lines(4)), tmp_path / "out"
    real, writes = os.fsync, []

    def full_after_two(handle: int) -> None:  # the disk fills up while the third entry is being written
        if "manifest.jsonl" in os.readlink(f"/proc/self/fd/{handle}"):
            writes.append(handle)
            if len(writes) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(handle)

    monkeypatch.setattr(os, "fsync", full_after_two)
    result = cli("batch", str(jobs), "--out", str(out))
    assert result.returncode == 2 and "a bug" not in result.stderr, result.stderr
    error = result.stderr[result.stderr.index("wanlora: error: ") :]  # after the progress bar
    assert error.startswith("wanlora: error: cannot write ") and "No space left on device" in error
    assert "running it again resumes" in error and error.count("\n") == 1
    assert [entry["output"] for entry in manifest_entries(out)] == ["fox-1.mp4", "fox-2.mp4"]  # recorded stays
    assert not (out / "fox-4.mp4").exists()  # the batch stopped: nothing more ran
    monkeypatch.setattr(os, "fsync", real)
    again = cli("batch", str(jobs), "--out", str(out))
    assert again.returncode == 0 and "4 jobs: 2 done, 2 already done, 0 failed" in again.stdout


# ------------------------------------------------------------------ 12. SIGTERM while a job encodes

SLOW_ENCODE = """
import sys, time
import numpy as np
from wanlora import video
real = video._run_ffmpeg
def slow(command, frames, partial, path):
    real(command, frames, partial, path)
    print("ENCODING", partial.parent, flush=True)
    time.sleep(60)
video._run_ffmpeg = slow
if sys.argv[1] == "encode":  # what `generate -o` and every other MP4 write comes to, without torch's import
    video.encode_mp4(np.zeros((5, 48, 64, 3), np.uint8), sys.argv[2], fps=8)
else:
    from wanlora.frontends import cli
    sys.exit(cli.main(sys.argv[1:]))
"""


def start_slow(tmp_path: Path, *args: str):
    """A child that encodes, says where, and waits there."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", SLOW_ENCODE, *args], stdout=subprocess.PIPE, text=True,
                             stderr=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
    for line in child.stdout:
        if line.startswith("ENCODING "):
            return child, Path(line.split(" ", 1)[1].strip())
    raise AssertionError(f"the encode never started (exit {child.wait()})")


def hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_an_encode_stopped_by_sigterm_leaves_nothing_and_one_stopped_by_sigkill_is_cleared_by_the_next(tmp_path):
    import signal

    import numpy as np

    from wanlora.video import encode_mp4

    target = tmp_path / "fox.mp4"
    child, staging = start_slow(tmp_path, "encode", str(target))
    assert staging.parent == tmp_path and staging.is_dir()
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert hidden(tmp_path) == [] and not target.exists()
    killed, left = start_slow(tmp_path, "encode", str(target))
    killed.kill()
    killed.wait(60)
    assert left.is_dir()  # SIGKILL: nothing could run
    encode_mp4(np.zeros((5, 48, 64, 3), np.uint8), target, fps=8)
    assert hidden(tmp_path) == [] and target.is_file()


def test_sigterm_while_a_batch_encodes_leaves_no_staging_and_a_resumed_batch_removes_what_a_kill_left(tmp_path, cli):
    import signal
    import subprocess

    out = tmp_path / "out"
    jobs = write_jobs(tmp_path / "jobs.jsonl", fox_lines(2))
    child, staging = start_slow(tmp_path, "batch", str(jobs), "--out", str(out))
    assert staging.parent == out and staging.is_dir()
    child.send_signal(signal.SIGTERM)
    assert child.wait(60) == 128 + signal.SIGTERM
    assert hidden(out) == [] and not (out / "fox-1.mp4").exists()
    assert cli("batch", str(jobs), "--out", str(out)).returncode == 0
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id no one has now, as a killed batch's
    for name in ("fox-1.mp4", "fox-2.mp4", "manifest.jsonl"):  # what SIGKILL leaves beside a done job and the rest
        (out / f".{name}.staging-{gone.pid}-x1").mkdir()
    (out / f".manifest.jsonl.staging-{gone.pid}-x2").write_text("{")
    (out / f".other.mp4.staging-{gone.pid}-x").mkdir()  # not this batch's: kept
    again = cli("batch", str(jobs), "--out", str(out))
    assert again.returncode == 0 and "2 already done" in again.stdout
    assert hidden(out) == [f".other.mp4.staging-{gone.pid}-x"]


# ------------------------------------------------------------------ batches at scale


def test_lines_check_their_images_by_header_and_each_is_read_when_its_job_runs(tmp_path, monkeypatch):
    from PIL import Image, ImageFile

    Image.new("RGB", (1920, 1080), (10, 200, 30)).save(tmp_path / "big.png")
    (tmp_path / "not.png").write_bytes(b"not an image at all")
    Image.new("RGB", (20, 20)).save(tmp_path / "small.png")
    reads = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: reads.append(1) or real(self))
    lines = [{"prompt": "a fox", "model": "tiny-i2v", "image": "big.png", "output": f"f-{n}.mp4"} for n in range(50)]
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines))
    assert reads == [] and len(jobs) == 50  # nothing decoded while checking
    assert jobs[0].request.settings.width > jobs[0].request.settings.height  # framed by the header's 16:9
    assert jobs[0].prepared.for_spec(jobs[0].request.spec).images[0].getpixel((0, 0)) == (10, 200, 30)
    assert reads  # read when the job runs
    turned = Image.new("RGB", (80, 40))
    exif = turned.getexif()
    exif[0x0112] = 6  # shown turned a quarter: 40 wide, 80 high
    turned.save(tmp_path / "turned.jpg", exif=exif)
    (job,) = read_jobs(
        write_jobs(tmp_path / "one.jsonl", [{"prompt": "a fox", "model": "tiny-i2v", "image": "turned.jpg"}])
    )
    assert job.request.images[0].size == (40, 80) == job.prepared.for_spec(job.request.spec).images[0].size
    for name, words in (("not.png", "a readable image"), ("small.png", "at least 32 pixels"), ("no.png", "existing")):
        with pytest.raises(WanLoraError, match=words):
            read_jobs(write_jobs(tmp_path / "bad.jsonl", [{"prompt": "a fox", "model": "tiny-i2v", "image": name}]))


@pytest.mark.slow
def test_an_unreachable_image_link_fails_its_job_and_the_others_run(tmp_path, cli, offline_net):
    from PIL import Image

    from .processes import free_port

    Image.new("RGB", (64, 48)).save(tmp_path / "start.png")
    images = ["start.png", f"http://127.0.0.1:{free_port()}/gone.png", "start.png"]
    lines = [
        {"prompt": "a fox", "model": "tiny-i2v", "image": image, **STEPS, "output": f"fox-{n}.mp4"}
        for n, image in enumerate(images)
    ]
    result = cli("batch", str(write_jobs(tmp_path / "jobs.jsonl", lines)), "--out", str(tmp_path / "out"))
    assert result.returncode == 3 and "3 jobs: 2 done, 0 already done, 1 failed (line 2)" in result.stdout
    failed = manifest_entries(tmp_path / "out")[1]
    assert failed["status"] == "failed" and "image" in failed["error"]


def test_relative_paths_are_the_jobs_files_folders(style, tiny_dir, tmp_path, monkeypatch):
    import shutil

    from PIL import Image

    project = tmp_path / "project"
    (project / "loras").mkdir(parents=True)
    shutil.copy(style, project / "loras" / "style.safetensors")
    shutil.copy(style, project / "motion.safetensors")
    Image.new("RGB", (64, 48)).save(project / "start.png")
    shutil.copytree(tiny_dir, project / "model")
    line = {"prompt": "a fox", "model": "model", "loras": [["loras/style.safetensors", 0.5], "motion.safetensors"]}
    predictor = {"prompt": "a fox", "model": "1.3b", "lora_weights": "./loras/style.safetensors"}
    image = {"prompt": "a fox", "model": "tiny-i2v", "image": "start.png"}
    jobs_file = write_jobs(project / "jobs.jsonl", [line, predictor, image])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the current folder holds none of them
    jobs = read_jobs(jobs_file)
    assert jobs[0].model == str(project / "model")
    assert [lora.ref for lora in jobs[0].request.loras] == [str(project / "loras/style.safetensors"),
                                                             str(project / "motion.safetensors")]  # fmt: skip
    assert [lora.ref for lora in jobs[1].request.loras] == [str(project / "loras/style.safetensors")]
    assert jobs[2].request.images[0].source == str(project / "start.png")


@pytest.mark.slow
def test_a_jobs_identity_is_its_inputs_content_so_moving_them_reruns_nothing(style, tiny_dir, tmp_path):
    import shutil

    from wanlora.frontends.batch import run_batch

    def layout(folder: Path) -> Path:
        folder.mkdir()
        shutil.copytree(tiny_dir, folder / "model")
        shutil.copy(style, folder / "style.safetensors")
        return folder

    def lines(folder: Path) -> list[dict]:  # absolute paths, as a script writes them
        common = {"model": str(folder / "model"), "loras": [[str(folder / "style.safetensors"), 0.5]], **STEPS}
        return [{"prompt": "a fox", "seed": 1, **common, "output": "a.mp4"},
                {"prompt": "a fox", "seed": 2, **common, "output": "b.mp4"}]  # fmt: skip

    before, out = layout(tmp_path / "before"), tmp_path / "out"
    assert run_batch(read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines(before))), out, progress=False).done == 2
    after = tmp_path / "after"
    before.rename(after)  # the models and LoRAs moved
    moved = run_batch(read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines(after))), out, progress=False)
    assert (moved.done, moved.skipped) == (0, 2)
    from wanlora.tiny import tiny_transformer

    from .builders import write_lora

    write_lora(after / "style.safetensors", tiny_transformer(), "original", seed=99)  # new content, same path
    changed = run_batch(read_jobs(write_jobs(tmp_path / "jobs.jsonl", lines(after))), out, progress=False)
    assert (changed.done, changed.skipped) == (2, 0)


def test_a_max_width_under_64_and_ray_without_gpus_or_actors_are_refused_before_any_work(tmp_path, cli, monkeypatch):
    import ray

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(WanLoraPipeline, "from_pretrained", no_load)
    sweep = cli("sweep", "a fox", "--model", "tiny", "--seeds", "1,2", "--max-width", "10", cwd=tmp_path)
    assert (
        sweep.returncode == 2 and "--max-width=10 is not allowed: a whole number of pixels, 64 or more" in sweep.stderr
    )
    jobs = write_jobs(tmp_path / "jobs.jsonl", fox_lines(1))
    batch = cli("batch", str(jobs), "--out", str(tmp_path / "out"), "--ray")
    assert batch.returncode == 2 and "--actors is missing: a count: this machine has no GPU" in batch.stderr
    assert not (tmp_path / "out").exists() and not ray.is_initialized()
