"""Batches: many requests from a JSONL file, each model loaded once and each LoRA set merged once.

A line is one request, in the Python API's fields (`prompt`, `model`, `loras`, `seed` and the
rest of `WanLoraPipeline.generate`'s arguments) or in the predictor's (a `samples/` file is a
valid line), plus two of the batch's own: `output`, a file name in the batch's folder, and
`quality`. Every line is checked before any work starts. Jobs run grouped by model, then by
LoRA set. The manifest, `manifest.jsonl` in the folder, records each job as it ends; a rerun
skips every job whose MP4 is there and matches its entry, so a killed batch resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BatchLineError, InternalError, InvalidInput, WanLoraError
from .lora.fetch import Credentials
from .models import resolve_model
from .paths import inside, relative_name
from .request import Request, refuse_unknown, resolve_request
from .service import MODEL_CHOICES, PredictorInputs, VideoService
from .settings import DEFAULT_MODEL, DEFAULT_QUALITY
from .sweep import Axis
from .video import Video, quality_to_crf

if TYPE_CHECKING:
    from .pipeline import WanLoraPipeline

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
BATCH_FIELDS = ("output", "quality")
PREDICTOR_FIELDS = tuple(PredictorInputs.__dataclass_fields__)


@dataclass(frozen=True)
class Job:
    """One checked line: what to load, what to run, and where its MP4 goes."""

    line: int
    key: str  # a digest of the line's request: the manifest matches a finished job on it
    output: str  # a file name in the batch's folder
    model: str  # the model to load: a catalogue or tiny name, a folder or a Hub repo
    request: Request
    quality: int
    credentials: Credentials = field(default_factory=Credentials)
    sweep: list[Axis] | None = None  # the predictor's lora_scale_sweep: the job's MP4 is a grid
    fields: dict[str, Any] = field(default_factory=dict)  # the Python API's, to resolve again for another spec

    @property
    def lora_set(self) -> tuple:
        """What a merge depends on: each LoRA, its strength and expert, and the accelerator's."""
        loras = [*(self.request.loras or ()), self.request.accelerator_lora]
        return tuple((lora.ref, lora.strength, lora.expert) for lora in loras if lora is not None)

    @property
    def entry(self) -> dict[str, Any]:
        """What every manifest entry of this job starts with."""
        return {"output": self.output, "line": self.line, "job": self.key, "model": self.model}

    def request_for(self, pipe: WanLoraPipeline) -> Request:
        """The request for the model that loaded: a Hub repo's own config may name another variant."""
        if pipe.spec == self.request.spec:
            return self.request
        return resolve_request(pipe.spec, **{**self.fields, "seed": self.request.settings.seed})


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Every line of a jobs file, checked: an error names the line, and nothing runs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("jobs", str(path), f"a readable UTF-8 JSONL file ({exc})") from None
    jobs: list[Job] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            jobs.append(parse_job(number, line))
        except WanLoraError as exc:
            raise BatchLineError(f"{path.name} line {number}: {exc}") from None
    if not jobs:
        raise InvalidInput("jobs", str(path), "a JSONL file with one request a line; this one has none")
    outputs: dict[str, int] = {}
    for job in jobs:
        if job.output in outputs:
            raise BatchLineError(
                f"{path.name} line {job.line}: output {job.output!r} is line {outputs[job.output]}'s as well"
            )
        outputs[job.output] = job.line
    return jobs


def parse_job(number: int, line: str) -> Job:
    try:  # the line is never echoed: it may hold a token
        fields = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BatchLineError(f"not one JSON object ({exc.msg} at column {exc.colno})") from None
    if not isinstance(fields, dict):
        raise BatchLineError(f"a JSON {type(fields).__name__}, not one object of a request's fields")
    public = {name: value for name, value in fields.items() if not name.endswith("api_token")}
    key = hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()[:16]
    output = fields.pop("output", f"job-{number:04d}.mp4")
    if not isinstance(output, str) or not output.lower().endswith(".mp4") or output == MANIFEST:
        raise InvalidInput("output", output, "a file name ending in .mp4, in the batch's folder")
    output = str(relative_name(output, "output"))
    quality = fields.pop("quality", fields.pop("output_quality", DEFAULT_QUALITY))
    quality_to_crf(quality, "quality")
    if _in_predictor_fields(fields):
        return _predictor_job(number, key, output, quality, fields)
    from .pipeline import generate_options

    known = ["prompt", "model", *generate_options(), *BATCH_FIELDS]
    refuse_unknown({k: v for k, v in fields.items() if k not in known}, [*known, *PREDICTOR_FIELDS], "a batch line")
    model = fields.pop("model", DEFAULT_MODEL)
    if not isinstance(model, str):
        raise InvalidInput("model", model, "a model name, folder or Hub repo")
    request = resolve_request(resolve_model(model), **fields)
    _check_local_loras(request)
    return Job(number, key, output, model, request, quality, fields=fields)


def _in_predictor_fields(fields: dict[str, Any]) -> bool:
    """A line is read as the predictor reads it when it uses a name or model choice only the predictor has."""
    from .pipeline import generate_options

    library = {"prompt", "model", *generate_options()}
    model = fields.get("model")
    return bool(set(fields) & (set(PREDICTOR_FIELDS) - library)) or (isinstance(model, str) and model in MODEL_CHOICES)


def _predictor_job(number: int, key: str, output: str, quality: int, fields: dict[str, Any]) -> Job:
    refuse_unknown({k: v for k, v in fields.items() if k not in PREDICTOR_FIELDS}, PREDICTOR_FIELDS, "a batch line")
    service = VideoService(override="", i2v_override="")
    resolved = service.resolve(PredictorInputs(**fields))
    credentials = replace(resolved.credentials, local_files=True)  # this machine's own files: it is the user's
    _check_local_loras(resolved.request)
    return Job(number, key, output, resolved.model, resolved.request, quality, credentials, resolved.sweep)


def _check_local_loras(request: Request) -> None:
    from .lora.fetch import check_reference

    for lora in request.loras or ():
        check_reference(lora.ref)  # its form, and that a local file exists


def run_order(jobs: Iterable[Job]) -> list[Job]:
    """Jobs grouped by model, then by LoRA set, each group where its first job stood."""
    models: dict[str, dict[tuple, list[Job]]] = {}
    for job in jobs:
        models.setdefault(job.model, {}).setdefault(job.lora_set, []).append(job)
    return [job for sets in models.values() for group in sets.values() for job in group]


# ---------------------------------------------------------------------------- the manifest


class Manifest:
    """manifest.jsonl: one entry per job, appended (and synced) as each ends; the last entry for an output wins."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / MANIFEST
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the line a killed batch was writing
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("output"), str):
                    self.entries[entry["output"]] = entry

    def finished(self, job: Job, folder: Path) -> bool:
        """Whether `job` is done: its entry says so, for this request, and its MP4 is the one recorded."""
        entry = self.entries.get(job.output)
        if not entry or entry.get("status") != "done" or entry.get("job") != job.key:
            return False
        path = folder / job.output
        return path.is_file() and path.stat().st_size == entry.get("bytes") and file_digest(path) == entry.get("sha256")

    def record(self, entry: dict[str, Any]) -> None:
        self.entries[entry["output"]] = entry
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def compact(self, jobs: list[Job]) -> None:
        """Rewrite the manifest as one entry per job, in the jobs file's order (atomically)."""
        lines = [json.dumps(self.entries[job.output], sort_keys=True) for job in jobs if job.output in self.entries]
        partial = self.path.with_name(f".{MANIFEST}.partial")
        partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(partial, self.path)


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# ---------------------------------------------------------------------------- running


class JobRunner:
    """Runs jobs on one resident pipeline: a job for another model loads it in place of the last."""

    def __init__(self, load_options: dict[str, Any] | None = None) -> None:
        self.load_options = load_options or {}
        self.pipe: WanLoraPipeline | None = None
        self.model: str | None = None
        self.loads: list[str] = []  # the models loaded, in order

    def video(self, job: Job) -> Video:
        from .pipeline import load_in_place_of

        if self.model != job.model:
            previous, self.pipe, self.model = self.pipe, None, None
            self.pipe = load_in_place_of(previous, job.model, **self.load_options)
            self.model = job.model
            self.loads.append(job.model)
        assert self.pipe is not None
        request = job.request_for(self.pipe)
        if job.sweep:
            swept = self.pipe.run_sweep(request, job.sweep, job.credentials, progress=False)
            video = None if swept is None else swept.grid
        else:
            video = self.pipe.run(request, job.credentials, progress=False)
        assert video is not None  # one process: it is rank 0
        return video

    def run(self, job: Job, folder: Path) -> dict[str, Any]:
        """Run `job` into `folder`: its manifest entry, done or failed (one job's failure is its own)."""
        started = time.perf_counter()
        try:
            video = self.video(job)
            path = inside(folder, job.output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path = video.save(path, quality=job.quality)
        except WanLoraError as exc:
            return failed_entry(job, str(exc))
        except Exception as exc:  # a bug: reported on the job as the CLI reports it, and the batch goes on
            return failed_entry(job, str(InternalError.of(exc)))
        seconds = round(time.perf_counter() - started, 3)
        timings = {name: round(value, 3) for name, value in video.timings.items()}
        digest = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        return {**job.entry, "status": "done", "seed": video.seed, **digest, "seconds": seconds, "timings": timings}


def failed_entry(job: Job, error: str) -> dict[str, Any]:
    return {**job.entry, "status": "failed", "seed": job.request.settings.seed, "error": error}


@dataclass
class Summary:
    total: int
    done: int = 0  # in this run
    skipped: int = 0  # done by an earlier run
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        """The number of failed jobs, at most 100 (GNU parallel's rule): 0 when every job is done."""
        return min(len(self.failed), 100)

    def add(self, entry: dict[str, Any]) -> None:
        """Count a job that ended (and say so when it failed)."""
        self.done += entry["status"] == "done"
        if entry["status"] == "failed":
            self.failed.append(entry)
            logger.warning("line %d failed: %s", entry["line"], entry["error"])

    def describe(self, manifest: Path) -> str:
        failed = f"{len(self.failed)} failed" + (
            " (" + ", ".join(f"line {e['line']}" for e in self.failed[:10]) + ")" if self.failed else ""
        )
        return f"{self.total} jobs: {self.done} done, {self.skipped} already done, {failed}; manifest {manifest}"


def pending_jobs(jobs: list[Job], folder: Path) -> tuple[Manifest, list[Job], Summary]:
    """The manifest, the jobs still to run (in run order) and a summary counting the skipped ones."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder)
    todo = [job for job in run_order(jobs) if not manifest.finished(job, folder)]
    return manifest, todo, Summary(total=len(jobs), skipped=len(jobs) - len(todo))


def run_batch(
    jobs: list[Job],
    folder: str | os.PathLike,
    load_options: dict[str, Any] | None = None,
    progress: bool = True,
    runner: JobRunner | None = None,
) -> Summary:
    """Run every job not done yet into `folder`, in one process, and keep its manifest."""
    from tqdm import tqdm

    folder = Path(folder)
    manifest, todo, summary = pending_jobs(jobs, folder)
    runner = runner or JobRunner(load_options)
    with tqdm(total=len(jobs), initial=summary.skipped, desc="batch", unit="job", disable=not progress) as bar:
        for job in todo:
            entry = runner.run(job, folder)
            manifest.record(entry)
            summary.add(entry)
            bar.update()
    manifest.compact(jobs)
    return summary
