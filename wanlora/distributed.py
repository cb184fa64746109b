"""The parallel runtime: a torch.distributed process group sharing each generation.

Every rank runs the same `generate` with the same arguments: the seed is rank 0's, a LoRA
failure on any rank fails the call on all of them (and puts the old set back), and only
rank 0 decodes the video. The fast-mode step cache runs only without context parallelism:
it would judge each rank's share of the tokens on its own, and the ranks would disagree.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .errors import InvalidInput, WanLoraError
from .parallel import ParallelPlan

logger = logging.getLogger(__name__)

CFG_HOOK = "wanlora_cfg_parallel"


def resolve_plan(parallel: ParallelPlan | str, heads: int, model: str, device: torch.device) -> ParallelPlan:
    """`parallel` ("auto" or a plan) for this process group, checked against the model."""
    world_size = dist.get_world_size()
    if isinstance(parallel, ParallelPlan):
        plan = parallel
    elif parallel == "auto":
        plan = ParallelPlan.auto(world_size, heads)
    else:
        raise InvalidInput("parallel", parallel, "'auto' or a ParallelPlan")
    plan.check(heads, world_size, model, device.type)
    return plan


def init_distributed() -> torch.device:
    """Join the process group torchrun described in the environment; return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise InvalidInput(
                "parallel",
                "(set)",
                "a torch.distributed process group: launch with `torchrun`, or `wanlora generate --gpus N`",
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@contextmanager
def _cpu_counts_as_one_device(device: torch.device):
    """diffusers places rank r on accelerator r % device_count(); a CPU-only process has none."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


class Parallel:
    """A transformer made context- (and optionally CFG-) parallel over the current process group."""

    def __init__(self, transformer: torch.nn.Module, plan: ParallelPlan, device: torch.device) -> None:
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
            with _cpu_counts_as_one_device(device):
                transformer.enable_parallelism(config=config)
        self.cfg_hook = None
        if plan.cfg:
            self.cfg_hook = CfgSplitHook(mesh["cfg"].get_local_rank(), mesh["cfg"].get_group())
            HookRegistry.check_if_exists_or_initialize(transformer).register_hook(self.cfg_hook, CFG_HOOK)
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
        if self.cfg_hook is not None:
            self.cfg_hook.active = guided


class _NoState:
    def reset(self) -> None:
        pass


class CfgSplitHook(ModelHook):
    """Runs only this rank's guidance branch and swaps results with the other half.

    The pipeline calls the transformer for "cond" and then "uncond" (its cache contexts)
    and combines the two afterwards. Each half computes its own branch and returns an empty
    tensor for the other; at the "uncond" call both results are exchanged and the "cond"
    placeholder is filled in place, before the pipeline reads it.
    """

    _is_stateful = True  # so that the pipeline's cache context (the branch name) reaches it

    def __init__(self, branch: int, group) -> None:
        super().__init__()
        self.branch = branch  # 0: cond, 1: uncond
        self.group = group
        self.state_manager = StateManager(_NoState)
        self.active = True
        self.cond_placeholder = None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        name = self.state_manager.context.name
        wanted = name == ("cond", "uncond")[self.branch]
        if wanted:
            output = self.fn_ref.original_forward(*args, **{**kwargs, "return_dict": False})[0]
        else:
            latents = kwargs["hidden_states"]
            shape = (latents.shape[0], module.config.out_channels, *latents.shape[2:])
            output = latents.new_empty(shape)
        if name == "cond":
            self.cond_placeholder = output
        else:
            computed = self.cond_placeholder if self.branch == 0 else output
            results = [torch.empty_like(output) for _ in range(2)]
            dist.all_gather(results, computed.contiguous(), group=self.group)
            self.cond_placeholder.copy_(results[0])
            self.cond_placeholder, output = None, results[1]
        return (output,) if not kwargs.get("return_dict", True) else Transformer2DModelOutput(sample=output)

    def reset_state(self, module):
        self.cond_placeholder = None
        return module
