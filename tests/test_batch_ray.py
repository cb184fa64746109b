"""Batches on a local Ray cluster with CPU actors: the local batch's results, and a killed actor survived."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import numpy as np
import pytest
import ray

from wanlora.errors import InvalidInput
from wanlora.frontends.batch import Manifest, read_jobs, run_batch
from wanlora.frontends.batch_ray import run_batch_on_ray

from .conftest import probe
from .processes import children_with, wait_for
from .test_batch import eight_jobs, loras, write_jobs  # noqa: F401 (loras is a fixture)

pytestmark = pytest.mark.slow  # a Ray cluster


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module: two CPUs, a small object store, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


def entries(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_a_ray_batch_gives_the_local_batchs_videos_bitwise(cluster, loras, tmp_path):  # noqa: F811
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", eight_jobs(loras)[:5]))
    run_batch(jobs, tmp_path / "local", progress=False)
    shared = run_batch_on_ray(jobs, tmp_path / "shared", actors=2, progress=False)
    collected = run_batch_on_ray(jobs, tmp_path / "collected", actors=2, collect=True, progress=False)
    assert (shared.done, collected.done, shared.failed, collected.failed) == (5, 5, [], [])
    local = entries(tmp_path / "local")
    for name in ("shared", "collected"):
        facts = [[(e["line"], e["seed"], e["status"]) for e in entries(tmp_path / f)] for f in (name, "local")]
        assert facts[0] == facts[1]
        for entry in local:
            want = probe(tmp_path / "local" / entry["output"]).frames
            assert np.array_equal(probe(tmp_path / name / entry["output"]).frames, want), (name, entry["output"])
    again = run_batch_on_ray(jobs, tmp_path / "shared", actors=2, progress=False)  # resumable, like a local one
    assert (again.done, again.skipped) == (0, 5)


def test_a_killed_actor_has_its_job_retried_and_the_batch_completes(cluster, loras, tmp_path):  # noqa: F811
    jobs = read_jobs(write_jobs(tmp_path / "jobs.jsonl", eight_jobs(loras)))
    out, result = tmp_path / "out", {}
    batch = threading.Thread(
        target=lambda: result.update(summary=run_batch_on_ray(jobs, out, actors=2, progress=False))
    )
    batch.start()
    wait_for(lambda: (out / "manifest.jsonl").exists() and len(entries(out)) >= 2, 120)
    running = wait_for(lambda: children_with(os.getpid(), "ray::BatchActor.run"), 60)
    os.kill(next(iter(running)), signal.SIGKILL)
    batch.join(timeout=180)
    summary = result["summary"]
    assert (summary.done, summary.failed) == (8, [])
    assert len(entries(out)) == 8 and all(e["status"] == "done" for e in entries(out))
    assert all(Manifest(out).finished(job, out) for job in jobs)


def test_without_ray_installed_the_error_names_the_extra(loras, tmp_path, cli, monkeypatch):  # noqa: F811
    jobs = write_jobs(tmp_path / "jobs.jsonl", eight_jobs(loras)[:1])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    result = cli("batch", str(jobs), "--out", str(tmp_path / "out"), "--ray")
    assert result.returncode == 2 and "pip install 'wanlora[ray]'" in result.stderr
    with pytest.raises(InvalidInput, match="a whole number, 1 or more"):
        run_batch_on_ray(read_jobs(jobs), tmp_path / "out", actors=0)
