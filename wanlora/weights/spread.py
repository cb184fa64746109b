"""Independent tensor jobs spread over the CPU's cores: each job on one thread, each core taking the next.

torch runs every op on all cores, and each parallel region ends at a barrier that waits for
its slowest thread. A merge is thousands of small ops (a copy, a GEMM, a rounding per chunk
of rows). When another process keeps a core busy, every barrier waits for a thread that is
not running: on 2 cores, with one spinning process beside it, the 1.3B-shape swap ran 4 to 17
times slower than idle, where losing half the cores should cost twice. Here each job runs its
ops single-threaded and the jobs are shared out as threads free up (the biggest first), so a
busy core slows only the jobs it holds, and there is no barrier to wait at until the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

MIN_SPREAD_ELEMENTS = 1 << 20  # less work than this runs inline: starting threads would cost more than it saves


@contextmanager
def single_threaded_ops() -> Iterator[int]:
    """torch's ops on one thread (its own pool and MKL's) inside; yields the thread count to restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def run_spread(jobs: Sequence[tuple[int, Callable[[], None]]]) -> None:
    """Run every `(elements, job)`; on as many threads as torch would use, when there is enough work.

    The first exception is raised once every job that started has ended; jobs not started by
    then never run. An interruption of the caller (KeyboardInterrupt) waits for the same.
    """
    ordered = sorted(jobs, key=lambda job: -job[0])
    workers = min(torch.get_num_threads(), len(ordered))
    if workers <= 1 or sum(size for size, _ in ordered) < MIN_SPREAD_ELEMENTS:
        for _, job in ordered:
            job()
        return
    pending = iter(ordered)
    lock, stop = threading.Lock(), threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        while not stop.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                item[1]()
            except BaseException as exc:  # handed to the caller, after the others stop
                errors.append(exc)
                stop.set()

    with single_threaded_ops():
        threads = [threading.Thread(target=work, name=f"wanlora-merge-{i}", daemon=True) for i in range(workers)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:
            stop.set()
            for thread in threads:
                thread.join()
            raise
    if errors:
        raise errors[0]
