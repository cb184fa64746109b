"""What a file or a folder holds, as a short digest: a batch names its inputs by content, not by path.

A batch job's identity (the manifest's `job`) must not change when the models or LoRAs it
names are moved, and must change when what they hold changes. A file up to FULL_BYTES is
hashed whole (a LoRA, an image, a config). A larger one (a model's weight shard, tens of GB
a model) is fingerprinted: its size, and SAMPLES evenly spaced blocks from its first byte to
its last, the safetensors header and every shard's ends among them, so that a model is named
in a second, not in minutes. A folder is the digest of its files' names and digests (hidden
files, such as a download tool's bookkeeping, left out). Each digest is computed once per
process for a file as it stands (device, inode, size, modification time).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

FULL_BYTES = 1 << 30
SAMPLES = 32
BLOCK = 1 << 20


def content_digest(path: str | os.PathLike) -> str:
    """The digest of a file's or a folder's content (16 hex digits), whatever its path."""
    path = Path(path)
    if path.is_dir():
        return _folder_digest(path)
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        digest.update(f"{relative.as_posix()}\0{content_digest(path)}\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_digest(path: str, device: int, inode: int, size: int, modified: int) -> str:
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as file:
        if size <= FULL_BYTES:
            digest.update(hashlib.file_digest(file, "sha256").digest())
        else:
            for index in range(SAMPLES):
                file.seek((size - BLOCK) * index // (SAMPLES - 1))
                digest.update(file.read(BLOCK))
    return digest.hexdigest()[:16]
