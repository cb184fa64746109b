"""Files and folders that appear whole or not at all, even when the process is told to stop.

Every staged write goes through here: a merged model (`staged_folder`), an MP4 and its tags
(`scratch_beside`), a batch's manifest and a collected MP4 (`staged_file`). The work happens
beside the target, under a name that carries this process's id (`.NAME.staging-PID-...`),
and reaches the target by one rename: a symlink at the target is replaced, never followed.
SIGTERM during the work exits through the same cleanup as any failure (`finally` never runs
on a bare SIGTERM), and what a killed process (SIGKILL) left is removed the next time anyone
stages the same target.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

MARK = ".staging-"


@contextmanager
def scratch_beside(target: Path) -> Iterator[Path]:
    """A folder beside `target` for work toward it, removed when the block ends, however it ends."""
    remove_abandoned(target)
    scratch = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    previous = _exit_on_sigterm()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A folder beside `target` to write into; it becomes `target` only if the block succeeds.

    Its name carries this process's id, so that one a killed process left behind (tens of GB
    for a 14B model) is removed the next time anyone stages `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with scratch_beside(target) as staging:
        yield staging
        if target.exists():
            target.rmdir()  # empty, as the caller checked
        staging.rename(target)


@contextmanager
def staged_file(target: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """A new file beside `target` to write; synced, it replaces `target` by rename only if the block succeeds.

    The file is created anew (never an existing file or a link someone placed), so nothing
    outside the folder is ever written through it, and a reader sees the old file or the new
    one whole. An OSError (a full disk) leaves `target` as it was.
    """
    remove_abandoned(target)
    handle, name = tempfile.mkstemp(prefix=staging_prefix(target), dir=target.parent)
    staged = Path(name)
    previous = _exit_on_sigterm()
    try:
        with os.fdopen(handle, "wb" if binary else "w", encoding=None if binary else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(staged, target)
        _sync_folder(target.parent)
    finally:
        staged.unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def staging_prefix(target: Path) -> str:
    """The start of a staging name for `target`: `remove_abandoned` knows its owner by it."""
    return f".{target.name}{MARK}{os.getpid()}-"


def remove_abandoned(target: Path) -> list[Path]:
    """Staging files and folders for `target` whose process is gone; removed, and returned."""
    removed = []
    for left in target.parent.glob(f".{target.name}{MARK}*"):
        pid = left.name.removeprefix(f".{target.name}{MARK}").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
            removed.append(left)
    return removed


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exit_on_sigterm():
    """Make SIGTERM raise SystemExit(143) in this thread, so cleanup runs; the previous handler, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)
