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

from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

from ..errors import InvalidInput
from ..models import ModelSpec
from ..settings import FAST_MODES
from .patches import first_block_cache_computes_first_steps

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
    first_block_cache_computes_first_steps(transformer, full_steps)
    logger.info("fast mode %s: First Block Cache at threshold %g after %d full steps", mode, threshold, full_steps)


def restart_step_cache(transformer) -> None:
    """Forget what the step cache learned on `transformer`, whose weights just changed (a strength schedule's
    re-merge mid-run): a residual cached before would be another model's. Its first steps run in full again."""
    if transformer.is_cache_enabled:
        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
