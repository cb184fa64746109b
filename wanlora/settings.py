"""Generation settings, validated in full before any work starts.

Pure Python: the CLI and the predictor validate a request against the model's spec before
the (slow) model load, and `WanLoraPipeline.generate` validates again on its own.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass

from .errors import InvalidInput
from .models import ModelSpec

MIN_SIDE, MAX_SIDE = 16, 1920
MIN_FRAMES = 5
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_SHIFT = 20.0
MAX_FPS = 60
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the frames, with every default filled in."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    shift: float
    seed: int

    @property
    def token_count(self) -> int:
        """Transformer tokens: latent frames (4x fewer, plus the first) x the latent 2x2 patches."""
        return ((self.num_frames - 1) // 4 + 1) * (self.height // 16) * (self.width // 16)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}, {self.num_frames} frames"

    def as_dict(self) -> dict:
        """The fields by name; they are also `WanLoraPipeline.generate`'s keyword arguments."""
        return asdict(self)


def _require_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, value, "a whole number")
    return value


def _require_number(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(field, value, "a finite number")
    return float(value)


def _in_range(field: str, value, low, high, unit: str = "") -> None:
    if not low <= value <= high:
        raise InvalidInput(field, value, f"between {low} and {high}{unit}")


def validate_side(field: str, value: object) -> int:
    value = _require_int(field, value)
    if value % 16 or not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidInput(field, value, f"a multiple of 16 between {MIN_SIDE} and {MAX_SIDE} pixels")
    return value


def validate_num_frames(value: object, max_frames: int) -> int:
    value = _require_int("num_frames", value)
    if (value - 1) % 4 or not MIN_FRAMES <= value <= max_frames:
        raise InvalidInput(
            "num_frames", value, f"4k+1 between {MIN_FRAMES} and {max_frames} (5, 9, 13, ... {max_frames})"
        )
    return value


def resolve_settings(
    spec: ModelSpec,
    prompt: object,
    *,
    negative_prompt: str | None = None,
    resolution: str | None = None,
    aspect_ratio: str | None = None,
    width: int | None = None,
    height: int | None = None,
    num_frames: int | None = None,
    fps: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    seed: int | None = None,
) -> GenerationSettings:
    """Check every argument against `spec` and fill in its defaults.

    `width`/`height` override the `resolution`/`aspect_ratio` preset and must come together.
    A `None` seed becomes a fresh random one, reported in the settings.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInput("prompt", prompt, "a non-empty text")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InvalidInput("negative_prompt", negative_prompt, "a text")

    if (width is None) != (height is None):
        raise InvalidInput("width" if width is None else "height", None, "give width and height together")
    if width is None:
        width, height = spec.size(resolution, aspect_ratio or "16:9")
    else:
        width, height = validate_side("width", width), validate_side("height", height)

    num_frames = validate_num_frames(spec.default_frames if num_frames is None else num_frames, spec.max_frames)

    fps = _require_int("fps", spec.default_fps if fps is None else fps)
    _in_range("fps", fps, 1, MAX_FPS)

    steps = _require_int("steps", spec.default_steps if steps is None else steps)
    _in_range("steps", steps, 1, MAX_STEPS)

    guidance = _require_number("guidance_scale", spec.default_guidance if guidance_scale is None else guidance_scale)
    _in_range("guidance_scale", guidance, 0.0, MAX_GUIDANCE)

    shift = _require_number("shift", spec.default_shift(width, height) if shift is None else shift)
    if not 0.0 < shift <= MAX_SHIFT:
        raise InvalidInput("shift", shift, f"greater than 0 and at most {MAX_SHIFT}")

    seed = secrets.randbelow(2**32) if seed is None else _require_int("seed", seed)
    _in_range("seed", seed, 0, MAX_SEED)

    return GenerationSettings(
        prompt=prompt,
        negative_prompt=negative_prompt or "",
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        steps=steps,
        guidance_scale=guidance,
        shift=shift,
        seed=seed,
    )
