"""The two places where wanlora changes code it does not own, kept in one module.

Neither has a public hook in diffusers or torch. tests/test_patches.py checks each target's
shape (the name, its signature and the caller that reaches it), so a new diffusers or torch
that moves one fails there, by name, not as wrong frames somewhere else.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from diffusers import WanTransformer3DModel
from diffusers.hooks import HookRegistry
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK


def first_block_cache_computes_first_steps(transformer: WanTransformer3DModel, count: int) -> None:
    """First Block Cache has no start step: its head hook's skip decision learns one here.

    The hook is the instance `enable_cache` just made, so nothing outside this transformer
    changes. Steps are counted in the cache's own state for each branch (cond, uncond), so
    they restart with it; not every Wan pipeline reports the step index in the cache context.
    """
    head = HookRegistry.check_if_exists_or_initialize(transformer.blocks[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
    decide = head._should_compute_remaining_blocks

    @torch.compiler.disable
    def should_compute(residual: torch.Tensor) -> bool:
        state = head.state_manager.get_state()
        state.steps_seen = getattr(state, "steps_seen", 0) + 1
        return decide(residual) or state.steps_seen <= count

    head._should_compute_remaining_blocks = should_compute


@contextmanager
def cpu_counts_as_one_device(device: torch.device):
    """diffusers' `enable_parallelism` places rank r on accelerator r % device_count(); a CPU-only
    process has none, so on the CPU (the tests' gloo groups) the count reads 1 while it runs."""
    if device.type != "cpu":
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original
