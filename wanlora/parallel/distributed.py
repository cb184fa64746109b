"""The parallel runtime: a torch.distributed process group sharing each generation.

Every rank runs the same `generate` with the same arguments: the seed is rank 0's, a LoRA
failure on any rank fails the call on all of them (and puts the old set back), and only
rank 0 decodes the video. The fast-mode step cache runs only without context parallelism:
it would judge each rank's share of the tokens on its own, and the ranks would disagree.
"""

from __future__ import annotations

import atexit
import gc
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel

from ..errors import InvalidInput, WanLoraError
from ..runtime.guidance import SplitGuidance
from ..runtime.patches import cpu_counts_as_one_device
from . import ParallelPlan, has_rendezvous, local_rank

logger = logging.getLogger(__name__)


def resolve_plan(parallel, heads: int, model: str, device: torch.device) -> ParallelPlan:
    """`parallel` for this process group, checked against the model.

    "auto" (or True), a ParallelPlan, or diffusers' own ContextParallelConfig.
    """
    from diffusers import ContextParallelConfig

    world_size = dist.get_world_size()
    if isinstance(parallel, ParallelPlan):
        plan = parallel
    elif isinstance(parallel, ContextParallelConfig):
        plan = ParallelPlan(ulysses=parallel.ulysses_degree, ring=parallel.ring_degree)
    elif parallel == "auto" or parallel is True:
        plan = ParallelPlan.auto(world_size, heads)
    else:
        raise InvalidInput("parallel", parallel, "'auto', a ParallelPlan or a diffusers ContextParallelConfig")
    plan.check(heads, world_size, model, device.type)
    return plan


def init_distributed() -> torch.device:
    """Join the process group torchrun described in the environment; return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if not has_rendezvous():
            raise InvalidInput(
                "parallel",
                "(set)",
                "a torch.distributed process group: launch with `torchrun`, or `wanlora generate --gpus N`",
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # A process that exits with its group alive can abort in the backend's destructors
        # ("terminate called without an active exception") after its work is done.
        atexit.register(leave_group, wait=False)
    return device


def leave_group(wait: bool = True) -> list[str]:
    """Leave the process group for good; return the backend threads still running (none, if nothing holds it).

    destroy_process_group destroys a group's backend only when nothing else refers to it, and the
    context-parallel hooks of a transformer hold their device mesh, which holds the groups. A group
    that outlives it is destroyed at interpreter exit, its threads joined while the other ranks
    are exiting too; gloo then can abort there. So the garbage goes first, and with `wait`, every
    rank waits for the others (their collectives done) before any tears its group down.
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()
    gc.collect()
    return backend_threads()


def backend_threads() -> list[str]:
    """The names of this process's gloo and NCCL threads (Linux; elsewhere none are seen)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(("gloo", "pt_gloo", "pt_nccl", "nccl")):
            names.append(name)
    return sorted(names)


class Parallel:
    """Transformers (one, or Wan2.2's two experts) made context- (and optionally CFG-) parallel
    over the current process group."""

    def __init__(self, transformers: list[WanTransformer3DModel], plan: ParallelPlan, device: torch.device) -> None:
        from diffusers import ContextParallelConfig
        from torch.distributed.device_mesh import init_device_mesh

        self.plan = plan
        self.rank = dist.get_rank()
        mesh = init_device_mesh(
            device.type,
            (2 if plan.cfg else 1, plan.ring, plan.ulysses),
            mesh_dim_names=("cfg", "ring", "ulysses"),
        )
        if plan.context_degree > 1:
            config = ContextParallelConfig(
                ulysses_degree=plan.ulysses, ring_degree=plan.ring, mesh=mesh["ring", "ulysses"]
            )
            with cpu_counts_as_one_device(device):
                for transformer in transformers:
                    transformer.enable_parallelism(config=config)
        self.split_guidance = []
        if plan.cfg:
            branch, group = mesh["cfg"].get_local_rank(), mesh["cfg"].get_group()
            self.split_guidance = [SplitGuidance(branch, group).install(t) for t in transformers]
        logger.info("rank %d of %d: %s", self.rank, plan.world_size, plan.describe())

    @property
    def is_main(self) -> bool:
        """Rank 0 decodes and writes the video; the others only denoise."""
        return self.rank == 0

    def shared_seed(self, seed: int) -> int:
        """Rank 0's seed, so that a random one is the same everywhere."""
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_failure(self, error: Exception | None) -> Exception | None:
        """Share each rank's outcome of a step that may fail on one rank alone.

        Returns this rank's error, else another rank's (as a WanLoraError), else None.
        """
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, text) for rank, text in enumerate(outcomes) if text]
        if error is not None or not failed:
            return error
        rank, text = failed[0]
        return WanLoraError(f"rank {rank} failed, so every rank stopped: {text}")

    def set_guidance(self, guided: bool) -> None:
        """CFG-parallel splits the two passes only when the pipeline runs both."""
        for hook in self.split_guidance:
            hook.active = guided
