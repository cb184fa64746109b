"""The generation options, declared once: each one's default, bounds and help.

`WanLoraPipeline.generate(prompt, **options)`, the CLI's flags and their help, the predictor's
mapping (one table of Replicate's names, in wanlora.frontends.service), a batch line's fields and
a sweep's axes are all read from `GenerationOptions`. A new option is one field here; what it
does to the video is `wanlora.request`'s business, the only module that reads the values. Marked
`predictor=True`, it is also the Cog predictor's input of the same name (plus its `Input()` in
predict.py, which Cog reads statically).

Left unset (None), an option takes the model's own default from its reference configs; the
help says which. Model-independent bounds are here (`Option.low`/`high`, `choices`); what depends
on the model (a side's multiple, the most frames, the resolutions it was trained at) is checked
when the request is resolved for it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from .errors import InvalidInput, NotShown
from .settings import (
    ASPECT_RATIOS,
    FAST_MODES,
    MAX_FPS,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SHIFT,
    MAX_STEPS,
    MIN_FRAMES,
    MIN_SHIFT,
    RESIZE_MODES,
    RESOLUTIONS,
)

IMAGE_OPTIONS = ("image", "last_image")
# The options a sweep can vary, by the name it takes their values under (`sweep(seeds=[1, 2])`, `--seeds`),
# in the order that decides which of two axes runs down the rows (a LoRA's strengths come first).
SWEEP_AXES = {"seeds": "seed", "prompts": "prompt"}  # the conditioning images: files or links, read when a request runs
# The CLI's groups of flags, in the order `--help` shows them.
MODEL = "model and LoRAs"
WHAT = "what to generate"
SAMPLING = "sampling"
SPEED = "device, speed and memory"


@dataclass(frozen=True)
class Option:
    """What a front end needs to know of one option besides its default."""

    help: str
    flag: str | None = None  # the CLI's flag; None: the CLI has its own way in (the prompt, the LoRA flags)
    metavar: str | None = None
    group: str = WHAT
    choices: tuple[str, ...] | None = None
    low: float | None = None  # bounds that hold on every model (each model narrows some: the most frames)
    high: float | None = None
    # The Cog predictor offers it as an input of this very name (predict.py writes its `Input()`, with this
    # option's default; tests/test_predict_schema.py holds the two equal): wanlora.frontends.service passes it
    # through as it is. The predictor's other inputs are its own (wanlora.frontends.service.PredictorInputs).
    predictor: bool = False

    def bounds(self) -> tuple[float, float]:
        assert self.low is not None and self.high is not None, "an option with bounds"
        return self.low, self.high


def option(default: Any = MISSING, **described: Any) -> Any:
    """A GenerationOptions field: its default, and the `Option` that describes it."""
    return field(default=default, metadata={"option": Option(**described)})


@dataclass(frozen=True)
class GenerationOptions:
    """One generation request, as a person gives it: diffusers' names, None for the model's own default."""

    prompt: str = option(help="what the video shows", metavar="PROMPT")
    negative_prompt: str | None = option(
        None,
        flag="--negative-prompt",
        metavar="TEXT",
        help="what to avoid; default: the model's own, Wan's reference negative prompt; none: no negative prompt",
    )
    image: Any = option(
        None,
        flag="--image",
        metavar="PATH|URL",
        help="start image for image-to-video models (i2v, ti2v-5b): a file, an https:// link, a PIL image or "
        "a uint8 array; default none",
    )
    last_image: Any = option(
        None, flag="--last-image", metavar="PATH|URL", help="end image, for first-last-frame models; default none"
    )
    resize: str = option(
        "fit",
        flag="--resize",
        choices=RESIZE_MODES,
        help="how the image meets a size you ask for: fit (crop), pad (letterbox) or stretch; default fit",
    )
    resolution: str | None = option(
        None, flag="--resolution", choices=RESOLUTIONS, help="default: the model's first (480p; 720p on ti2v-5b)"
    )
    aspect_ratio: str | None = option(
        None, flag="--aspect-ratio", choices=ASPECT_RATIOS, help="default 16:9, or the image's own aspect with an image"
    )
    width: int | None = option(
        None,
        flag="--width",
        metavar="W",
        help="frame width, a multiple of 16 (32 on ti2v-5b), with the height; default the preset's",
    )
    height: int | None = option(
        None,
        flag="--height",
        metavar="H",
        help="frame height, a multiple of 16 (32 on ti2v-5b), with the width; default the preset's",
    )
    num_frames: int | None = option(
        None,
        flag="--frames",
        metavar="N",
        help=f"4k+1 frames, {MIN_FRAMES} to 81 (121 on ti2v-5b); default the model's, 81 or 121",
    )
    fps: int | None = option(
        None,
        flag="--fps",
        metavar="N",
        low=1,
        high=MAX_FPS,
        help=f"frames per second, 1 to {MAX_FPS}; default the model's, 16 or 24",
    )
    num_inference_steps: int | None = option(
        None,
        flag="--steps",
        metavar="N",
        group=SAMPLING,
        low=1,
        high=MAX_STEPS,
        help=f"denoising steps, 1 to {MAX_STEPS}; default the model's (50; 40 for i2v and A14B)",
    )
    guidance_scale: float | None = option(
        None,
        flag="--guidance",
        metavar="G",
        group=SAMPLING,
        low=0.0,
        high=MAX_GUIDANCE,
        help=f"classifier-free guidance, 0 to {MAX_GUIDANCE:g}; default the model's (5; A14B's high-noise "
        "expert 4, or 3.5 with an image)",
    )
    guidance_scale_2: float | None = option(
        None,
        flag="--guidance-2",
        metavar="G",
        group=SAMPLING,
        low=0.0,
        high=MAX_GUIDANCE,
        help="the low-noise expert's guidance on Wan2.2 A14B; default the model's (3, or 3.5 with an image), "
        "or the guidance when given",
    )
    flow_shift: float | None = option(
        None,
        flag="--shift",
        metavar="S",
        group=SAMPLING,
        low=MIN_SHIFT,
        high=MAX_SHIFT,
        help="flow shift; default the model's (Wan2.1 T2V 5, I2V 3 at 480p and 5 at 720p, FLF2V 16; Wan2.2 "
        "T2V-A14B 12, others 5)",
    )
    seed: int | None = option(
        None,
        flag="--seed",
        metavar="N",
        group=SAMPLING,
        low=0,
        high=MAX_SEED,
        help="default random; the seed used is in the MP4's tags",
    )
    loras: Sequence | None = option(
        None,
        group=MODEL,
        help="LoRAs and their strengths: a reference, (reference, strength) or (reference, strength, expert); "
        "a strength may be a list (a schedule over the steps) or {'high': s, 'low': s}; default none",
    )
    fast_mode: str = option(
        "off",
        flag="--fast-mode",
        group=SAMPLING,
        choices=FAST_MODES,
        help="skip transformer work on steps that change little (First Block Cache); default off",
    )
    accelerator: str | None = option(
        None,
        flag="--accelerator",
        group=MODEL,
        help="stack a step-distillation LoRA and sample as it was trained (1-8 steps, no guidance; `wanlora models` "
        "lists each variant's); default none",
    )
    cfg_batch: bool = option(
        False,
        flag="--cfg-batch",
        group=SPEED,
        help="run the guided and unguided passes as one batch of two; default off",
    )

    def as_fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in option_names()}


def option_names() -> list[str]:
    """Every option's name, the prompt first."""
    return [f.name for f in fields(GenerationOptions)]


def described() -> dict[str, Option]:
    """Every option's `Option`, by name."""
    return {f.name: f.metadata["option"] for f in fields(GenerationOptions)}


def describe(name: str) -> Option:
    return described()[name]


def default_of(name: str) -> Any:
    (found,) = [f for f in fields(GenerationOptions) if f.name == name]
    return None if found.default is MISSING else found.default


RENAMED = {"steps": "num_inference_steps", "shift": "flow_shift"}  # wanlora 0.1's names


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


def options_from(values: Mapping[str, Any], where: str) -> GenerationOptions:
    """`values` (a prompt among them) as GenerationOptions; a name `where` does not take is refused, with
    the nearest one it does take. Values are checked when the request is resolved for a model."""
    names = option_names()
    refuse_unknown({k: v for k, v in values.items() if k not in names}, names, where)
    return GenerationOptions(**{"prompt": None, **values})


F = TypeVar("F", bound=Callable[..., Any])


def takes_options(function: F | None = None, *, sweep_axes: bool = False) -> Any:
    """Show `function(..., **options)` to `help()`, IDEs and `inspect` with every option as a keyword of its own
    (and its default), and with `sweep_axes` the axes' names too (`seeds`, `prompts`): the options are declared
    here only, and a new one needs no edit where they are taken."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own}
        keyword = inspect.Parameter.KEYWORD_ONLY
        options = [
            inspect.Parameter(f.name, keyword, default=default_of(f.name), annotation=f.type)
            for f in fields(GenerationOptions)
            if f.name not in taken
        ]
        axes = [inspect.Parameter(name, keyword, default=None, annotation="Sequence | None") for name in SWEEP_AXES]
        function.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=own + options + (axes if sweep_axes else [])
        )
        return function

    return decorate if function is None else decorate(function)
