"""The LoRA download cache: complete, verified files only, LRU-bounded, safe across processes.

Layout under `WANLORA_CACHE` (default: the user cache folder, e.g. ~/.cache/wanlora):

    entries/<key>/lora.safetensors   the file, renamed into place once verified
    entries/<key>/entry.json         size, sha256, source, trigger words, last use
    partial/<key>.part               an unfinished download, resumable
    locks/<key>.lock                 one downloader per key, across processes

`<key>` is a hash of the canonical reference, which never holds a secret. An entry exists
only once `entry.json` does, and that is written last, so a failed download is never
listed or taken for a finished file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

DEFAULT_MAX_GB = 50.0


def cache_root() -> Path:
    configured = os.environ.get("WANLORA_CACHE")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wanlora"


def cache_limit_bytes() -> int:
    raw = os.environ.get("WANLORA_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        gb = float(raw)
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(max(gb, 0.0) * 2**30)


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


class LoraCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def key(self, canonical: str) -> str:
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def _dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def partial_path(self, key: str) -> Path:
        path = self.root / "partial" / f"{key}.part"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, key: str) -> FileLock:
        folder = self.root / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(folder / f"{key}.lock"))

    def get(self, canonical: str) -> Entry | None:
        """The complete entry for `canonical`, marked as used now, or None."""
        folder = self._dir(self.key(canonical))
        entry = self._read(folder)
        if entry is None:
            return None
        entry.last_used = time.time()
        self._write_meta(folder, entry)
        return entry

    def put(self, canonical: str, file: Path, sha256: str, trigger_words: list[str]) -> Entry:
        """Move a verified `file` into the cache and record it; then evict to the size limit."""
        folder = self._dir(self.key(canonical))
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        target = folder / "lora.safetensors"
        os.replace(file, target)
        now = time.time()
        entry = Entry(canonical, target.stat().st_size, sha256, now, now, trigger_words, str(target))
        self._write_meta(folder, entry)
        self.evict(keep=folder.name)
        return entry

    def entries(self) -> list[Entry]:
        folder = self.root / "entries"
        found = [self._read(d) for d in folder.iterdir()] if folder.is_dir() else []
        return sorted((e for e in found if e), key=lambda e: e.last_used, reverse=True)

    def evict(self, keep: str | None = None) -> list[Entry]:
        """Remove least-recently-used entries until the cache fits `WANLORA_CACHE_MAX_GB`."""
        limit, removed = cache_limit_bytes(), []
        entries = self.entries()
        total = sum(e.size for e in entries)
        for entry in reversed(entries):  # oldest first
            if total <= limit:
                break
            folder = Path(entry.path).parent
            if folder.name == keep:
                continue
            with self.lock(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
            total -= entry.size
            removed.append(entry)
        return removed

    def clear(self) -> int:
        """Remove every entry and unfinished download; return the bytes freed."""
        freed = sum(e.size for e in self.entries())
        for name in ("entries", "partial"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        return freed

    def _read(self, folder: Path) -> Entry | None:
        meta, file = folder / "entry.json", folder / "lora.safetensors"
        if not meta.is_file() or not file.is_file():
            return None
        try:
            entry = Entry(**json.loads(meta.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None
        return entry if entry.size == file.stat().st_size else None

    def _write_meta(self, folder: Path, entry: Entry) -> None:
        tmp = folder / "entry.json.tmp"
        tmp.write_text(json.dumps(asdict(entry), indent=1))
        os.replace(tmp, folder / "entry.json")
