"""A batch on a Ray cluster: one actor per GPU, each holding a pipeline (pip install 'wanlora[ray]').

The driver keeps the queue and the manifest; actors only run jobs. A free actor takes the next
job for the model and LoRA set it already holds, else one for its model, else one for a model
no busy actor holds, so that loads and merges stay few. An actor that dies is replaced and its
job goes back to the queue (at most MAX_ATTEMPTS runs a job), so the manifest stays right.
Outputs are written by the actors into the batch's folder, which every node must share, or,
with `collect`, come back to the driver as bytes and are written there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from ..paths import PathRefused, inside
from ..staging import staged_file
from .batch import Job, JobRunner, Summary, failed_entry, interruptible, pending_jobs

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # runs of one job whose actor died: past this, the job fails rather than kill more actors
LOCAL = "local"  # the address that starts a Ray instance on this machine


class BatchActor:
    """One pipeline on one GPU (or CPU), running one job at a time."""

    def __init__(self, load_options: dict[str, Any]) -> None:
        self.runner = JobRunner(load_options)

    def run(self, job: Job, folder: str | None) -> tuple[dict[str, Any], bytes | None]:
        """The job's manifest entry, and with no shared `folder` the MP4's bytes."""
        if folder is not None:
            return self.runner.run(job, Path(folder)), None
        with tempfile.TemporaryDirectory(prefix="wanlora-batch-") as scratch:
            entry = self.runner.run(job, Path(scratch))
            path = Path(scratch) / job.output
            return entry, path.read_bytes() if entry["status"] == "done" else None


def run_batch_on_ray(
    jobs: list[Job],
    folder: str | os.PathLike,
    load_options: dict[str, Any] | None = None,
    address: str = LOCAL,
    actors: int | None = None,
    collect: bool = False,
    progress: bool = True,
) -> Summary:
    """Run every job not done yet on Ray; the same manifest and summary as `run_batch`."""
    if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
        raise InvalidInput("--actors", actors, "a whole number, 1 or more")
    try:
        import ray
    except ImportError:
        raise InvalidInput("--ray", address, "Ray installed: pip install 'wanlora[ray]'") from None
    folder = Path(folder)
    started = not ray.is_initialized()
    if started and address == LOCAL and actors is None:
        refuse_without_gpus()  # before Ray starts: its local instance has this machine's GPUs
    if started:
        ray.init(address=None if address == LOCAL else address, include_dashboard=False, log_to_driver=False)
    try:
        count, gpus = actor_count(ray, actors)  # before --out is made
        manifest, todo, summary = pending_jobs(jobs, folder)
        pool = ActorPool(ray, load_options or {}, count, gpus)
        with interruptible(jobs, manifest):
            _drive(ray, pool, todo, None if collect else str(folder.resolve()), folder, manifest, summary, progress)
    finally:
        if started:
            ray.shutdown()
    manifest.compact(jobs)
    return summary


NO_GPU = "a count: {where} has no GPU, so say how many CPU actors"


def refuse_without_gpus() -> None:
    """A local Ray with no `--actors` takes one actor per GPU here: refused at once when there is none."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise InvalidInput("--actors", None, NO_GPU.format(where="this machine"))


def actor_count(ray, count: int | None) -> tuple[int, int]:
    """The actors to start (`count`, or one per GPU of the cluster) and the cluster's GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if count is None and gpus == 0:
        raise InvalidInput("--actors", None, NO_GPU.format(where="this Ray cluster"))
    return count or gpus, gpus


class ActorPool:
    """The actors, what model and LoRA set each holds, and a fresh one in place of one that died."""

    def __init__(self, ray, load_options: dict[str, Any], count: int, gpus: int) -> None:
        self.count = count
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        self.remote = ray.remote(**resources)(BatchActor)
        self.load_options = load_options
        self.holds: dict[Any, tuple | None] = {self._new(): None for _ in range(self.count)}

    def _new(self):
        return self.remote.remote(self.load_options)

    def replace(self, ray, dead) -> None:
        ray.kill(dead, no_restart=True)
        del self.holds[dead]
        self.holds[self._new()] = None


def _pick(todo: list[Job], held: tuple | None, busy: set[str]) -> Job:
    """The next job for an actor holding `held`: its model and LoRA set, its model, a model no one holds."""
    if held is not None:
        for match in (lambda j: (j.model, j.lora_set) == held, lambda j: j.model == held[0]):
            for job in todo:
                if match(job):
                    return job
    return next((job for job in todo if job.model not in busy), todo[0])


def _drive(ray, pool: ActorPool, todo: list[Job], shared: str | None, folder: Path, manifest, summary, progress):
    from ray.exceptions import RayActorError
    from tqdm import tqdm

    queue = list(todo)
    running: dict[Any, tuple[Any, Job]] = {}  # a pending result -> its actor and job
    attempts: Counter[str] = Counter()
    with tqdm(total=summary.total, initial=summary.skipped, desc="batch", unit="job", disable=not progress) as bar:
        while queue or running:
            working = {actor for actor, _ in running.values()}
            for actor in [actor for actor in pool.holds if actor not in working][: len(queue)]:
                job = _pick(queue, pool.holds[actor], {job.model for _, job in running.values()})
                queue.remove(job)
                pool.holds[actor] = (job.model, job.lora_set)
                running[actor.run.remote(job, shared)] = (actor, job)
            (ready,), _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ready)
            try:
                entry, data = ray.get(ready)
            except RayActorError as exc:
                attempts[job.output] += 1
                logger.warning("the actor running line %d died (%s); it is replaced", job.line, type(exc).__name__)
                pool.replace(ray, actor)
                if attempts[job.output] < MAX_ATTEMPTS:
                    queue.insert(0, job)
                    continue
                entry, data = (
                    failed_entry(job, f"the Ray actor running it died {MAX_ATTEMPTS} times (out of memory?)"),
                    None,
                )
            if data is not None:
                entry = _written(folder, job, data, entry)
            manifest.record(entry)
            summary.add(entry)
            bar.update()


def _written(folder: Path, job: Job, data: bytes, entry: dict[str, Any]) -> dict[str, Any]:
    """A collected MP4 written whole (a new file, then a rename): its entry, failed if it cannot be, or the
    bytes are not the MP4's."""
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return failed_entry(job, "the MP4 the actor sent arrived changed")
    try:
        path = inside(folder, job.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path, binary=True) as file:
            file.write(data)
    except PathRefused as exc:
        return failed_entry(job, str(exc))
    except OSError as exc:
        return failed_entry(job, f"cannot write {job.output}: {exc.strerror or exc}")
    return entry
