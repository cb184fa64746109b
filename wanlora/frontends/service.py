"""A long-lived generation service with Replicate's input conventions, for the Cog predictor.

Replicate's names (`sample_steps`, `lora_weights`, `output_quality`, ...) live here and
nowhere else; the library speaks diffusers' names. The service keeps one Wan transformer
resident at a time and shares the text encoder and VAE between variants, so switching
from 14B to 1.3B frees the 14B weights instead of stacking them (the memory plan is in
wanlora.runtime.memory). LoRA state follows each request: the same LoRAs as last time cost
nothing, others are an exact swap.

The server is shared by everyone who runs the model, so every reference must be remote
(no file on the server is reachable through an input), and access to a LoRA that needed a
token is re-checked with the origin on every request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..accelerators import ACCELERATORS as ACCELERATOR_PRESETS
from ..errors import InvalidInput, LoraMismatch, error_boundary
from ..lora.fetch import Credentials
from ..lora.refs import display_ref
from ..lora.selection import LoraRequest, fal_loras
from ..models import CATALOGUE, ONE_TRANSFORMER, ModelSpec, resolve_model
from ..options import GenerationOptions, described, option_names, refuse_unknown
from ..pairs import EVERY_EXPERT
from ..request import Request
from ..resident import Prepared, ResidentModel, prepare
from ..settings import ASPECT_RATIOS, LORA_SCALE_RANGE, model_override, quantize_mode, transformer_overrides
from ..sweep import Axis, sweep_axes
from ..video import quality_to_crf
from ..weights import formats

if TYPE_CHECKING:
    from ..pipeline import WanLoraPipeline

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Replicate's choices, and what they mean to the library, read off the catalogue's `predictor`
# column; predict.py repeats them as literals, and a test holds the two equal.
# (predictor choice, variant): a choice names its text-to-video variant and its image-to-video ones
PREDICTED = [(spec.predictor, spec) for spec in CATALOGUE.values() if spec.predictor]
MODEL_CHOICES = {choice: spec.name for choice, spec in PREDICTED if spec.task.runs_without_image}  # without an image
DEFAULT_RESOLUTION = "480p"  # predict.py's default for `resolution`


def _image_choices() -> dict[str, dict[str, str]]:
    """With an image, the model each choice runs, by resolution: first the model made for that one alone."""
    with_image = [(choice, spec) for choice, spec in PREDICTED if spec.task.takes_images]
    choices: dict[str, dict[str, str]] = {choice: {} for choice, _ in with_image}  # catalogue order
    for choice, spec in sorted(with_image, key=lambda item: len(item[1].resolutions)):
        for resolution in spec.resolutions:
            choices[choice].setdefault(resolution, spec.name)
    return choices


def _width_choices() -> dict[int, tuple[str, ...]]:
    """A LoRA's width -> the choices it fits."""
    widths: dict[int, tuple[str, ...]] = {}
    for choice, spec in PREDICTED:
        widths[spec.arch.dim] = tuple(dict.fromkeys((*widths.get(spec.arch.dim, ()), choice)))
    return widths


IMAGE_CHOICES = _image_choices()
WIDTH_CHOICES = _width_choices()
# trained without the input's default resolution (TI2V-5B: 720p only): for them, `resolution` does not apply
ONE_SIZE_CHOICES = {c for c, name in MODEL_CHOICES.items() if DEFAULT_RESOLUTION not in CATALOGUE[name].resolutions}
SWEEP_CELLS = 6  # the most strengths lora_scale_sweep takes: one grid video per prediction
DEFAULT_SAMPLE_STEPS = 30  # Replicate's Wan models default to 30 steps; the library to Wan's 50

# The predictor's inputs that are generation options under another name (Replicate's), by the option each one
# is. An input named as an option is that option: a field of PredictorInputs below, or one marked
# `predictor=True` in wanlora.options, which PredictorInputs carries without a field (`option_inputs()` is
# the whole mapping). The other inputs are the model, the LoRA slots, the sweep, the tokens and the quality.
OPTION_INPUTS = {
    "sample_steps": "num_inference_steps",
    "sample_guide_scale": "guidance_scale",
    "sample_guide_scale_2": "guidance_scale_2",
    "sample_shift": "flow_shift",
}
# Inputs whose choices are Replicate's words: each choice -> the option's value.
FAST_MODES = {"Off": "off", "Balanced": "balanced", "Fast": "fast"}
ASPECT_CHOICES = ("auto", *ASPECT_RATIOS)  # auto: the image's own aspect with an image, else 16:9
ACCELERATORS = {"none": None, **{name: name for name in ACCELERATOR_PRESETS}}
CHOICE_VALUES: dict[str, dict[str, str | None]] = {
    "fast_mode": dict(FAST_MODES),
    "aspect_ratio": {"auto": None, **{ratio: ratio for ratio in ASPECT_RATIOS}},
    "accelerator": ACCELERATORS,
}
# the library's names -> the predictor's inputs, for its error messages
INPUT_NAMES = {option: name for name, option in OPTION_INPUTS.items() if option != name} | {
    "hf_token": "hf_api_token",
    "civitai_token": "civitai_api_token",
}


@dataclass
class Result:
    path: Path
    seed: int
    frames: int
    steps: int
    timings: dict[str, float]


def _choice(field: str, value: object, choices: dict[str, T]) -> T:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInput(field, value, f"one of {', '.join(choices)}")
    return choices[value]


def _text_or_none(field: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, type(value).__name__, "a text (a link or reference), or empty")
    return value.strip() or None


def _scale(field: str, value: object) -> float:
    low, high = LORA_SCALE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidInput(field, value, f"a number between {low:g} and {high:g}")
    return float(value)


@dataclass(frozen=True)
class PredictorInputs:
    """The predictor's inputs, as Cog hands them to `Predictor.run` (predict.py's signature, field for field;
    a test holds the two equal). predict.py builds one; everything after it reads this one object.

    The types are those Cog checks before `run`; Python callers may pass anything, so values are still
    checked where they are read."""

    prompt: str
    negative_prompt: str = ""
    image: str | None = None  # a file Cog downloaded for this request
    model: str = "14b"
    resolution: str = DEFAULT_RESOLUTION
    aspect_ratio: str = "auto"
    num_frames: int | None = None
    fps: int | None = None
    sample_steps: int | None = None
    sample_guide_scale: float | None = None
    sample_guide_scale_2: float | None = None
    sample_shift: float | None = None
    seed: int | None = None
    fast_mode: str = "Off"
    accelerator: str = "none"
    lora_weights: str | None = None
    lora_scale: float = 1.0
    lora_scale_sweep: str | None = None
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0
    replicate_weights: str | None = None
    lora_weights_transformer: str | None = None
    lora_scale_transformer: float = 1.0
    lora_weights_transformer_2: str | None = None
    lora_scale_transformer_2: float = 1.0
    loras: str | None = None  # fal's list, as JSON text
    hf_api_token: str | None = None
    civitai_api_token: str | None = None
    output_quality: int = 80
    # the inputs named as an option marked `predictor=True` (wanlora.options): as given, or left out for its default
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise InvalidInput("options", type(self.options).__name__, "the inputs named as options, by name")
        carried = carried_options()
        refuse_unknown({k: v for k, v in self.options.items() if k not in carried}, carried, "the predictor's options")

    @classmethod
    def of(cls, **arguments: Any) -> PredictorInputs:
        """The inputs as predict.py (or a batch line) names them, each option marked for the predictor among them;
        a name that is neither is refused, with the nearest input."""
        declared, carried = declared_inputs(), carried_options()
        known = [*declared, *carried]
        refuse_unknown({k: v for k, v in arguments.items() if k not in known}, known, "the predictor")
        own = {name: value for name, value in arguments.items() if name in declared}
        return cls(**own, options={name: value for name, value in arguments.items() if name in carried})

    def __repr__(self) -> str:  # never print a token by accident
        shown = {name: "***" if name.endswith("api_token") and value else value for name, value in vars(self).items()}
        return f"PredictorInputs({shown})"


def declared_inputs() -> list[str]:
    """The inputs PredictorInputs has a field of its own for, in predict.py's order."""
    return [f.name for f in fields(PredictorInputs) if f.name != "options"]


def carried_options() -> list[str]:
    """The options the predictor offers under their own names without a field here: those marked `predictor=True`."""
    taken = {*declared_inputs(), *OPTION_INPUTS.values()}
    return [name for name, described_as in described().items() if described_as.predictor and name not in taken]


def option_inputs() -> dict[str, str]:
    """Every predictor input that is a generation option -> the option: those named as one, and the renamed.
    (`loras`, fal's list, is one of the LoRA inputs: replicate_loras reads it with the slots.)"""
    named = [name for name in declared_inputs() if name in option_names() and name != "loras"]
    return {name: name for name in [*named, *carried_options()]} | OPTION_INPUTS


def sweep_strengths(i: PredictorInputs) -> tuple[float, ...] | None:
    """lora_scale_sweep's strengths ("0,0.5,1"), for the main LoRA slot; None when it is empty."""
    text = _text_or_none("lora_scale_sweep", i.lora_scale_sweep)
    if text is None:
        return None
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidInput("lora_scale_sweep", text, "comma-separated strengths, e.g. 0,0.5,1") from None
    if not 1 <= len(values) <= SWEEP_CELLS:
        raise InvalidInput("lora_scale_sweep", text, f"1 to {SWEEP_CELLS} strengths")
    if not (_text_or_none("lora_weights", i.lora_weights) or _text_or_none("replicate_weights", i.replicate_weights)):
        raise InvalidInput(
            "lora_scale_sweep", text, "empty unless lora_weights (or replicate_weights) is set: it sweeps its strength"
        )
    return tuple(_scale("lora_scale_sweep", value) for value in values)


def replicate_loras(i: PredictorInputs, experts: tuple[str, ...] = ONE_TRANSFORMER) -> list[LoraRequest]:
    """Replicate's LoRA inputs as a LoRA list; all of them stack.

    `lora_weights` and `extra_lora` go on every transformer (each file of a Wan2.2 pair on
    its own expert). `lora_weights_transformer` goes on diffusers' `transformer` (Wan2.2
    A14B's high-noise expert; the only transformer of the others), and
    `lora_weights_transformer_2` on `transformer_2` (the low-noise expert, A14B only).
    `replicate_weights` is what Replicate passes when a fine-tuned version of this model
    runs (its trainer's weights tar): it takes the main slot, at `lora_scale`. `loras` is fal's
    list (`{path, scale, transformer}` items, JSON text); it stacks with the slots, but may not
    repeat one of their LoRAs.
    """
    main, extra = _text_or_none("lora_weights", i.lora_weights), _text_or_none("extra_lora", i.extra_lora)
    trained = _text_or_none("replicate_weights", i.replicate_weights)
    high = _text_or_none("lora_weights_transformer", i.lora_weights_transformer)
    low = _text_or_none("lora_weights_transformer_2", i.lora_weights_transformer_2)
    scale, extra_scale = _scale("lora_scale", i.lora_scale), _scale("extra_lora_scale", i.extra_lora_scale)
    high_scale = _scale("lora_scale_transformer", i.lora_scale_transformer)
    low_scale = _scale("lora_scale_transformer_2", i.lora_scale_transformer_2)
    if trained and main:
        raise InvalidInput(
            "lora_weights",
            display_ref(main),
            "empty when running a fine-tuned version (replicate_weights is its LoRA); use extra_lora to add one",
        )
    two_experts = len(experts) == 2
    if low and not two_experts:
        raise InvalidInput(
            "lora_weights_transformer_2",
            display_ref(low),
            "empty: only model=2.2-a14b has a second transformer; use lora_weights",
        )
    slots = [
        (trained or main, scale, EVERY_EXPERT),
        (extra, extra_scale, EVERY_EXPERT),
        (high, high_scale, "high" if two_experts else EVERY_EXPERT),
        (low, low_scale, "low"),
    ]
    named = [LoraRequest(ref, strength, expert) for ref, strength, expert in slots if ref]
    listed = fal_list(i)
    for lora in listed:
        if lora.ref in {slot.ref for slot in named}:
            why = "a LoRA not given in a lora_weights slot as well: give it once, in the list or in its slot"
            raise InvalidInput("loras", lora.label, why)
    return named + listed


def fal_list(i: PredictorInputs) -> list[LoraRequest]:
    """The `loras` input: fal's list, its scales within the slots' bounds."""
    value = i.loras if isinstance(i.loras, list) else _text_or_none("loras", i.loras)  # a batch line's: a list
    listed = [] if value is None else fal_loras(value)
    for lora in listed:
        _scale("loras scale", lora.strength)  # the slots' bounds
    return listed


@dataclass(frozen=True)
class ServiceRequest:
    """A Replicate request resolved for the library: what to run, how to encode it, and whose tokens."""

    prepared: Prepared
    quality: int
    credentials: Credentials

    @property
    def model(self) -> str:
        return self.prepared.model

    @property
    def request(self) -> Request:
        return self.prepared.request

    @property
    def sweep(self) -> tuple[Axis, ...] | None:
        """The main LoRA's strengths (lora_scale_sweep): one grid video of them."""
        return self.prepared.sweep


def predictor_options(i: PredictorInputs, choice: str, experts: tuple[str, ...]) -> GenerationOptions:
    """The inputs that are generation options, as the library names and reads them."""
    mapping, carried = option_inputs(), carried_options()
    values = {option: getattr(i, name) for name, option in mapping.items() if name not in carried}
    values |= i.options  # as given: each one's default is the option's own (a test holds predict.py to it)
    for name, choices in CHOICE_VALUES.items():
        values[mapping[name]] = _choice(name, getattr(i, name), choices)
    if choice in ONE_SIZE_CHOICES:
        values["resolution"] = None  # trained at one size: the input's default does not apply
    if values["num_inference_steps"] is None and values["accelerator"] is None:
        values["num_inference_steps"] = DEFAULT_SAMPLE_STEPS
    return GenerationOptions(**values, loras=replicate_loras(i, experts))


class VideoService:
    """Loads models lazily, one transformer at a time, and runs validated requests."""

    def __init__(
        self,
        override: str | None = None,
        i2v_override: str | None = None,
        device: str | None = None,
        parallel: str | None = None,
        resident: ResidentModel | None = None,
    ) -> None:
        self.override = override if override is not None else model_override(image=False)
        self.i2v_override = i2v_override if i2v_override is not None else model_override(image=True)
        from ..weights.single_file import suffixes  # diffusers' converter with it: imported when a service starts

        quantize = quantize_mode(formats.QUANTIZE_CHOICES)
        variants = {name: len(spec.experts) for name, spec in CATALOGUE.items()}
        self.transformers = transformer_overrides(variants, suffixes())  # WANLORA_TRANSFORMER
        # parallel="auto" in a worker of a WorkerGroup (wanlora.frontends.workers)
        self.resident = resident or ResidentModel(
            self.transformer_options, device=device, parallel=parallel, quantize=quantize
        )
        self.unreported_setup: dict[str, float] = {}  # cold-start timings for the first prediction's metrics

    def transformer_options(self, model: str) -> dict[str, Any]:
        """`from_pretrained`'s transformer for `model` (a catalogue name, or WANLORA_MODEL's folder or repo): its
        variant's file in WANLORA_TRANSFORMER, if any; another variant loads its own. The file's format keeps
        its own LoRA mode by default."""
        if not self.transformers:
            return {}
        path = self.transformers.get(resolve_model(model).name)
        return {} if path is None else {"transformer": path}

    def model_for(self, choice: object, image: bool = False, resolution: str = DEFAULT_RESOLUTION) -> str:
        """The model a request runs on: an image switches the choice to its image-to-video variant."""
        name = _choice("model", choice, MODEL_CHOICES)
        if not image:
            return self.override or name
        if choice not in IMAGE_CHOICES:
            raise InvalidInput(
                "image", "(an image)", f"model={choice} is text-to-video only; use {' or '.join(IMAGE_CHOICES)}"
            )
        by_resolution = IMAGE_CHOICES[choice]
        return self.i2v_override or by_resolution.get(resolution) or next(iter(by_resolution.values()))

    def load(self, model: str) -> WanLoraPipeline:
        """The pipeline for `model`, loading it (and dropping the resident one) if needed."""
        loads = len(self.resident.loads)
        pipe = self.resident.load(model)
        if len(self.resident.loads) > loads:
            self.unreported_setup = {f"setup_{k}": v for k, v in pipe.load_timings.items()}
        return pipe

    def resolve(
        self, inputs: PredictorInputs, spec: ModelSpec | None = None, images_read: bool = True
    ) -> ServiceRequest:
        """Check every input and map Replicate's names onto the library's, before any work.

        `spec` is the model the request will run on when it is known; else the resident model's, or
        the catalogue's. With `images_read=False` (a batch's check), an image is checked by its header.
        """
        try:
            return self._resolve(inputs, spec, images_read)
        except InvalidInput as exc:
            raise exc.renamed(INPUT_NAMES) from None

    def _resolve(self, i: PredictorInputs, spec: ModelSpec | None, images_read: bool) -> ServiceRequest:
        credentials = Credentials(hf_token=i.hf_api_token, civitai_token=i.civitai_api_token, local_files=False)
        name = self.model_for(i.model, i.image is not None, i.resolution)
        resident = self.resident
        if spec is None:
            spec = resident.pipe.spec if resident.pipe is not None and resident.model == name else resolve_model(name)
        if i.sample_guide_scale_2 is not None and len(spec.experts) == 1:
            raise InvalidInput(
                "sample_guide_scale_2",
                i.sample_guide_scale_2,
                "empty: only model=2.2-a14b has a second expert; use sample_guide_scale",
            )
        options = predictor_options(i, i.model, spec.experts)
        quality_to_crf(i.output_quality, "output_quality")  # here, not when the video is saved after all the work
        prepared = prepare(name, options, spec=spec, images_read=images_read)
        strengths = sweep_strengths(i)
        if strengths is not None:
            axes = tuple(sweep_axes(list(prepared.request.loras or ()), strengths=strengths))
            prepared = replace(prepared, sweep=axes)
        return ServiceRequest(prepared, i.output_quality, credentials)

    @error_boundary
    def generate(self, inputs: PredictorInputs, out_dir: Path) -> Result | None:
        """Validate every input, then make the LoRA state match and generate an MP4 in `out_dir`.

        In a parallel worker, only rank 0 writes the MP4; the other ranks return None.
        """
        resolved = self.resolve(inputs)
        self.load(resolved.model)
        try:
            video = self.resident.run(resolved.prepared, resolved.credentials, progress=not resolved.sweep)
        except LoraMismatch as exc:
            raise _with_model_hint(exc, inputs.model) from None
        if video is None:
            return None
        name = "wanlora-sweep" if resolved.sweep else "wanlora"
        path = video.save(Path(out_dir) / f"{name}-{video.seed}.mp4", quality=resolved.quality)
        timings = {**video.timings, **self.unreported_setup}
        self.unreported_setup = {}
        steps = resolved.request.settings.num_inference_steps
        return Result(path, video.seed, len(video.frames), steps, timings)


def _with_model_hint(exc: LoraMismatch, model: object) -> LoraMismatch:
    """The mismatch, plus the `model` inputs that fit the LoRA when its width names them."""
    fits = [choice for width in exc.widths for choice in WIDTH_CHOICES.get(width, ())]
    if len(exc.widths) == 1 and fits and model not in fits:
        choices = " or ".join(f"model={choice}" for choice in fits)
        return LoraMismatch(
            f"{exc}. This LoRA is for {choices}: run it with {choices}", exc.ref, exc.status, exc.widths
        )
    return exc
