"""The LoRA download cache: complete, verified files only, LRU-bounded, safe across processes.

Layout under `WANLORA_CACHE` (default: the user cache folder, e.g. ~/.cache/wanlora):

    entries/<key>/lora.safetensors   the file, renamed into place once verified
    entries/<key>/entry.json         size, sha256, source, validators, trigger words, base model, last use
    partial/<key>.part               an unfinished download, resumable
    partial/<key>.part.json          the validators (ETag, Last-Modified) that resuming must match
    locks/<key>.lock                 one downloader per key, across processes

`<key>` is a hash of the canonical reference, which never holds a secret. An entry exists
only once `entry.json` does, and that is written last, so a failed download is never
listed or taken for a finished file. An entry whose bytes no longer match its sha256 is
dropped, not served. An entry fetched with credentials is `protected`: it is served only
after the origin accepts the credentials of the request at hand (see fetch.py).

No process ever holds two entries' locks: eviction takes only the locks that are free at
that moment and skips the rest, so two processes evicting each other's entries cannot wait
on each other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import LoraDownloadError
from ..net import CHUNK, Validators, current_transfer
from ..paths import inside
from ..settings import cache_dir, cache_max_bytes

LOCK_POLL_SECONDS = 0.2


@dataclass
class Entry:
    """One cached LoRA file and what is known about it."""

    source: str
    size: int
    sha256: str
    last_used: float
    created: float = field(default_factory=time.time)
    trigger_words: list[str] = field(default_factory=list)
    path: str = ""
    protected: bool = False  # fetched with credentials: access is re-checked on every use
    etag: str | None = None
    last_modified: str | None = None
    origin_length: int | None = None  # the whole body's length at the origin (a tar's, for an unpacked LoRA)
    base_model: str | None = None  # the base model Civitai's API last named for it

    @property
    def validators(self) -> Validators:
        return Validators(self.etag, self.last_modified, self.origin_length)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class LoraCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir()

    def key(self, canonical: str) -> str:
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def _dir(self, key: str) -> Path:
        return inside(self.root, "entries", key)

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.unwritable(exc) from exc
        return folder

    def unwritable(self, exc: OSError) -> LoraDownloadError:
        return LoraDownloadError(
            f"the LoRA cache folder {self.root} cannot be written ({exc.strerror or type(exc).__name__}); "
            "set WANLORA_CACHE to a writable folder with free space"
        )

    def partial_path(self, key: str) -> Path:
        return inside(self._folder("partial"), f"{key}.part")

    def _lock(self, key: str) -> FileLock:
        return FileLock(str(inside(self._folder("locks"), f"{key}.lock")))

    @contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold `key`'s lock, waiting for another process's download of it; a cancellation ends the wait."""
        lock = self._lock(key)
        transfer = current_transfer()
        while True:
            transfer.check()
            try:
                lock.acquire(timeout=LOCK_POLL_SECONDS)
                break
            except Timeout:
                continue
            except OSError as exc:
                raise self.unwritable(exc) from exc
        try:
            yield
        finally:
            lock.release()

    def get(self, canonical: str) -> Entry | None:
        """The complete, intact entry for `canonical`, marked as used now, or None."""
        folder = self._dir(self.key(canonical))
        entry = self._read(folder)
        if entry is None:
            return None
        try:
            intact = sha256_of(Path(entry.path)) == entry.sha256
        except OSError:  # removed since it was listed
            return None
        if not intact:  # damaged on disk: fetch it again
            shutil.rmtree(folder, ignore_errors=True)
            return None
        entry.last_used = time.time()
        try:
            self._write_meta(folder, entry)
        except OSError:
            pass  # a read-only cache still serves what it holds
        return entry

    def put(
        self,
        canonical: str,
        file: Path,
        trigger_words: list[str],
        protected: bool = False,
        validators: Validators | None = None,
        base_model: str | None = None,
    ) -> Entry:
        """Move a verified `file` into the cache and record it (the caller holds its key's lock)."""
        folder = self._dir(self.key(canonical))
        try:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            target = folder / "lora.safetensors"
            os.replace(file, target)
            now = time.time()
            validators = validators or Validators()
            entry = Entry(
                canonical,
                target.stat().st_size,
                sha256_of(target),
                now,
                now,
                trigger_words,
                str(target),
                protected,
                validators.etag,
                validators.last_modified,
                validators.length,
                base_model,
            )
            self._write_meta(folder, entry)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise self.unwritable(exc) from exc
        return entry

    def record(self, entry: Entry) -> None:
        """Write down what is now known of `entry` (the caller holds its key's lock); a read-only cache keeps
        what it held."""
        try:
            self._write_meta(Path(entry.path).parent, entry)
        except OSError:
            pass

    def entries(self) -> list[Entry]:
        folder = self.root / "entries"
        found = [self._read(d) for d in folder.iterdir()] if folder.is_dir() else []
        return sorted((e for e in found if e), key=lambda e: e.last_used, reverse=True)

    def evict(self, keep: str | None = None) -> list[Entry]:
        """Remove least-recently-used entries until the cache fits `WANLORA_CACHE_MAX_GB`.

        An entry whose lock another process holds (it is being fetched or re-checked) is skipped.
        """
        limit, removed = cache_max_bytes(), []
        entries = self.entries()
        total = sum(e.size for e in entries)
        for entry in reversed(entries):  # oldest first
            if total <= limit:
                break
            folder = Path(entry.path).parent
            if folder.name == keep:
                continue
            lock = self._lock(folder.name)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                lock.release()
            total -= entry.size
            removed.append(entry)
        return removed

    def clear(self) -> tuple[int, int]:
        """Remove every entry and unfinished download that no process is using, each under its key's lock.

        Returns (bytes freed, entries kept because another process holds them): a fetch in
        another process is never left with a file taken from under it.
        """
        keys = {d.name for d in (self.root / "entries").glob("*")}
        keys |= {p.name.split(".", 1)[0] for p in (self.root / "partial").glob("*")}
        freed, busy = 0, 0
        for key in sorted(keys):
            lock = self._lock(key)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                busy += 1
                continue
            try:
                entry = self._read(self._dir(key))
                shutil.rmtree(self._dir(key), ignore_errors=True)
                for leftover in (self.root / "partial").glob(f"{key}.*"):
                    leftover.unlink(missing_ok=True)
                freed += entry.size if entry else 0
            finally:
                lock.release()
        return freed, busy

    def _read(self, folder: Path) -> Entry | None:
        meta, file = folder / "entry.json", folder / "lora.safetensors"
        try:
            entry = Entry(**{**json.loads(meta.read_text()), "path": str(file)})
            return entry if entry.size == file.stat().st_size else None
        except (OSError, ValueError, TypeError):
            return None

    def _write_meta(self, folder: Path, entry: Entry) -> None:
        tmp = folder / "entry.json.tmp"
        tmp.write_text(json.dumps(asdict(entry), indent=1))
        os.replace(tmp, folder / "entry.json")
