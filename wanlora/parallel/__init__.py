"""How several processes share one video: the parallel plan, checked before anything loads.

Each process (one per GPU) holds the whole model and a share of the video's tokens.
Between transformer blocks nothing moves; inside attention, diffusers' context-parallel
hooks exchange what is needed: Ulysses swaps sequence shards for head shards with
all-to-all (its degree must divide the head count), ring attention passes key/value
shards around (any degree, but it needs a kernel that returns log-sum-exp). With
CFG-parallel the processes split in two halves, one per guidance pass, which swap results
once per step. The runtime is in wanlora.parallel.distributed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidInput


@dataclass(frozen=True)
class ParallelPlan:
    """How the processes of a torch.distributed group share one generation.

    `ulysses * ring` processes split the tokens; `cfg=True` doubles that, one half per
    guidance branch. The product must equal the number of processes.

    Attributes:
        ulysses: the Ulysses degree (all-to-all over heads); it must divide the head count.
        ring: the ring-attention degree (key/value shards passed around); any, on CUDA.
        cfg: whether the two guidance passes run on two halves of the processes.
    """

    ulysses: int = 1
    ring: int = 1
    cfg: bool = False

    @property
    def context_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.context_degree * (2 if self.cfg else 1)

    @property
    def attention_split(self) -> str | None:
        """How attention is split across processes: "ring", "ulysses", or None (not at all)."""
        if self.context_degree == 1:
            return None
        return "ring" if self.ring > 1 else "ulysses"

    @classmethod
    def auto(cls, world_size: int, heads: int, cfg: bool = False) -> ParallelPlan:
        """Ulysses as far as the head count allows (it is the faster of the two), ring for the rest."""
        if cfg and world_size % 2:
            raise InvalidInput("cfg_parallel", True, f"an even number of processes, not {world_size}")
        degree = world_size // 2 if cfg else world_size
        ulysses = max(d for d in range(1, degree + 1) if degree % d == 0 and heads % d == 0)
        return cls(ulysses=ulysses, ring=degree // ulysses, cfg=cfg)

    def check(self, heads: int, world_size: int, model: str, device_type: str) -> None:
        for field, value in (("ulysses", self.ulysses), ("ring", self.ring)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(field, value, "a whole number, 1 or more")
        if self.world_size != world_size:
            raise InvalidInput(
                "parallel",
                self.describe(),
                f"ulysses x ring{' x 2 (cfg)' if self.cfg else ''} = {self.world_size} processes, "
                f"but there are {world_size}",
            )
        if heads % self.ulysses:
            divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
            raise InvalidInput(
                "ulysses",
                self.ulysses,
                f"a divisor of {model}'s {heads} attention heads ({divisors}); put the rest in ring",
            )
        if self.ring > 1 and device_type != "cuda":
            raise InvalidInput(
                "ring", self.ring, f"1 on {device_type}: ring attention needs a CUDA kernel; use ulysses"
            )

    def split_size(self, width: int, height: int, tokens: Callable[[int, int], int], step: int) -> tuple[int, int]:
        """(width, height), or the nearest size whose tokens split evenly across the context-parallel ranks.

        Sides move by whole `step`s (one patch of latent cells), to the size closest in area,
        then in aspect: 624x624 at 81 frames has 31941 tokens, so on two ranks it becomes 640x608.
        """
        degree = self.context_degree
        if tokens(width, height) % degree == 0:
            return width, height
        moves = range(-degree, degree + 1)
        candidates = [(width + dx * step, height + dy * step) for dx in moves for dy in moves]
        fitting = [(w, h) for w, h in candidates if min(w, h) >= step and tokens(w, h) % degree == 0]

        def change(size: tuple[int, int]) -> tuple[int, float]:
            return abs(size[0] * size[1] - width * height), abs(math.log(size[0] * height / (size[1] * width)))

        return min(fitting, key=change)

    def check_fast_mode(self, mode: str) -> None:
        """The step cache would judge each rank's share of the tokens apart, and ranks would disagree."""
        if mode != "off" and self.context_degree > 1:
            raise InvalidInput(
                "fast_mode", mode, "off with context parallelism: the step cache would judge each rank's tokens apart"
            )

    def describe(self) -> str:
        return f"ulysses={self.ulysses} ring={self.ring}" + (" cfg" if self.cfg else "")


LAUNCHED_BY_GPUS = "WANLORA_LAUNCHED_BY_GPUS"  # set in the workers `wanlora generate --gpus` starts


# torchrun describes each process in its environment; these read it, here and nowhere else.


def world_size() -> int:
    """How many processes torchrun (or `--gpus`) started: its WORLD_SIZE; 1 outside it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank among them: torchrun's RANK; 0 outside it."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's GPU on its machine: torchrun's LOCAL_RANK; 0 outside it."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def has_rendezvous() -> bool:
    """Whether torchrun told this process where to meet the others (MASTER_ADDR)."""
    return "MASTER_ADDR" in os.environ


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or `--gpus`) started."""
    return world_size() > 1


def launched_by_gpus() -> bool:
    """Whether `wanlora generate --gpus` started this process (its launcher reports failures)."""
    return LAUNCHED_BY_GPUS in os.environ


def requested_plan(
    gpus: int | None,
    ulysses: int | None,
    ring: int | None,
    cfg_parallel: bool,
    device: str | None,
    heads: int,
    model: str,
) -> ParallelPlan | None:
    """The plan a person asked for (None: one process): the process count (`gpus`, or torchrun's), and the
    Ulysses and ring degrees and CFG-parallel where given, the rest as in `ParallelPlan.auto`. Checked
    against the machine and the model before anything loads."""
    world = world_size()
    if gpus is not None:
        if gpus < 1:
            raise InvalidInput("gpus", gpus, "1 or more")
        if launched_by_torchrun() and gpus != world:
            raise InvalidInput("gpus", gpus, f"{world}, the process count torchrun started (or leave it out)")
        world = gpus
    if world == 1:
        for name, value in (("ulysses", ulysses), ("ring", ring), ("cfg_parallel", cfg_parallel)):
            if value:
                raise InvalidInput(name, value, "used with --gpus 2 or more (or under torchrun)")
        return None
    if device:
        raise InvalidInput("device", device, "left out with --gpus: each process takes its own device")
    import torch

    visible = torch.cuda.device_count()
    if visible and world > visible and not launched_by_torchrun():
        raise InvalidInput("gpus", world, f"at most the {visible} GPUs visible here")
    plan = ParallelPlan.auto(world, heads, cfg_parallel)
    degree = plan.context_degree
    for name, value in (("ulysses", ulysses), ("ring", ring)):
        if value is not None and (value < 1 or degree % value):
            raise InvalidInput(name, value, f"a divisor of {degree}, the processes that split each pass")
    if ulysses or ring:
        chosen_ulysses = ulysses or degree // (ring or 1)
        plan = ParallelPlan(chosen_ulysses, ring or degree // chosen_ulysses, cfg_parallel)
    plan.check(heads, world, model, "cuda" if visible else "cpu")
    return plan
