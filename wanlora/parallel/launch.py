"""`wanlora generate --gpus N`: start N copies of the command the way torchrun would.

torch's elastic launcher does the work: a rendezvous on a free local port, RANK /
LOCAL_RANK / WORLD_SIZE for each process, and when one process dies the others are
stopped and the launch fails instead of waiting forever.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence

from . import LAUNCHED_BY_GPUS

USER_ERROR = 2  # the exit code of a worker that already printed a one-line error


def run_workers(nprocs: int, argv: Sequence[str], quiet: bool = True) -> int:
    """Run `wanlora ARGV` in `nprocs` processes of one process group; the exit code to return.

    `quiet` keeps the launcher's own log lines back; a failure is reported in one line.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if quiet:  # each elastic module sets its own logger's level, so each is quieted
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    # Like torchrun: one OpenMP pool per process, sharing the cores instead of fighting over them.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    os.environ[LAUNCHED_BY_GPUS] = "1"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nprocs,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port on this machine
        max_restarts=0,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "wanlora.frontends.cli", *argv)
    except ChildFailedError as exc:
        # the launcher stops the survivors with SIGTERM: the cause is the other failure
        rank, failure = min(exc.failures.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM, item[0]))
        if failure.exitcode == USER_ERROR:
            return USER_ERROR
        print(f"wanlora: error: worker process {rank} {describe_exit(failure.exitcode)}", file=sys.stderr)
        return 1
    except SignalException as exc:  # Ctrl-C or a kill reached the launcher; it stopped the workers
        print(f"wanlora: interrupted ({signal.Signals(exc.sigval).name}); the workers were stopped", file=sys.stderr)
        return 130
    return 0


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}; the other workers were stopped"
    return f"failed with exit code {code}; the other workers were stopped"
