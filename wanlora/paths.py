"""One rule for every path built from a request: a relative name that stays inside its root.

A request may name a file by a Hub-style path (`owner/repo/folder/file.safetensors`), and
wanlora may look for it under a folder of its own: the weights folder, the LoRA cache. pathlib
drops whatever stands before an absolute part (`root / "/etc/passwd"` is `/etc/passwd`) and
keeps `..`, so such a name must be judged before it is joined. `relative_name` judges the
form alone, so that a refusal never depends on (and never tells) what exists; `inside`
also follows symlinks, so that a link inside the root cannot lead out of it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath

from .errors import WanLoraError


class PathRefused(WanLoraError, ValueError):
    """A path from a request that could name something outside its folder; the message says why."""


def relative_name(text: str, what: str = "a file name") -> PurePosixPath:
    """`text` as a relative POSIX path of plain parts, or `PathRefused`.

    Refused: empty names and parts (`a//b`), `.` and `..`, absolute paths, `~`, backslashes,
    control characters (NUL included), and parts that Unicode compatibility folding turns
    into any of those (a fullwidth `／`, a one-dot leader `․`).
    """
    if not isinstance(text, str) or not text:
        raise PathRefused(f"{what} is empty")
    if any(unicodedata.category(char) == "Cc" for char in text):
        raise PathRefused(f"{what} holds a control character")
    for form in {text, unicodedata.normalize("NFKC", text)}:
        if form.startswith(("/", "~")) or "\\" in form:
            raise PathRefused(f"{what} must be relative, with forward slashes only")
        if any(part in ("", ".", "..") for part in form.split("/")):
            raise PathRefused(f"{what} has an empty, '.' or '..' part")
    return PurePosixPath(text)


def inside(root: Path, *names: str | PurePosixPath) -> Path:
    """`root` joined with `names` (each judged by `relative_name`), refused unless, with every
    symlink followed, it is still inside `root`."""
    path = root.joinpath(*(relative_name(str(name)) for name in names))
    if not path.resolve().is_relative_to(root.resolve()):
        raise PathRefused("the name leads outside its folder")
    return path
