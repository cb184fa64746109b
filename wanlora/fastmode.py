"""Fast mode: skip transformer work on denoising steps that change little.

Built on diffusers' First Block Cache: each step runs the first transformer block, and when
its output moved less than a threshold (relative L1) since the last full step, the other
blocks are skipped and their cached residual is reused. cond and uncond passes keep
separate caches (the pipeline's cache contexts), so classifier-free guidance stays correct.
Thresholds live in the model catalogue; "off" removes the hooks, so it is bit-identical to
never having enabled the cache. As with the TeaCache settings people use on Replicate, the
first 10% of the steps always run in full: they lay out the composition.

Why not the other diffusers caches: FasterCache assumes cond and uncond in one batch, and
Wan's pipeline runs them as separate passes; TaylorSeer's default module pattern matches
nothing in Wan's transformer, so it silently caches nothing.
"""

from __future__ import annotations

import logging
import math

import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

from .errors import InvalidInput
from .models import ModelSpec
from .settings import FAST_MODES

logger = logging.getLogger(__name__)

FULL_STEPS_FRACTION = 0.1


def check_fast_mode(mode: str) -> None:
    if mode not in FAST_MODES:
        raise InvalidInput("fast_mode", mode, f"one of {', '.join(FAST_MODES)}")


def apply_fast_mode(transformer, spec: ModelSpec, mode: str, steps: int) -> None:
    """Install (or remove) the step cache on `transformer` for `mode`, for a run of `steps`."""
    check_fast_mode(mode)
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    if mode == "off":
        return
    threshold = spec.fast_thresholds[FAST_MODES.index(mode) - 1]
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    full_steps = math.ceil(FULL_STEPS_FRACTION * steps)
    _compute_first_steps_in_full(transformer, full_steps)
    logger.info("fast mode %s: First Block Cache at threshold %g after %d full steps", mode, threshold, full_steps)


def _compute_first_steps_in_full(transformer, count: int) -> None:
    """First Block Cache has no start step: its skip decision learns one here.

    Steps are counted in the cache's own state for each branch (cond, uncond), so they
    restart with it; not every Wan pipeline reports the step index in the cache context.
    """
    head = HookRegistry.check_if_exists_or_initialize(transformer.blocks[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
    decide = head._should_compute_remaining_blocks

    @torch.compiler.disable
    def should_compute(residual: torch.Tensor) -> bool:
        state = head.state_manager.get_state()
        state.steps_seen = getattr(state, "steps_seen", 0) + 1
        return decide(residual) or state.steps_seen <= count

    head._should_compute_remaining_blocks = should_compute
