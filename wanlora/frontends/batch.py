"""Batches: many requests from a JSONL file, each model loaded once and each LoRA set merged once.

A line is one request, in the Python API's fields (`model`, and `prompt`, `loras`, `seed` and the
rest of wanlora.options' GenerationOptions) or in the predictor's (a `samples/` file is a
valid line), plus two of the batch's own: `output`, a file name in the batch's folder, and
`quality`. A line means only what it says: a field it leaves out is that field's default
(no `loras`: no LoRAs), never what the job before it left on the model. Relative paths in a
line are the jobs file's folder's, as `make` and Compose read them.

Every line is checked before any work starts; an image is checked by its header (a link by
its form) and read when its job runs, so one that fails fails its job alone. Jobs run grouped
by model, then by LoRA set. The manifest, `manifest.jsonl` in the folder, records each job
as it ends, by rename (never through a link); a rerun skips every job whose MP4 is there and
matches its entry, so a killed batch resumes. A job is identified by what it runs with, its
input files by their content: moving the models or LoRAs does not make jobs new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import BatchLineError, InternalError, InvalidInput, WanLoraError, shown_value
from ..identity import content_digest
from ..images import ImageHeader
from ..lora.fetch import Credentials
from ..lora.refs import display_ref, parse_ref
from ..models import CATALOGUE, TINY_NAMES
from ..options import IMAGE_OPTIONS, option_names, options_from, refuse_unknown
from ..paths import PathRefused, inside, relative_name
from ..request import Request
from ..resident import Prepared, ResidentModel, prepare
from ..settings import DEFAULT_MODEL, DEFAULT_QUALITY
from ..staging import remove_abandoned, staged_file
from ..video import Video, quality_to_crf
from .service import MODEL_CHOICES, PredictorInputs, VideoService, carried_options, declared_inputs

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
BATCH_FIELDS = ("output", "quality")
PREDICTOR_FIELDS = (*declared_inputs(), *carried_options())  # the inputs predict.py can offer
PREDICTOR_LORA_FIELDS = (
    "lora_weights",
    "extra_lora",
    "replicate_weights",
    "lora_weights_transformer",
    "lora_weights_transformer_2",
)
SOME_JOBS_FAILED = 3  # `wanlora batch`'s exit status when it ran, and some jobs failed (1: a bug, 2: an input error)


@dataclass(frozen=True)
class Job:
    """One checked line: what to run (its images checked, read when it runs), and where its MP4 goes."""

    line: int
    key: str  # a digest of what the job runs with: the manifest matches a finished job on it
    output: str  # a file name in the batch's folder
    prepared: Prepared
    quality: int
    credentials: Credentials = field(default_factory=Credentials)

    @property
    def model(self) -> str:
        """The model to load: a catalogue or tiny name, a folder or a Hub repo."""
        return self.prepared.model

    @property
    def request(self) -> Request:
        return self.prepared.request

    @property
    def lora_set(self) -> tuple:
        return self.prepared.lora_set

    @property
    def entry(self) -> dict[str, Any]:
        """What every manifest entry of this job starts with."""
        return {"output": self.output, "line": self.line, "job": self.key, "model": self.model}


def prepare_line(fields: dict[str, Any], predictor: bool) -> tuple[Prepared, Credentials]:
    """A line's request fields checked and resolved, its images checked by their headers."""
    fields = {"prompt": None, **fields}  # missing: said so by the check of its value
    if predictor:
        service = VideoService(override="", i2v_override="", resident=ResidentModel())
        resolved = service.resolve(PredictorInputs.of(**fields), images_read=False)
        credentials = replace(resolved.credentials, local_files=True)  # this machine's own files: it is the user's
        return resolved.prepared, credentials
    model = fields.pop("model")
    return prepare(model, options_from(fields, "a batch line"), images_read=False), Credentials()


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Every line of a jobs file, checked: an error names the line, and nothing runs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("jobs", str(path), f"a readable UTF-8 JSONL file ({exc})") from None
    jobs: list[Job] = []
    base = path.absolute().parent
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for number, line in lines:  # first each line's JSON, which costs nothing: a typo on the last line is found at once
        try:
            json_fields(line)
        except WanLoraError as exc:
            raise BatchLineError(f"{path.name} line {number}: {exc}") from None
    for number, line in lines:
        try:
            jobs.append(parse_job(number, line, base))
        except WanLoraError as exc:
            raise BatchLineError(f"{path.name} line {number}: {exc}") from None
    if not jobs:
        raise InvalidInput("jobs", str(path), "a JSONL file with one request a line; this one has none")
    outputs: dict[str, int] = {}
    for job in jobs:
        if job.output in outputs:
            raise BatchLineError(
                f"{path.name} line {job.line}: output {display_ref(job.output)!r} is line {outputs[job.output]}'s "
                "as well"
            )
        outputs[job.output] = job.line
    return jobs


def json_fields(line: str) -> dict[str, Any]:
    """A line's JSON object. A line that is not one whole object (`{` alone, `"prompt": ...,`) is most
    likely part of a pretty-printed object: the error says that a job is one line."""
    try:  # the line is never echoed: it may hold a token
        fields = json.loads(line)
    except json.JSONDecodeError as exc:
        text = line.strip()
        whole = text.startswith("{") and text.endswith("}")
        hint = "" if whole else "; a job is one line of JSON (JSONL): an object spread over several lines is not one"
        raise BatchLineError(f"not one JSON object ({exc.msg} at column {exc.colno}){hint}") from None
    except (ValueError, RecursionError):  # past Python's parser: nested thousands deep, a number too long
        raise BatchLineError("JSON nested too deeply or with a number too long to be a request") from None
    if not isinstance(fields, dict):
        raise BatchLineError(f"a JSON {type(fields).__name__}, not one object of a request's fields")
    return fields


def parse_job(number: int, line: str, base: Path | None = None) -> Job:
    """Line `number` checked; relative paths in it are `base`'s (the jobs file's folder; default the current one)."""
    fields = json_fields(line)
    output = fields.pop("output", f"job-{number:04d}.mp4")
    if not isinstance(output, str) or not output.lower().endswith(".mp4"):
        raise InvalidInput("output", output, "a file name ending in .mp4, in the batch's folder")
    output = str(relative_name(output, "output"))
    quality = fields.pop("quality", fields.pop("output_quality", DEFAULT_QUALITY))
    quality_to_crf(quality, "quality")
    refuse_mixed_forms(fields)
    predictor = _in_predictor_fields(fields)
    fields = _with_paths_from(base or Path.cwd(), fields, predictor)
    if predictor:
        refuse_unknown({k: v for k, v in fields.items() if k not in PREDICTOR_FIELDS}, PREDICTOR_FIELDS, "a batch line")
    else:
        known = ["model", *option_names(), *BATCH_FIELDS]
        refuse_unknown({k: v for k, v in fields.items() if k not in known}, [*known, *PREDICTOR_FIELDS], "a batch line")
        fields.setdefault("model", DEFAULT_MODEL)
        if not isinstance(fields["model"], str):
            raise InvalidInput("model", fields["model"], "a model name, folder or Hub repo")
        if fields.get("loras") is None:
            fields["loras"] = []  # left out, or null: no LoRAs, never the set the last job left on the model
    prepared, credentials = prepare_line(fields, predictor)
    for lora in prepared.request.loras or ():
        from ..lora.fetch import check_reference

        check_reference(lora.ref)  # its form, and that a local file exists
    key = job_key(prepared, quality, seeded=fields.get("seed") is not None)
    return Job(number, key, output, prepared, quality, credentials)


def refuse_mixed_forms(fields: dict[str, Any]) -> None:
    """Refuse a line that uses fields (or a model name) of both forms, saying which form each belongs to:
    each form alone would refuse the other's field as unknown, which hides what is wrong."""
    library_only = {*option_names()} - set(PREDICTOR_FIELDS)
    predictor_only = set(PREDICTOR_FIELDS) - {"model", *option_names(), *BATCH_FIELDS, "output_quality"}
    library = [name for name in fields if name in library_only]
    predictor = [name for name in fields if name in predictor_only]
    model = fields.get("model")
    if isinstance(model, str) and predictor and not library and model not in MODEL_CHOICES:
        library = [f"model {shown_value(model)} (the predictor's models: {', '.join(MODEL_CHOICES)})"]
    elif isinstance(model, str) and library and not predictor and model in MODEL_CHOICES:
        predictor = [f"model {shown_value(model)} (the library's names: {', '.join(CATALOGUE)})"]
    if library and predictor:
        raise BatchLineError(
            "a line is in the library's form or the predictor's, not both: "
            f"{_and(library)} {'is' if len(library) == 1 else 'are'} the library's; "
            f"{_and(predictor)} {'is' if len(predictor) == 1 else 'are'} the predictor's "
            "(the batch docs' field table says which form takes which field)"
        )


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _in_predictor_fields(fields: dict[str, Any]) -> bool:
    """A line is read as the predictor reads it when it uses a name or model choice only the predictor has."""
    library = {"model", *option_names()}
    model = fields.get("model")
    return bool(set(fields) & (set(PREDICTOR_FIELDS) - library)) or (isinstance(model, str) and model in MODEL_CHOICES)


# ---------------------------------------------------------------------------- paths and identity


def _with_paths_from(base: Path, fields: dict[str, Any], predictor: bool) -> dict[str, Any]:
    """`fields` with each relative path (a model folder, a LoRA, an image) made `base`'s."""
    fields = dict(fields)
    model = fields.get("model")
    if not predictor and isinstance(model, str) and model not in CATALOGUE and model not in TINY_NAMES:
        fields["model"] = _from_base(base, model, lambda path: path.exists())
    for name in IMAGE_OPTIONS:
        if isinstance(fields.get(name), str) and "://" not in fields[name]:
            fields[name] = _from_base(base, fields[name], lambda path: True)
    for name in PREDICTOR_LORA_FIELDS if predictor else ():
        fields[name] = _lora_from_base(base, fields.get(name))
    listed = fields.get("loras")
    if predictor and isinstance(listed, str):  # fal's list as the predictor takes it, JSON text
        try:
            listed = json.loads(listed)
        except (ValueError, RecursionError):
            listed = None  # the service names what is wrong with it
    if isinstance(listed, list):
        fields["loras"] = [_lora_item_from_base(base, item) for item in listed]
    return fields


def _lora_item_from_base(base: Path, item: object) -> object:
    if isinstance(item, list) and item:
        return [_lora_from_base(base, item[0]), *item[1:]]
    if isinstance(item, dict) and "path" in item:  # fal's {path, scale, transformer}
        return {**item, "path": _lora_from_base(base, item["path"])}
    return _lora_from_base(base, item)


def _lora_from_base(base: Path, ref: object) -> object:
    """A LoRA reference, made `base`'s when it reads as a path there (as `parse_ref` reads one here)."""
    if not isinstance(ref, str) or "://" in ref or ref.strip().lower().startswith("civitai:"):
        return ref
    from ..lora.refs import _looks_like_path

    text = ref.strip()
    first = text.split("/", 1)[0]
    return _from_base(
        base, text, lambda path: _looks_like_path(text) or path.exists() or ("/" in text and (base / first).is_dir())
    )


def _from_base(base: Path, text: str, is_path) -> str:
    """`text` joined to `base` when it is a relative path (`is_path` says, given the joined path); else as it is."""
    try:
        if not text or Path(text).expanduser().is_absolute() or text.startswith("~"):
            return text
        joined = base / text
        return str(joined) if text.startswith(("./", "../")) or is_path(joined) else text
    except (OSError, ValueError):  # a NUL, a name too long: the check that follows says what is wrong
        return text


def job_key(prepared: Prepared, quality: int, seeded: bool) -> str:
    """A digest of what a job runs with: its defaults filled in, files named by content, no secrets.

    A line without a seed runs with any seed: it is done once one of its runs is.
    """
    request = prepared.request
    settings = {**request.settings.as_dict(), "seed": request.settings.seed if seeded else None}
    identity = {
        "model": _model_identity(prepared.model),
        "settings": settings,
        "images": [_image_identity(image) for image in request.images],
        "loras": [[_lora_identity(lora.ref), lora.strength, lora.expert] for lora in request.loras or ()],
        "accelerator": request.accelerator.name if request.accelerator else None,
        "run": [request.resize, request.fast_mode, request.cfg_batch, request.framed_by_image],
        "sweep": [[axis.kind, list(axis.values), axis.lora] for axis in prepared.sweep or ()],
        "quality": quality,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_identity(model: str) -> str:
    if model in CATALOGUE or model in TINY_NAMES or not Path(model).expanduser().exists():
        return model  # a name, or a Hub repo: the same everywhere
    return f"folder:{content_digest(Path(model).expanduser())}"


def _lora_identity(ref: str) -> str:
    source = parse_ref(ref)
    if source.kind == "local":
        return f"file:{content_digest(source.local_path)}"
    return source.canonical  # without secrets


def _image_identity(image: object) -> str:
    if isinstance(image, ImageHeader) and image.size is not None:
        return f"file:{content_digest(image.source)}"
    return display_ref(image.source) if isinstance(image, ImageHeader) else type(image).__name__


def run_order(jobs: Iterable[Job]) -> list[Job]:
    """Jobs grouped by model, then by LoRA set, each group where its first job stood."""
    models: dict[str, dict[tuple, list[Job]]] = {}
    for job in jobs:
        models.setdefault(job.model, {}).setdefault(job.lora_set, []).append(job)
    return [job for sets in models.values() for group in sets.values() for job in group]


# ---------------------------------------------------------------------------- the manifest


class ManifestUnwritable(WanLoraError):
    """The manifest cannot be written (a full disk): the batch stops; what was recorded stays recorded."""


class Manifest:
    """manifest.jsonl: one entry per job, the whole file replaced by rename (and synced) as each job ends.

    It is never written through: a new file beside it is renamed over it, so a symlink or a hard
    link placed there is replaced, not followed, and a reader (or a killed batch) sees a whole file.
    A symlink there is refused when the batch starts, rather than read.
    """

    def __init__(self, folder: Path) -> None:
        if (folder / MANIFEST).is_symlink():
            raise PathRefused(f"{folder / MANIFEST} is a symbolic link; a batch writes its own manifest: remove it")
        self.path = inside(folder, MANIFEST)
        self.entries: dict[str, dict[str, Any]] = {}
        for line in self._read().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line an older wanlora was appending when killed
                continue
            if isinstance(entry, dict) and isinstance(entry.get("output"), str):
                self.entries[entry["output"]] = entry

    def _read(self) -> str:
        try:
            handle = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return ""
        except OSError as exc:  # ELOOP: a symlink put there since
            raise ManifestUnwritable(f"cannot read {self.path}: {exc.strerror or exc}") from None
        with os.fdopen(handle, encoding="utf-8", errors="replace") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise PathRefused(f"{self.path} is not a file; a batch writes its own manifest there: remove it")
            return file.read()

    def finished(self, job: Job, folder: Path) -> bool:
        """Whether `job` is done: its entry says so, for this request, and its MP4 is the one recorded."""
        entry = self.entries.get(job.output)
        if not entry or entry.get("status") != "done" or entry.get("job") != job.key:
            return False
        try:
            path = inside(folder, job.output)
        except PathRefused:
            return False
        return path.is_file() and path.stat().st_size == entry.get("bytes") and file_digest(path) == entry.get("sha256")

    def record(self, entry: dict[str, Any]) -> None:
        self.entries[entry["output"]] = entry
        self._write(list(self.entries.values()))

    def compact(self, jobs: list[Job]) -> None:
        """The manifest as one entry per job, in the jobs file's order."""
        self._write([self.entries[job.output] for job in jobs if job.output in self.entries])

    def _write(self, entries: list[dict[str, Any]]) -> None:
        try:
            with staged_file(self.path) as file:
                file.write("".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries))
        except OSError as exc:
            recorded = "the jobs recorded before stay recorded" if self.path.exists() else "nothing was recorded"
            raise ManifestUnwritable(
                f"cannot write {self.path} ({exc.strerror or exc}): the batch stopped; {recorded}, and running "
                "it again resumes (free some space first)"
            ) from None


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# ---------------------------------------------------------------------------- running


class JobRunner:
    """Runs jobs on one resident model (wanlora.resident): a job for another model loads it in place of the last."""

    def __init__(self, load_options: dict[str, Any] | None = None, resident: ResidentModel | None = None) -> None:
        self.resident = resident or ResidentModel(**(load_options or {}))

    def video(self, job: Job) -> Video:
        video = self.resident.run(job.prepared, job.credentials, progress=False)  # images read now: theirs to fail
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
    def finished(self) -> int:
        """Jobs done, by this run or an earlier one."""
        return self.done + self.skipped

    @property
    def exit_status(self) -> int:
        """0 when every job is done; SOME_JOBS_FAILED when some failed (the summary counts them)."""
        return SOME_JOBS_FAILED if self.failed else 0

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the batch runs, so that it stops as Ctrl-C stops it."""


class BatchInterrupted(KeyboardInterrupt):
    """A batch stopped by Ctrl-C or SIGTERM; what ended is recorded, and the message says how to go on."""

    def __init__(self, jobs: list[Job], manifest: Manifest, signum: int) -> None:
        # counted from the manifest, not the run's tally: a signal between recording a job and counting it
        # would leave the tally one short of what a resume will find done
        entries = [(job, manifest.entries.get(job.output) or {}) for job in jobs]
        statuses = [entry.get("status") for job, entry in entries if entry.get("job") == job.key]
        self.done, self.failed, self.signum = statuses.count("done"), statuses.count("failed"), signum
        failed = f", {self.failed} failed" if self.failed else ""
        super().__init__(f"{self.done} of {len(jobs)} done{failed}; run the same command again to resume")


@contextmanager
def interruptible(jobs: list[Job], manifest: Manifest) -> Iterator[None]:
    """Ctrl-C or SIGTERM while the jobs run: the manifest compacted, and a `BatchInterrupted` with the counts.

    A SIGTERM during a staged write arrives as staging's SystemExit(143), after its cleanup.
    """
    previous = _sigterm_interrupts()
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as exc:
        by_sigterm = isinstance(exc, Terminated) or (isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM)
        if isinstance(exc, SystemExit) and not by_sigterm:
            raise
        try:
            manifest.compact(jobs)
        except WanLoraError:  # a full disk: the entries recorded so far stay as they were written
            pass
        raise BatchInterrupted(jobs, manifest, signal.SIGTERM if by_sigterm else signal.SIGINT) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_interrupts():
    """SIGTERM raises Terminated in the main thread; the previous handler, or None elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, stop)


def pending_jobs(jobs: list[Job], folder: Path) -> tuple[Manifest, list[Job], Summary]:
    """The manifest, the jobs still to run (in run order) and a summary counting the skipped ones.

    What a killed run of this batch left staging (a partial MP4 and its tags, a manifest being
    written) is removed first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(folder)
    remove_abandoned(manifest.path)
    for job in jobs:
        try:
            output = inside(folder, job.output)
        except PathRefused:
            continue  # refused when the job runs, as its own failure
        if output.parent.is_dir():
            remove_abandoned(output)
    todo = [job for job in run_order(jobs) if not manifest.finished(job, folder)]
    return manifest, todo, Summary(total=len(jobs), skipped=len(jobs) - len(todo))


def run_batch(
    jobs: list[Job],
    folder: str | os.PathLike,
    load_options: dict[str, Any] | None = None,
    progress: bool = True,
    runner: JobRunner | None = None,
) -> Summary:
    """Run every job not done yet into `folder`, in one process, and keep its manifest.

    Jobs run grouped by model, then by LoRA set, so that each model loads once and LoRAs swap
    in place. A job the manifest records as done, with its MP4 still there and unchanged, is
    skipped: a killed or failed batch resumes by running it again.

    Args:
        jobs: The checked jobs, as `read_jobs` reads them from a JSON Lines file (one request a line).
        folder: Where each job's MP4 and the manifest (`manifest.jsonl`) go; made if missing.
        load_options: Keyword arguments for `WanLoraPipeline.from_pretrained` (device, offload,
            quantize, ...), the same for every model the batch loads.
        progress: Show a progress bar over the jobs.
        runner: The `JobRunner` to run on (one resident model), to share a loaded model with the
            caller; by default a new one with `load_options`.

    Returns:
        A `Summary`: the jobs done now, those done by an earlier run, and the failed ones with their
        errors (a job's failure is its own: the others still run). `Summary.exit_status` is the CLI's.

    Example:
        >>> summary = run_batch(read_jobs("jobs.jsonl"), "out/")
        >>> print(summary.describe(Path("out/manifest.jsonl")))
    """
    from tqdm import tqdm

    folder = Path(folder)
    manifest, todo, summary = pending_jobs(jobs, folder)
    runner = runner or JobRunner(load_options)
    with (
        interruptible(jobs, manifest),
        tqdm(total=len(jobs), initial=summary.skipped, desc="batch", unit="job", disable=not progress) as bar,
    ):
        for job in todo:
            entry = runner.run(job, folder)
            manifest.record(entry)
            summary.add(entry)
            bar.update()
    manifest.compact(jobs)
    return summary
