"""Folders that appear whole or not at all, even when the process is told to stop."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARK = ".staging-"


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A folder beside `target` to write into; it becomes `target` only if the block succeeds.

    Its name carries this process's id, so that one a killed process left behind (tens of GB
    for a 14B model) is removed the next time anyone stages `target`. SIGTERM during the block
    exits through the same cleanup as any failure (`finally` never runs on a bare SIGTERM).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{MARK}{os.getpid()}-", dir=target.parent))
    previous = _exit_on_sigterm()
    try:
        yield staging
        if target.exists():
            target.rmdir()  # empty, as the caller checked
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def remove_abandoned(target: Path) -> list[Path]:
    """Staging folders for `target` whose process is gone; removed, and returned."""
    removed = []
    for folder in target.parent.glob(f".{target.name}{MARK}*"):
        pid = folder.name.removeprefix(f".{target.name}{MARK}").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


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
