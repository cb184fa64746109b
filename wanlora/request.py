"""One request, resolved once: every argument checked against the model, every default filled in.

The CLI, the predictor's service and `WanLoraPipeline.generate` all go through
`resolve_request`, before the (slow) model load where they can. Pure Python apart from
reading the conditioning images.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

from .accelerators import Accelerator, accelerator_for
from .errors import InternalError, InvalidInput
from .images import ImageHeader, ImageInput, load_image, reference_frame_size
from .lora.selection import LoraRequest, check_targets, parse_requests
from .models import Distilled, ModelSpec, Phases, latent_shape
from .options import GenerationOptions, describe
from .settings import (
    MAX_PROMPT_CHARS,
    MAX_SIDE,
    MIN_FRAMES,
    MIN_SIDE,
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
class PhaseSplit:
    """Where a three-phase recipe's phases fall on a request's steps (`models.Phases`)."""

    guided: int  # phase 1: the first steps, guided, without the accelerator
    high: int  # phases 1 and 2: the high-noise expert's steps
    steps: int
    boundary_ratio: float  # the expert switch, between the last high-noise step's timestep and the next one's

    def describe(self) -> str:
        """Wan2GP's words for it: each phase's steps, counted from 1."""
        spans = ((1, self.guided), (self.guided + 1, self.high), (self.high + 1, self.steps))
        return ", ".join(f"phase {n} = steps {a}-{b}" for n, (a, b) in enumerate(spans, 1))


def split_phases(phases: Phases, steps: int, shift: float, preset: str, shift_given: bool = False) -> PhaseSplit:
    """The phases on Wan2GP's timesteps: each starts at the first step at or below its threshold; none empty.

    Refused otherwise, naming the fewest steps that work at this shift (and the shift, when it is the
    caller's and the steps the preset's)."""
    from .runtime.sampling import NUM_TRAIN_TIMESTEPS, wan2gp_timesteps  # torch: only for a phased preset

    def switches(count: int) -> tuple[list[float], int, int]:
        timesteps = wan2gp_timesteps(count, shift).tolist()
        guided, high = (next((i for i, t in enumerate(timesteps) if t <= limit), count) for limit in phases.thresholds)
        return timesteps, guided, high

    def every_phase_has_a_step(count: int) -> bool:
        _, guided, high = switches(count)
        return 0 < guided < high < count

    timesteps, guided, high = switches(steps)
    if not 0 < guided < high < steps:
        thresholds = " and ".join(f"{limit:g}" for limit in phases.thresholds)
        most = int(describe("num_inference_steps").bounds()[1])
        fewest = next((n for n in range(steps + 1, most + 1) if every_phase_has_a_step(n)), None)
        why = f"its phase switches (t <= {thresholds}) leave a phase with no step at shift {shift:g} and {steps} steps"
        why += f"; {fewest} steps or more work" if fewest else "; no step count does"
        if shift_given:
            raise InvalidInput("flow_shift", shift, f"another with {preset}: {why}")
        raise InvalidInput("num_inference_steps", steps, f"more with {preset}: {why}")
    ratio = (timesteps[high - 1] + timesteps[high]) / 2 / NUM_TRAIN_TIMESTEPS
    return PhaseSplit(guided, high, steps, ratio)


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
    distilled: Distilled | None  # the accelerator's LoRA(s) for this model
    cfg_batch: bool
    framed_by_image: bool = False  # the frame keeps the image's aspect (nothing else was asked for)
    phases: PhaseSplit | None = None  # a three-phase recipe's steps

    @property
    def accelerator_loras(self) -> tuple[LoraRequest, ...]:
        """The preset's own LoRA(s), at their strength on each expert: chosen by wanlora, not a user, so they
        may be local files."""
        d = self.distilled
        if d is None:
            return ()
        high, low = d.strengths
        if self.phases is not None:  # the high-noise accelerator off for the guided first phase
            split = self.phases
            schedule = (0.0,) * split.guided + (high,) * (split.high - split.guided)
            high_file, low_file = d.high or d.lora, d.low or d.lora
            if high_file is None or low_file is None:
                raise InternalError(f"a phased catalogue row ({self.spec.name}) lacks a file for an expert")
            return (
                LoraRequest(high_file, schedule, "high", builtin=True, explicit=True),
                LoraRequest(low_file, low, "low", builtin=True, explicit=True),
            )
        if d.lora is not None and (self.spec.boundary_ratio is None or high == low):
            return (LoraRequest(d.lora, high, builtin=True, explicit=True),)
        files = (d.lora, d.lora) if d.lora is not None else (d.high, d.low)
        return tuple(
            LoraRequest(ref, strength, expert, builtin=True, explicit=True)
            for ref, strength, expert in zip(files, (high, low), ("high", "low"), strict=True)
            if ref is not None
        )


NO_NEGATIVE_PROMPT = "none"  # asks for no negative prompt at all; an empty one means the model's own


def _require_int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, value, "a whole number")
    return value


def _whole_in(field: str, value: object) -> int:
    """`value`, refused (as it was given) unless a whole number within the option's bounds."""
    value = _require_int(field, value)
    _in_range(field, value, *describe(field).bounds())
    return value


def _number_in(field: str, value: object) -> float:
    """`value` as a float, refused (as it was given) unless a finite number within the option's bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(field, value, "a finite number")
    _in_range(field, value, *describe(field).bounds())
    return float(value)


def _in_range(field: str, value, low, high) -> None:
    if not low <= value <= high:
        raise InvalidInput(field, value, f"between {_bound(low)} and {_bound(high)}")


def _bound(value: float) -> str:
    """A bound as a person types it: a whole one exactly (the most seed is 19 digits long), else shortest."""
    return str(value) if isinstance(value, int) else f"{value:g}"


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


def check_position_table(spec: ModelSpec, width: int, height: int, num_frames: int) -> None:
    """Refuse a frame or clip longer than the transformer's rotary position table, a patch a position along each
    axis (`rope_max_seq_len`: 1024 on every published Wan model; a tiny stand-in's is 32): diffusers would fail
    inside the forward with a reshape error."""
    most = spec.arch.rope_max_seq_len
    frames, rows, columns = latent_shape(num_frames, height, width, spec.vae_scale)
    side = 2 * spec.vae_scale  # pixels a patch covers
    covers = f"for {spec.name}: its positions cover {most} patches"
    for field, value, patches in (("width", width, columns // 2), ("height", height, rows // 2)):
        if patches > most:
            raise InvalidInput(field, value, f"at most {most * side} {covers}")
    if frames > most:
        raise InvalidInput("num_frames", num_frames, f"at most {4 * most - 3} {covers} of frames")


def resolve_settings(spec: ModelSpec, options: GenerationOptions) -> GenerationSettings:
    """Check the frame-deciding options against `spec` and fill in its defaults.

    `width`/`height` override the `resolution`/`aspect_ratio` preset and must come together.
    On two experts, `guidance_scale` is the high-noise one's and `guidance_scale_2` the
    low-noise one's; given only `guidance_scale`, both use it (diffusers' rule). A `None`
    seed becomes a fresh random one, reported in the settings. An empty negative prompt is
    the model's own (the reference's `sample_neg_prompt`), "none" asks for none at all, and
    the settings hold the one a guided pass will use ("" when guidance is 1 or less).
    """
    o = options
    prompt = check_text("prompt", o.prompt, required=True)
    negative_prompt = check_text("negative_prompt", o.negative_prompt or "", required=False)
    if not negative_prompt.strip():
        negative_prompt = spec.negative_prompt  # as the reference: empty means the model's own
    elif negative_prompt.strip().lower() == NO_NEGATIVE_PROMPT:
        negative_prompt = ""

    width, height = o.width, o.height
    if (width is None) != (height is None):
        raise InvalidInput("width" if width is None else "height", None, "give width and height together")
    if width is None:
        width, height = spec.size(o.resolution, o.aspect_ratio or "16:9")
    else:
        width = validate_side("width", width, spec.side_multiple)
        height = validate_side("height", height, spec.side_multiple)

    num_frames = validate_num_frames(spec.default_frames if o.num_frames is None else o.num_frames, spec.max_frames)
    check_position_table(spec, width, height, num_frames)
    fps = _whole_in("fps", spec.default_fps if o.fps is None else o.fps)
    steps = o.num_inference_steps
    steps = _whole_in("num_inference_steps", spec.default_steps if steps is None else steps)

    guidance = _number_in("guidance_scale", spec.default_guidance if o.guidance_scale is None else o.guidance_scale)
    if spec.boundary_ratio is None and o.guidance_scale_2 is not None:
        raise InvalidInput("guidance_scale_2", o.guidance_scale_2, f"left out: {spec.name} has one transformer")
    guidance_2 = None
    if spec.boundary_ratio is not None:
        default_2 = spec.default_guidance_2 if o.guidance_scale is None else guidance
        guidance_2 = _number_in("guidance_scale_2", default_2 if o.guidance_scale_2 is None else o.guidance_scale_2)
        if guidance <= 1 < guidance_2:  # diffusers runs the unconditional pass only for guidance_scale > 1
            why = "at most 1 when guidance_scale is 1 or less: the unconditional pass runs only when the high-noise"
            raise InvalidInput("guidance_scale_2", guidance_2, why + " expert is guided")

    shift = _number_in("flow_shift", spec.default_shift(width, height) if o.flow_shift is None else o.flow_shift)
    seed = secrets.randbelow(2**32) if o.seed is None else _whole_in("seed", o.seed)
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
    task = spec.task
    if not task.takes_images:
        if image is not None or last_image is not None:
            given = "image" if image is not None else "last_image"  # the one given: a front end names its flag
            raise InvalidInput(given, "(an image)", f"{spec.name} is {task.title}; use an image-to-video model")
        return ()
    if image is None:
        if task.runs_without_image and last_image is None:
            return ()  # TI2V-5B: text-to-video without an image
        raise InvalidInput("image", None, f"{spec.name} is image-to-video and needs a start image")
    if last_image is not None and spec.max_images < 2:
        raise InvalidInput(
            "last_image",
            "(an image)",
            f"{spec.name} takes one image; a last frame needs a first-last-frame model "
            "such as Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers",
        )
    if last_image is None and task.min_images > 1:
        raise InvalidInput("last_image", None, f"{spec.name} is {task.title} and needs a last frame too")
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
    width, height = reference_frame_size(image.size, area, spec.vae_scale, per_side=spec.task.framing == "per_side")
    if not (MIN_SIDE <= min(width, height) and max(width, height) <= MAX_SIDE):
        shown = f"{image.size[0]}x{image.size[1]}"
        at = resolution or spec.default_resolution
        why = f"at {at} its aspect gives a {width}x{height} frame, outside {MIN_SIDE} to {MAX_SIDE} pixels a side"
        raise InvalidInput("image", shown, f"an image of a less extreme aspect ({why}), or an aspect ratio or size")
    return width, height


def resolve_request(spec: ModelSpec, options: GenerationOptions) -> Request:
    """Resolve a whole request for `spec`: every option checked against the model, every default filled in.

    With an image and no size or aspect ratio asked for, the frame keeps the image's aspect at
    the resolution's pixel area, by the reference's rule for the model. An accelerator preset
    fills in the steps, guidance and shift it was trained for, unless the caller set them
    (and a fixed-timestep preset takes exactly its step count).
    """
    o = options
    images = resolve_images(spec, o.image, o.last_image)
    for name in ("resize", "fast_mode"):
        if getattr(o, name) not in (choices := describe(name).choices or ()):
            raise InvalidInput(name, getattr(o, name), f"one of {', '.join(choices)}")
    if not isinstance(o.cfg_batch, bool):
        raise InvalidInput("cfg_batch", o.cfg_batch, "True or False")
    preset = distilled = None
    if o.accelerator is not None:
        preset, distilled = accelerator_for(o.accelerator, spec)
        steps = preset.steps if o.num_inference_steps is None else o.num_inference_steps
        two = spec.boundary_ratio is not None
        shift = preset.shift if distilled.shift is None else distilled.shift
        if distilled.timesteps:  # fixed timesteps: nothing to shift
            shift = None
        if shift is None and o.flow_shift is not None:
            raise InvalidInput("flow_shift", o.flow_shift, f"left out with {preset.name}: its sampler does not shift")
        guidance_2 = 1.0 if distilled.phases is not None else preset.guidance  # phases 2 and 3 run unguided
        if distilled.phases is not None and o.guidance_scale_2 is not None:
            if _number_in("guidance_scale_2", o.guidance_scale_2) != 1:
                why = f"left out with {preset.name}: the low-noise expert's phase runs unguided, as its LoRA was"
                raise InvalidInput("guidance_scale_2", o.guidance_scale_2, why + " distilled")
        o = replace(
            o,
            num_inference_steps=steps,
            guidance_scale=preset.guidance if o.guidance_scale is None else o.guidance_scale,
            guidance_scale_2=guidance_2 if two and o.guidance_scale_2 is None else o.guidance_scale_2,
            flow_shift=(1.0 if shift is None else shift) if o.flow_shift is None else o.flow_shift,
        )
        preset.check_steps(steps)
        distilled.check_steps(preset.name, steps)
    framed_by_image = bool(images) and o.aspect_ratio is None and o.width is None and o.height is None
    if framed_by_image:
        width, height = frame_for_image(spec, images[0], o.resolution)
        o = replace(o, width=width, height=height)
    settings = resolve_settings(spec, o)
    phases = None
    if preset is not None and distilled is not None and distilled.phases is not None:
        shift_given = options.flow_shift is not None and options.num_inference_steps is None
        phases = split_phases(
            distilled.phases, settings.num_inference_steps, settings.flow_shift, preset.name, shift_given
        )
    requests = None if o.loras is None else tuple(parse_requests(o.loras))
    if spec.identified:  # a Hub repo's experts are known once its config has been read
        check_targets(list(requests or ()), spec.experts, spec.name)
    return Request(
        spec=spec,
        settings=settings,
        images=images,
        resize=o.resize,
        loras=requests,
        fast_mode=o.fast_mode,
        accelerator=preset,
        distilled=distilled,
        cfg_batch=o.cfg_batch,
        framed_by_image=framed_by_image,
        phases=phases,
    )
