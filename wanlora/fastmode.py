"""Fast mode: skip transformer work on denoising steps that change little.

Built on diffusers' First Block Cache: each step runs the first transformer block, and when
its output moved less than a threshold (relative L1) since the last full step, the other
blocks are skipped and their cached residual is reused. cond and uncond passes keep
separate caches (the pipeline's cache contexts), so classifier-free guidance stays correct.
Thresholds live in the model catalogue; "off" removes the hooks, so it is bit-identical to
never having enabled the cache.

Why not the other diffusers caches: FasterCache assumes cond and uncond in one batch, and
Wan's pipeline runs them as separate passes; TaylorSeer's default module pattern matches
nothing in Wan's transformer, so it silently caches nothing.
"""

from __future__ import annotations

import logging

from diffusers.hooks import FirstBlockCacheConfig

from .errors import InvalidInput
from .models import ModelSpec

logger = logging.getLogger(__name__)

FAST_MODES = ("off", "balanced", "fast")


def check_fast_mode(mode: str) -> None:
    if mode not in FAST_MODES:
        raise InvalidInput("fast_mode", mode, f"one of {', '.join(FAST_MODES)}")


def apply_fast_mode(transformer, spec: ModelSpec, mode: str) -> None:
    """Install (or remove) the step cache on `transformer` for `mode`."""
    check_fast_mode(mode)
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    if mode == "off":
        return
    threshold = spec.fast_thresholds[FAST_MODES.index(mode) - 1]
    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    logger.info("fast mode %s: First Block Cache at threshold %g", mode, threshold)
