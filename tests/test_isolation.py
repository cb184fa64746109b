"""No request reads another's state (class test 1): whatever ran before, in whatever order, an output is
the one its request gives alone in a fresh process, bitwise.

A pool of requests that each leave something behind on a model (LoRAs, an accelerator's LoRA and
its sampler, a strength schedule, fast mode's hooks, batched guidance, a negative prompt, a sweep's
cached prompt embeddings, another model loaded in place, with its own text encoder and VAE) is run
alone, each in a process of its own that has done nothing else: the references. Hypothesis then
generates sequences of batches (with resumes), predictions and sweeps over them, run by one
process's front ends on one resident model kept across all examples, as a server that takes all
three would hold it, and every output must equal its reference: the frames bitwise and the tags
whole. One Ray batch with a single actor checks the same of a Ray batch.

WANLORA_CLASS_EXAMPLES sets the budget (default 10: 4 sequences, derandomized; about 40 s on a
2-core machine with the Ray case, most of it the references); rerun it larger, e.g.
`WANLORA_CLASS_EXAMPLES=100 pytest tests/test_isolation.py` (40 random sequences).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import probe, recorded

pytestmark = pytest.mark.slow  # class runs: every request after every other, compared with a fresh process

BUDGET = int(os.environ.get("WANLORA_CLASS_EXAMPLES", "10"))
SEQUENCES = settings(
    max_examples=max(1, BUDGET * 2 // 5),
    deadline=None,
    derandomize=BUDGET <= 10,
    suppress_health_check=list(HealthCheck),
)
STEPS = {"width": 64, "height": 48, "num_frames": 5, "num_inference_steps": 2}


# ------------------------------------------------------------------ the requests and their references


def requests_of(where: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """The pool: each request by name, as (front end, its fields), with the files and links in `where`."""
    t2v, i2v, style, motion = where["t2v"], where["i2v"], where["style"], where["motion"]
    return {
        "styled": ("line", {"prompt": "a fox", "model": t2v, "loras": [[style, 0.8]], "guidance_scale": 4.0,
                            "seed": 1, **STEPS}),
        "plain": ("line", {"prompt": "a fox", "model": t2v, "seed": 2, **STEPS}),  # no loras: none
        "distilled": ("line", {"prompt": "a fox", "model": t2v, "accelerator": "lightx2v-4step", "seed": 3,
                               **STEPS, "num_inference_steps": 4}),
        "scheduled": ("line", {"prompt": "a bird", "model": t2v, "loras": [[motion, [1.0, 0.25]]], "fast_mode": "fast",
                               "flow_shift": 3.0, "cfg_batch": True, "negative_prompt": "none", "seed": 4,
                               **STEPS, "num_inference_steps": 3}),
        "image": ("line", {"prompt": "the sea", "model": i2v, "image": where["image"], "seed": 5, "num_frames": 5,
                           "num_inference_steps": 2}),
        "predicted": ("predict", {"prompt": "a fox", "lora_weights": where["style_url"], "lora_scale": 0.5,
                                  "num_frames": 5, "sample_steps": 2, "seed": 6}),
        "predicted-sweep": ("predict", {"prompt": "a fox", "lora_weights": where["motion_url"],
                                        "lora_scale_sweep": "0,1", "num_frames": 5, "sample_steps": 2, "seed": 7}),
        "swept": ("sweep", {"prompt": "a fox", "loras": [(style, 1.0)], "strengths": [0.0, 0.5], "seed": 8,
                            **STEPS}),
        "swept-plain": ("sweep", {"prompt": "a cat", "seeds": [9, 10], **STEPS}),  # no loras: none
    }  # fmt: skip


LINES = ["styled", "plain", "distilled", "scheduled", "image"]
PREDICTIONS = ["predicted", "predicted-sweep"]
SWEEPS = ["swept", "swept-plain"]


def run_alone(name: str, where: dict[str, str]) -> dict:
    """Request `name`, run in this process and nothing else before it: its frames and tags."""
    os.environ.update(WANLORA_ALLOW_PRIVATE_URLS="1", WANLORA_CACHE=tempfile.mkdtemp(prefix="wanlora-alone-"))
    kind, fields = requests_of(where)[name]
    out = Path(tempfile.mkdtemp(prefix="wanlora-alone-out-"))
    try:
        if kind == "line":
            from wanlora.frontends.batch import read_jobs, run_batch

            (out / "jobs.jsonl").write_text(json.dumps({**fields, "output": f"{name}.mp4"}) + "\n")
            summary = run_batch(read_jobs(out / "jobs.jsonl"), out / "out", progress=False)
            assert summary.failed == [], summary.failed
            return saved(out / "out" / f"{name}.mp4")
        if kind == "predict":
            from wanlora.frontends.service import PredictorInputs, VideoService

            service = VideoService(override=where["t2v"], i2v_override="")
            return saved(service.generate(PredictorInputs(**fields), out).path)
        from wanlora import WanLoraPipeline

        grid = WanLoraPipeline.from_pretrained(where["t2v"]).sweep(**fields, progress=False).grid
        return {"frames": grid.frames, "tags": json.loads(json.dumps(grid.metadata))}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def saved(path: Path) -> dict:
    return {"frames": probe(path).frames, "tags": recorded(path)}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir):
    """The models, LoRAs, image and links every request names, and each request's reference."""
    from PIL import Image

    from wanlora.tiny import tiny_transformer, write_tiny_model

    from .builders import block_linears, write_lora
    from .servers import FileServer, Route

    folder = tmp_path_factory.mktemp("isolation")
    model = tiny_transformer()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, layout, seed, blocks in (("style", "original", 3, [0]), ("motion", "kohya", 4, [0, 1])):
        write_lora(folder / f"{name}.safetensors", model, layout, seed=seed, targets=block_linears(shapes, blocks))
    Image.new("RGB", (96, 64), (200, 120, 40)).save(folder / "start.png")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1")
    patch.setenv("WANLORA_CACHE", str(folder / "cache"))
    with FileServer() as server:
        for name in ("style", "motion"):
            server.routes[f"/{name}.safetensors"] = Route((folder / f"{name}.safetensors").read_bytes())
        where = {
            "t2v": str(tiny_dir),
            # its own text encoder and VAE (another seed): sharing them with the t2v model would change its video
            "i2v": str(write_tiny_model(folder / "tiny-i2v", seed=1, kind="i2v")),
            "style": str(folder / "style.safetensors"),
            "motion": str(folder / "motion.safetensors"),
            "image": str(folder / "start.png"),
            "style_url": f"{server.url}/style.safetensors",
            "motion_url": f"{server.url}/motion.safetensors",
        }
        yield where, references(where)
    patch.undo()


def references(where: dict[str, str]) -> dict[str, dict]:
    """Each request run alone, each in a process of its own (forked from a server that has imported
    wanlora, and done nothing else), two at a time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["wanlora.pipeline", "wanlora.frontends.batch", "wanlora.frontends.service", "tests.test_isolation"]
    )
    with context.Pool(2, maxtasksperchild=1) as pool:
        pending = {name: pool.apply_async(run_alone, (name, where)) for name in requests_of(where)}
        return {name: result.get(timeout=600) for name, result in pending.items()}


# ------------------------------------------------------------------ one process's front ends, in any order


class FrontEnds:
    """A batch runner, a prediction service and sweeps, taking turns with one resident model."""

    def __init__(self, where: dict[str, str]) -> None:
        from wanlora.frontends.batch import JobRunner
        from wanlora.frontends.service import VideoService
        from wanlora.resident import ResidentModel

        self.where = where
        self.resident = ResidentModel()  # one model, held across every front end's requests
        self.runner = JobRunner(resident=self.resident)
        self.service = VideoService(override=where["t2v"], i2v_override="", resident=self.resident)

    def batch(self, names: list[str], out: Path, resume: bool) -> dict[str, dict]:
        from wanlora.frontends.batch import read_jobs, run_batch

        requests = requests_of(self.where)
        out.mkdir()
        lines = [{**requests[name][1], "output": f"{name}.mp4"} for name in names]
        (out / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        jobs = read_jobs(out / "jobs.jsonl")
        got = {}
        for attempt in range(2 if resume else 1):
            summary = run_batch(jobs, out / "out", runner=self.runner, progress=False)
            assert summary.failed == [] and summary.done == (1 if attempt else len(names)), summary
            got |= {name: saved(out / "out" / f"{name}.mp4") for name in (names[:1] if attempt else names)}
            (out / "out" / f"{names[0]}.mp4").unlink()  # resumed: it alone runs again, after all the others
        return got

    def predict(self, name: str, out: Path) -> dict:
        from wanlora.frontends.service import PredictorInputs

        result = self.service.generate(PredictorInputs(**requests_of(self.where)[name][1]), out)
        return saved(result.path)

    def sweep(self, name: str) -> dict:
        grid = self.resident.load(self.where["t2v"]).sweep(**requests_of(self.where)[name][1], progress=False).grid
        return {"frames": grid.frames, "tags": json.loads(json.dumps(grid.metadata))}


@pytest.fixture(scope="module")
def front_ends(world):
    return FrontEnds(world[0])  # kept across examples: what one example leaves, the next meets


def assert_alone(name: str, got: dict, want: dict) -> None:
    assert got["frames"].shape == want["frames"].shape, name
    differ = np.count_nonzero(got["frames"] != want["frames"])
    assert differ == 0, f"{name}: {differ} values differ from the request run alone"
    assert got["tags"] == want["tags"], name


steps = st.one_of(
    st.tuples(st.just("batch"), st.lists(st.sampled_from(LINES), min_size=1, max_size=3, unique=True), st.booleans()),
    st.tuples(st.just("predict"), st.sampled_from(PREDICTIONS)),
    st.tuples(st.just("sweep"), st.sampled_from(SWEEPS)),
)


@SEQUENCES
@given(sequence=st.lists(steps, min_size=2, max_size=3))
def test_every_output_is_its_request_alone_whatever_ran_before(sequence, world, front_ends):
    references_ = world[1]
    scratch = Path(tempfile.mkdtemp(prefix="wanlora-sequence-"))
    try:
        for number, step in enumerate(sequence):
            if step[0] == "batch":
                for name, got in front_ends.batch(step[1], scratch / f"batch-{number}", step[2]).items():
                    assert_alone(name, got, references_[name])
            elif step[0] == "predict":
                (scratch / f"predict-{number}").mkdir()
                assert_alone(step[1], front_ends.predict(step[1], scratch / f"predict-{number}"), references_[step[1]])
            else:
                assert_alone(step[1], front_ends.sweep(step[1]), references_[step[1]])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_a_ray_batch_on_one_actor_gives_each_line_its_output_alone(world, tmp_path):
    import ray

    from wanlora.frontends.batch import read_jobs
    from wanlora.frontends.batch_ray import run_batch_on_ray

    where, references_ = world
    names = ["scheduled", "plain", "distilled", "styled"]  # one actor runs them all, each after the last
    requests = requests_of(where)
    lines = [{**requests[name][1], "output": f"{name}.mp4"} for name in names]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        summary = run_batch_on_ray(read_jobs(tmp_path / "jobs.jsonl"), tmp_path / "out", actors=1, progress=False)
    finally:
        ray.shutdown()
    assert summary.failed == [] and summary.done == len(names)
    for name in names:
        assert_alone(name, saved(tmp_path / "out" / f"{name}.mp4"), references_[name])
