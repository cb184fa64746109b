"""Persistent workers for a long-lived server with several GPUs: one process per GPU.

The server process holds no model. `WorkerGroup` starts one worker per GPU; they form a
torch.distributed group and each loads a `VideoService` whose pipelines are parallel over
it (see wanlora.parallel.distributed). A request goes to every worker and rank 0 answers with the
video. Every worker validates the request the same way, so a bad input fails on all of
them at once and the same error comes back.

The caller waits on the workers' replies and on the processes themselves: when a worker
dies (out of memory, a driver fault, a kill), the request fails at once with
`WorkerCrashed`, the survivors are stopped, and a fresh group starts loading for the next
request. Nothing waits on a dead peer.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import socket
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WanLoraError, WorkerCrashed
from ..settings import gpu_workers

if TYPE_CHECKING:
    from .service import PredictorInputs, Result

logger = logging.getLogger(__name__)

STRAGGLER_SECONDS = 30.0


def worker_count() -> int:
    """WANLORA_GPUS, else every visible GPU (at least one process)."""
    configured = gpu_workers()
    if configured is not None:
        return configured
    import torch

    return max(1, torch.cuda.device_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, port: int, conn: Connection, service_options: dict[str, Any]) -> None:
    """A worker's life: join the group, load the default model, then answer requests until told to stop."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    from .service import VideoService

    try:
        service = VideoService(parallel="auto", **service_options)
        service.load(service.model_for("14b"))
    except Exception as exc:
        _reply(conn, None, exc)
        return
    _reply(conn, None, None)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the server went away without saying goodbye
            return
        if message is None:
            return
        request_id, (inputs, out_dir) = message
        try:
            _reply(conn, request_id, service.generate(inputs, out_dir))
        except Exception as exc:  # the caller decides; this worker stays up for the next request
            _reply(conn, request_id, exc)


def _reply(conn: Connection, request_id: int | None, outcome: Any) -> None:
    try:
        conn.send((request_id, outcome))
    except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
        conn.send((request_id, WanLoraError(f"{type(outcome).__name__}: {outcome}")))


class WorkerGroup:
    """`VideoService.generate` on `size` worker processes, one per GPU."""

    def __init__(self, size: int, **service_options: Any) -> None:
        self.size = size
        self.service_options = service_options
        self.processes: list[BaseProcess] = []
        self.connections: list[Connection] = []
        self.ready = False
        self.next_request = 0
        self.start()

    def start(self) -> None:
        """Spawn the workers; they load in the background until `wait_ready`."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot survive a fork
        port = _free_port()
        self.processes, self.connections, self.ready = [], [], False
        for rank in range(self.size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_serve,
                args=(rank, self.size, port, theirs, self.service_options),
                name=f"wanlora-worker-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.connections.append(ours)
        logger.info("started %d workers (pids %s)", self.size, ", ".join(str(p.pid) for p in self.processes))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]  # every started one

    def wait_ready(self) -> None:
        """Block until every worker has loaded its model; a load error stops the group and is raised."""
        if self.ready:
            return
        if not self.processes:
            self.start()
        started = time.perf_counter()
        try:
            self._collect(None)
        except WorkerCrashed:  # a fresh group is already loading
            raise
        except Exception:
            self.close()
            raise
        self.ready = True
        logger.info("%d workers ready in %.1fs", self.size, time.perf_counter() - started)

    def generate(self, inputs: PredictorInputs, out_dir: Path) -> Result:
        """Run one request (`VideoService.generate`'s arguments) on every worker and return rank 0's result."""
        self.wait_ready()
        self.next_request += 1
        for rank, conn in enumerate(self.connections):
            try:
                conn.send((self.next_request, (inputs, out_dir)))
            except OSError:  # a worker died between requests
                self._restart_after_crash(rank)
        return self._collect(self.next_request)

    def _collect(self, request_id: int | None):
        """Every worker's reply to `request_id`, watching the processes while waiting.

        Once one worker has failed, the others get STRAGGLER_SECONDS to answer too: a rank
        that failed alone leaves the rest waiting in a collective, and then the group is
        stopped (the next request starts a fresh one).
        """
        replies: dict[int, Any] = {}
        deadline = None
        while len(replies) < self.size:
            waiting = {conn: rank for rank, conn in enumerate(self.connections) if rank not in replies}
            sentinels = {self.processes[rank].sentinel: (conn, rank) for conn, rank in waiting.items()}
            ready = wait([*waiting, *sentinels], None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close(grace=0)
                break
            for sentinel, (conn, rank) in sentinels.items():
                if sentinel in ready and not conn.poll():
                    self._restart_after_crash(rank)  # it ended with nothing left to say
            for conn, rank in waiting.items():
                if conn not in ready:
                    continue
                try:
                    got, outcome = conn.recv()
                except (EOFError, OSError):
                    self._restart_after_crash(rank)
                if got == request_id:  # older replies belong to an abandoned (cancelled) request
                    replies[rank] = outcome
                    if isinstance(outcome, BaseException) and deadline is None:
                        deadline = time.monotonic() + STRAGGLER_SECONDS
        errors = [outcome for _, outcome in sorted(replies.items()) if isinstance(outcome, BaseException)]
        if errors:
            raise errors[0]  # rank 0's when it has one: it names another rank's failure too
        return replies[0]

    def _restart_after_crash(self, rank: int) -> None:
        dead = self.processes[rank]
        dead.join(timeout=5)  # its pipe closes a moment before its exit code is known
        self.close(grace=0)  # the survivors may be stuck in a collective with the dead one
        self.start()
        raise WorkerCrashed(
            f"worker {rank} (pid {dead.pid}, exit code {dead.exitcode}) stopped during the request, so it "
            "failed; the workers are restarting and the next request will wait for them"
        )

    def close(self, grace: float = 5) -> None:
        """Stop every worker: ask, wait `grace` seconds, then kill."""
        for conn in self.connections:
            try:
                conn.send(None)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
        for process in self.processes:
            process.join(timeout=grace)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self.connections:
            conn.close()
        self.processes, self.connections, self.ready = [], [], False
