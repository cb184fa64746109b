"""Which loaded components a model may take from the one it replaces: only those proven the same.

A batch or a server loads one model in place of another (`load_in_place_of`), and the
tokenizer, the text encoder and the VAE are worth keeping: UMT5 alone is 11.4 GB. One is kept
only when the new model's own is proven the same, file by file:
- the same file: one path, and there the same file (device, inode, size, modification time),
  so a folder linked into two models shares, and a file rewritten since does not;
- or the same content by its hash: the Hub names each file by it (an LFS file's sha256, any
  other's git blob id), in its API's listing and in the names of its cache's blobs, so a Hub
  repo is compared before anything is downloaded, and two repos that publish the same UMT5
  share it.
Anything else (another folder's copy, a changed file, a listing that cannot be had) loads.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

Identity = tuple[tuple[str, str], ...]  # (file name within the component, what proves its content), sorted
SHARABLE = ("tokenizer", "text_encoder", "vae")  # what a Wan model can take from another
HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def folder_identity(folder: Path) -> Identity | None:
    """The identity of a component's folder (`MODEL/vae` ...), or None where it holds no files."""
    if not folder.is_dir():
        return None
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return tuple((path.relative_to(folder).as_posix(), file_identity(path)) for path in files) or None


def file_identity(path: Path) -> str:
    """A blob of the Hub's cache by its hash (its name); any other file by where it is and which file it is."""
    real = path.resolve()
    if real.parent.name == "blobs" and HASH.fullmatch(real.name):
        return f"hash:{real.name}"
    stat = real.stat()
    return f"file:{real}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def hub_identity(repo: str, component: str) -> Identity | None:
    """The identity of a Hub repo's component from the Hub's listing (nothing downloaded), or None without one."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    prefix = f"{component}/"
    try:
        entries = list(HfApi().list_repo_tree(repo, path_in_repo=component, recursive=True))
    except Exception as exc:  # offline, gone, refused: not proven the same, so it loads (and its error shows then)
        logger.debug("no listing of %s/%s: %s", repo, component, exc)
        return None
    files = sorted(
        (entry.path.removeprefix(prefix), f"hash:{entry.lfs.sha256 if entry.lfs else entry.blob_id}")
        for entry in entries
        if isinstance(entry, RepoFile) and entry.path.startswith(prefix)
    )
    return tuple(files) or None


def model_identities(source: str, folder: Path | None, names: tuple[str, ...] = SHARABLE) -> dict[str, Identity]:
    """Each named component's identity for a model: from its folder where it is on disk, else from the Hub."""
    found = {}
    for name in names:
        identity = folder_identity(folder / name) if folder is not None else hub_identity(source, name)
        if identity is not None:
            found[name] = identity
    return found
