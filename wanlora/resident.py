"""One model kept loaded, and the requests that run on it: the service, a batch (local or Ray) and the CLI
share this, and none keeps a copy of its own.

A request is prepared once, before anything loads (`prepare`): every option checked against the
model its name says it is, defaults filled in. `ResidentModel.run` loads that model in place of
the one it holds (the old transformers freed first; the text encoder and VAE kept where proven
the same files) and runs the request, as one video or as a sweep's grid. A model whose own config
names another variant than its name did (a Hub repo, a folder) gets the request resolved again for
it, from the same options and seed: here, and nowhere else.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import CheckpointChanged, WeightsPartlyMerged
from .images import ImageHeader, check_image
from .lora.fetch import Credentials
from .models import ModelSpec, identify_model, resolve_model
from .options import IMAGE_OPTIONS, GenerationOptions
from .request import Request, resolve_request
from .sweep import MAX_WIDTH, Axis, Sweep

if TYPE_CHECKING:
    from .pipeline import WanLoraPipeline
    from .video import Video

logger = logging.getLogger(__name__)

# What leaves the held model unable to go on: weights mixing two LoRA sets, or a checkpoint rewritten under it
# (W0 can no longer be read back, so no LoRA can change). The request fails; the next one loads it afresh.
STALE_MODEL = (WeightsPartlyMerged, CheckpointChanged)


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: the model to load, the options as given and the request resolved from them,
    and a sweep's axes if it is one."""

    model: str  # a catalogue or tiny name, a folder or a Hub repo
    options: GenerationOptions
    request: Request  # its images read, or only checked (`ImageHeader`s): then they are read when it runs
    sweep: tuple[Axis, ...] | None = None
    max_width: int = MAX_WIDTH  # a sweep's grid, at most this wide
    identified: bool = False  # the request is for the model as its own config names it (`identify()`)

    @property
    def lora_set(self) -> tuple:
        """What its merge depends on: each LoRA, its strength and expert, and its accelerator's."""
        loras = [*(self.request.loras or ()), *self.request.accelerator_loras]
        return tuple((lora.ref, lora.strength, lora.expert) for lora in loras)

    def for_spec(self, spec: ModelSpec) -> Request:
        """The request to run on the model `spec` that loaded: the one prepared, or, for another variant than
        the name said or with images only checked so far, resolved again from the options (the seed kept)."""
        if spec == self.request.spec and not any(isinstance(i, ImageHeader) for i in self.request.images):
            return self.request
        return resolve_request(spec, replace(self.options, seed=self.request.settings.seed))

    def identify(self) -> Prepared:
        """This request for the model as its own config names it: a Hub repo's config read (a few hundred
        bytes, so that a missing, gated or unreachable repo is named before anything large moves), or its
        copy in the weights folder found; the request resolved again where that is another variant."""
        if self.identified:
            return self
        spec = identify_model(self.model)
        return replace(self, request=self.for_spec(spec), identified=True)


def prepare(
    model: str,
    options: GenerationOptions,
    sweep: tuple[Axis, ...] | None = None,
    max_width: int = MAX_WIDTH,
    spec: ModelSpec | None = None,
    images_read: bool = True,
) -> Prepared:
    """`options` resolved for `model` (as `spec`, or as its name or folder says it is; nothing downloaded):
    every input checked.

    With `images_read=False`, images are checked by their headers only (a batch reads each when its job runs).
    """
    checked: dict[str, Any] = {}
    if not images_read:
        given = {name: getattr(options, name) for name in IMAGE_OPTIONS}
        checked = {name: check_image(image, name) for name, image in given.items() if image is not None}
    request = resolve_request(spec or resolve_model(model), replace(options, **checked))
    return Prepared(model, options, request, sweep, max_width)


class ResidentModel:
    """Holds one loaded model; `run` loads the one a request names in its place when it differs.

    `load_options` are `WanLoraPipeline.from_pretrained`'s (device, dtype, attention, compile,
    offload, parallel, quantize, transformer), the same for every model it loads; `options_for(model)`,
    when given, adds those of one model (the predictor's transformer file for a variant).
    """

    def __init__(self, options_for: Callable[[str], Mapping[str, Any]] | None = None, **load_options: Any) -> None:
        self.load_options = load_options
        self.options_for = options_for
        self.pipe: WanLoraPipeline | None = None
        self.model: str | None = None  # the name `pipe` was loaded under
        self.loads: list[str] = []  # every model loaded, in order

    def load(self, model: str, prepared: Prepared | None = None) -> WanLoraPipeline:
        """The pipeline for `model`: the one held, or `model` loaded in its place (as `prepared` identified it,
        when it did: its config is not read twice)."""
        if self.pipe is not None and self.model == model:
            return self.pipe
        source = prepared.request.spec if prepared is not None and prepared.identified else model
        previous, self.pipe, self.model = self.pipe, None, None
        own = self.options_for(model) if self.options_for is not None else {}
        self.pipe = load_in_place_of(previous, source, **{**self.load_options, **own})
        self.model = model
        self.loads.append(model)
        return self.pipe

    def run(self, prepared: Prepared, credentials: Credentials | None = None, progress: bool = True) -> Video | None:
        """The video (a sweep's grid) of `prepared`, on its model; None on the ranks but 0 of a parallel run."""
        if prepared.sweep:
            swept = self.sweep(prepared, credentials, progress)
            return None if swept is None else swept.grid
        pipe = self.load(prepared.model, prepared)
        with self._loaded_again_when_stale():
            return pipe.run(prepared.for_spec(pipe.spec), credentials, progress)

    def sweep(self, prepared: Prepared, credentials: Credentials | None = None, progress: bool = True) -> Sweep | None:
        """`prepared`'s sweep, cells and grid; None on the ranks but 0 of a parallel run."""
        from .sweep import run_sweep

        assert prepared.sweep, "a prepared sweep"
        pipe = self.load(prepared.model, prepared)
        request = prepared.for_spec(pipe.spec)
        with self._loaded_again_when_stale():
            return run_sweep(pipe, request, list(prepared.sweep), credentials, prepared.max_width, progress)

    @contextmanager
    def _loaded_again_when_stale(self) -> Iterator[None]:
        """Inside, an error that leaves the model unable to go on (STALE_MODEL) makes the next request load it
        again; the pipeline is kept until then, for its text encoder and VAE to carry over."""
        try:
            yield
        except STALE_MODEL:
            logger.warning("%s cannot go on as loaded: the next request loads it again", self.model)
            self.model = None
            raise


def load_in_place_of(previous: WanLoraPipeline | None, model: str | ModelSpec, **options: Any) -> WanLoraPipeline:
    """`model` loaded (`from_pretrained`'s `options`) in place of `previous`: its transformers are freed
    first, so two never share the memory; the text encoder and VAE carry over where proven the same
    files (wanlora.weights.components), and so do the parsed LoRAs."""
    import torch

    from .pipeline import WanLoraPipeline

    if previous is not None:
        previous.release_transformer()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    pipe = WanLoraPipeline.from_pretrained(model, share_from=previous, **options)
    if previous is not None:
        pipe.loader = previous.loader  # parsed LoRAs fit any variant of their width
    return pipe
