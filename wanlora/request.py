"""One request, resolved once: every argument checked against the model, every default filled in.

The CLI, the predictor's service and `WanLoraPipeline.generate` all go through
`resolve_request`, before the (slow) model load where they can. Pure Python apart from
reading the conditioning images.
"""

from __future__ import annotations

import difflib
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .accelerators import Accelerator, accelerator_for
from .errors import InvalidInput, NotShown
from .images import ImageHeader, ImageInput, load_image, reference_frame_size
from .lora.selection import LoraRequest, check_targets, parse_requests
from .models import ModelSpec
from .settings import (
    FAST_MODES,
    MAX_FPS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SHIFT,
    MAX_SIDE,
    MAX_STEPS,
    MIN_FRAMES,
    MIN_SHIFT,
    MIN_SIDE,
    RESIZE_MODES,
)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the frames, with every default filled in; diffusers' names."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None  # the low-noise expert's, on Wan2.2 A14B; None with one transformer
    flow_shift: float
    seed: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}, {self.num_frames} frames"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Request:
    """A generation request, valid for `spec`: what `WanLoraPipeline.run` takes."""

    spec: ModelSpec
    settings: GenerationSettings
    images: tuple  # PIL images: the start image, and a last one where the model takes it
    resize: str
    loras: tuple[LoraRequest, ...] | None  # None keeps the pipeline's current set
    fast_mode: str
    accelerator: Accelerator | None
    accelerator_ref: str | None
    cfg_batch: bool
    framed_by_image: bool = False  # the frame keeps the image's aspect (nothing else was asked for)

    @property
    def accelerator_lora(self) -> LoraRequest | None:
        """The preset's own LoRA: chosen by wanlora, not a user, so it may be a local file."""
        if self.accelerator is None or self.accelerator_ref is None:
            return None
        return LoraRequest(self.accelerator_ref, self.accelerator.strength, builtin=True)


RENAMED = {"steps": "num_inference_steps", "shift": "flow_shift"}  # wanlora 0.1's names
NO_NEGATIVE_PROMPT = "none"  # asks for no negative prompt at all; an empty one means the model's own


def refuse_unknown(options: Mapping[Any, object], known: Iterable[str], where: str) -> None:
    """Refuse options that `where` does not take: a 0.1 name says its new name, a typo the nearest one.

    An unknown option's value is never echoed: an option nobody expected may hold anything, a
    token included. (A renamed one's is, scrubbed as every echoed value is: it is a step count or a shift.)
    """
    known = list(dict.fromkeys(known))
    words = {word: full for full in reversed(known) for word in full.split("_")} | {full: full for full in known}
    for name, value in options.items():
        if name in RENAMED:
            raise InvalidInput(name, value, f"renamed in wanlora 0.2: use {RENAMED[name]}")
        near = difflib.get_close_matches(name, words, n=1, cutoff=0.6) if isinstance(name, str) else []
        hint = f"did you mean {words[near[0]]}?" if near else f"it takes {', '.join(known)}"
        raise InvalidInput(str(name), NotShown, f"not an option of {where}; {hint}")


def _require_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, value, "a whole number")
    return value


def _number_in(field: str, value: object, low: float, high: float) -> float:
    """`value` as a float, refused (as it was given) unless a finite number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(field, value, "a finite number")
    _in_range(field, value, low, high)
    return float(value)


def _in_range(field: str, value, low, high) -> None:
    if not low <= value <= high:
        raise InvalidInput(field, value, f"between {low:g} and {high:g}")


def check_text(field: str, value: object, required: bool) -> str:
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidInput(field, value, "a non-empty text" if required else "a text")
    shown = f"{len(value)} characters"
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInput(field, shown, f"at most {MAX_PROMPT_CHARS} characters (the model reads about 2,000)")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: it would fail only at the very end, writing the tags
            raise InvalidInput(
                field, shown, "valid Unicode text: it holds a broken character (a lone surrogate)"
            ) from None
    return value


def validate_side(field: str, value: object, multiple: int = 16) -> int:
    value = _require_int(field, value)
    if value % multiple or not MIN_SIDE <= value <= MAX_SIDE:
        raise InvalidInput(field, value, f"a multiple of {multiple} between {MIN_SIDE} and {MAX_SIDE} pixels")
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
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    flow_shift: float | None = None,
    seed: int | None = None,
) -> GenerationSettings:
    """Check the frame-deciding arguments against `spec` and fill in its defaults.

    `width`/`height` override the `resolution`/`aspect_ratio` preset and must come together.
    On two experts, `guidance_scale` is the high-noise one's and `guidance_scale_2` the
    low-noise one's; given only `guidance_scale`, both use it (diffusers' rule). A `None`
    seed becomes a fresh random one, reported in the settings. An empty negative prompt is
    the model's own (the reference's `sample_neg_prompt`), "none" asks for none at all, and
    the settings hold the one a guided pass will use ("" when guidance is 1 or less).
    """
    prompt = check_text("prompt", prompt, required=True)
    negative_prompt = check_text("negative_prompt", negative_prompt or "", required=False)
    if not negative_prompt.strip():
        negative_prompt = spec.negative_prompt  # as the reference: empty means the model's own
    elif negative_prompt.strip().lower() == NO_NEGATIVE_PROMPT:
        negative_prompt = ""

    if (width is None) != (height is None):
        raise InvalidInput("width" if width is None else "height", None, "give width and height together")
    if width is None:
        width, height = spec.size(resolution, aspect_ratio or "16:9")
    else:
        width = validate_side("width", width, spec.side_multiple)
        height = validate_side("height", height, spec.side_multiple)

    num_frames = validate_num_frames(spec.default_frames if num_frames is None else num_frames, spec.max_frames)

    fps = _require_int("fps", spec.default_fps if fps is None else fps)
    _in_range("fps", fps, 1, MAX_FPS)

    steps = _require_int(
        "num_inference_steps", spec.default_steps if num_inference_steps is None else num_inference_steps
    )
    _in_range("num_inference_steps", steps, 1, MAX_STEPS)

    guidance = spec.default_guidance if guidance_scale is None else guidance_scale
    guidance = _number_in("guidance_scale", guidance, 0.0, MAX_GUIDANCE)
    if spec.boundary_ratio is None and guidance_scale_2 is not None:
        raise InvalidInput("guidance_scale_2", guidance_scale_2, f"left out: {spec.name} has one transformer")
    guidance_2 = None
    if spec.boundary_ratio is not None:
        default_2 = spec.default_guidance_2 if guidance_scale is None else guidance
        guidance_2 = default_2 if guidance_scale_2 is None else guidance_scale_2
        guidance_2 = _number_in("guidance_scale_2", guidance_2, 0.0, MAX_GUIDANCE)
        if guidance <= 1 < guidance_2:  # diffusers runs the unconditional pass only for guidance_scale > 1
            why = "at most 1 when guidance_scale is 1 or less: the unconditional pass runs only when the high-noise"
            raise InvalidInput("guidance_scale_2", guidance_2, why + " expert is guided")

    shift = spec.default_shift(width, height) if flow_shift is None else flow_shift
    shift = _number_in("flow_shift", shift, MIN_SHIFT, MAX_SHIFT)

    seed = secrets.randbelow(2**32) if seed is None else _require_int("seed", seed)
    _in_range("seed", seed, 0, MAX_SEED)
    if guidance <= 1:  # no unguided pass runs (diffusers' rule), so no negative prompt is used
        negative_prompt = ""

    return GenerationSettings(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_scale_2=guidance_2,
        flow_shift=shift,
        seed=seed,
    )


def resolve_images(
    spec: ModelSpec, image: ImageInput | ImageHeader | None, last_image: ImageInput | ImageHeader | None
) -> tuple:
    """The conditioning images, read and checked: the right number for the model's task (an `ImageHeader`,
    checked already, is kept as it is: a batch reads it when its job runs, and resolves the request again)."""
    if spec.task == "t2v":
        if image is not None or last_image is not None:
            raise InvalidInput("image", "(an image)", f"{spec.name} is text-to-video; use an image-to-video model")
        return ()
    if image is None:
        if spec.task == "ti2v" and last_image is None:
            return ()  # TI2V-5B: text-to-video without an image
        raise InvalidInput("image", None, f"{spec.name} is image-to-video and needs a start image")
    if last_image is not None and not spec.arch.takes_last_image:
        raise InvalidInput(
            "last_image",
            "(an image)",
            f"{spec.name} takes one image; a last frame needs a first-last-frame model "
            "such as Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers",
        )
    images = [_image(image, "image")]
    if last_image is not None:
        images.append(_image(last_image, "last_image"))
    return tuple(images)


def _image(image: ImageInput | ImageHeader, field: str):
    """The image read, or an `ImageHeader` kept as it is: checked already, to be read when its job runs."""
    return image if isinstance(image, ImageHeader) else load_image(image, field)


def frame_for_image(spec: ModelSpec, image, resolution: str | None) -> tuple[int, int]:
    """The frame the reference code gives `image` on `spec`: its aspect at the resolution's pixel area.

    A link not fetched yet (an `ImageHeader` without a size) has the resolution's 16:9 frame until
    it is: the request is resolved again once the image is read.
    """
    if image.size is None:
        return spec.size(resolution, "16:9")
    area = spec.max_area(resolution)
    width, height = reference_frame_size(image.size, area, spec.vae_scale, per_side=spec.task == "i2v")
    if not (MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE):
        shown = f"{image.size[0]}x{image.size[1]}"
        at = resolution or spec.default_resolution
        why = f"at {at} its aspect gives a {width}x{height} frame, outside {MIN_SIDE} to {MAX_SIDE} pixels a side"
        raise InvalidInput("image", shown, f"an image of a less extreme aspect ({why}), or an aspect ratio or size")
    return width, height


def resolve_request(
    spec: ModelSpec,
    prompt: object,
    *,
    image: ImageInput | ImageHeader | None = None,
    last_image: ImageInput | ImageHeader | None = None,
    resize: str = "fit",
    loras=None,
    fast_mode: str = "off",
    accelerator: str | None = None,
    cfg_batch: bool = False,
    aspect_ratio: str | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    flow_shift: float | None = None,
    **settings: Any,
) -> Request:
    """Resolve a whole request for `spec`; the keyword arguments are `WanLoraPipeline.generate`'s.

    With an image and no size or aspect ratio asked for, the frame keeps the image's aspect at
    the resolution's pixel area, by the reference's rule for the model. An accelerator preset
    fills in the steps, guidance and shift it was trained for, unless the caller set them
    (and a fixed-timestep preset takes exactly its step count).
    """
    images = resolve_images(spec, image, last_image)
    if resize not in RESIZE_MODES:
        raise InvalidInput("resize", resize, f"one of {', '.join(RESIZE_MODES)}")
    if fast_mode not in FAST_MODES:
        raise InvalidInput("fast_mode", fast_mode, f"one of {', '.join(FAST_MODES)}")
    if not isinstance(cfg_batch, bool):
        raise InvalidInput("cfg_batch", cfg_batch, "True or False")
    preset = accelerator_ref = None
    if accelerator is not None:
        preset, accelerator_ref = accelerator_for(accelerator, spec)
        num_inference_steps = preset.steps if num_inference_steps is None else num_inference_steps
        guidance_scale = preset.guidance if guidance_scale is None else guidance_scale
        if spec.boundary_ratio is not None:
            guidance_scale_2 = preset.guidance if guidance_scale_2 is None else guidance_scale_2
        flow_shift = preset.shift if flow_shift is None else flow_shift
        if preset.timesteps and num_inference_steps != len(preset.timesteps):
            raise InvalidInput(
                "num_inference_steps",
                num_inference_steps,
                f"{len(preset.timesteps)} with {accelerator}: it samples fixed timesteps",
            )
    framed_by_image = bool(images) and aspect_ratio is None and width is None and settings.get("height") is None
    if framed_by_image:
        width, settings["height"] = frame_for_image(spec, images[0], settings.get("resolution"))
    resolved = resolve_settings(
        spec,
        prompt,
        aspect_ratio=aspect_ratio,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        guidance_scale_2=guidance_scale_2,
        flow_shift=flow_shift,
        **settings,
    )
    requests = None if loras is None else tuple(parse_requests(loras))
    if spec.identified:  # a Hub repo's experts are known once its config has been read
        check_targets(list(requests or ()), spec.experts, spec.name)
    return Request(
        spec=spec,
        settings=resolved,
        images=images,
        resize=resize,
        loras=requests,
        fast_mode=fast_mode,
        accelerator=preset,
        accelerator_ref=accelerator_ref,
        cfg_batch=cfg_batch,
        framed_by_image=framed_by_image,
    )
