"""`WanLoraPipeline`: a Wan base model loaded once, with LoRAs merged exactly and swapped fast.

Example (offline, with the tiny random model):

    >>> from wanlora import WanLoraPipeline
    >>> pipe = WanLoraPipeline.from_pretrained("tiny")
    >>> video = pipe.generate("a fox in the snow", width=64, height=48, num_frames=9, num_inference_steps=2, seed=7)
    >>> video.frames.shape
    (9, 48, 64, 3)
    >>> path = video.save("fox.mp4")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm import tqdm

from . import __version__
from .accelerators import accelerator_refs
from .errors import InternalError, InvalidInput, ModelNotFound, error_boundary
from .experts import (
    ATTRIBUTES,
    Expert,
    assign,
    expert_steps,
    experts_of,
    schedule_callback,
    schedules_restarted_after,
)
from .hub import download_model
from .images import resize_image
from .logs import NOTICE
from .lora import placement as lora_placement
from .lora.fetch import Credentials
from .lora.inspect import coverage_line, coverage_of
from .lora.layouts import LoraFile
from .lora.loader import LoraLoader
from .lora.selection import LoraRequest, check_targets, parse_requests
from .lora.state import apply_together
from .messages import plural
from .models import TINY_NAMES, ModelSpec, identify_model
from .options import SWEEP_AXES, options_from, takes_options
from .pairs import EVERY_EXPERT
from .parallel import ParallelPlan
from .parallel.distributed import Parallel, init_distributed, resolve_plan
from .request import Request, resolve_request
from .runtime.attention import attention_dtype, choose_backend, install_backend
from .runtime.devices import check_dtype, resolve_device
from .runtime.fastmode import apply_fast_mode
from .runtime.guidance import BatchedGuidance
from .runtime.memory import (
    MemoryPlan,
    Sizes,
    blocks_of,
    catalogue_sizes,
    check_offload,
    gpu_plan,
    measure,
    vae_tiling_for,
)
from .runtime.placement import ExpertSwitch, place, set_vae_tiling
from .runtime.sampling import FixedSigmaEuler, FixedTimestepEuler, RcmSampler, Wan2gpEuler, WanFlowUniPC
from .staging import staged_folder
from .sweep import MAX_WIDTH, Sweep, run_sweep, sweep_axes
from .tiny import tiny_pipeline
from .video import Video
from .weights import formats
from .weights.checkpoint import Checkpoint
from .weights.components import SHARABLE, Identity, model_identities
from .weights.dense import cast_keeping_fp32
from .weights.pristine import PristineSource
from .weights.single_file import load_transformer_file, transformer_files

logger = logging.getLogger(__name__)

PLANNED_COMPONENTS = ("text_encoder", "image_encoder", "transformer", "transformer_2", "vae")  # what takes GPU memory
TEXT_TOKENS = 512  # the prompt's T5 tokens, as diffusers' Wan pipelines encode them


def compile_blocks(transformer: torch.nn.Module, backend: str, fullgraph: bool) -> None:
    """torch.compile each transformer block's own computation, one graph for all of them.

    The blocks' `forward` is compiled, not the module call (diffusers' `compile_repeated_blocks`): fast
    mode's First Block Cache wraps `forward` with hooks whose skip decision dynamo cannot trace in one
    graph, and installed over the compiled function they run around it instead.
    """
    for block in blocks_of(transformer):
        block.forward = torch.compile(block.forward, fullgraph=fullgraph, backend=backend)


class WanLoraPipeline:
    """A Wan text- or image-to-video pipeline that takes LoRAs from anywhere.

    Build it with `from_pretrained`; call `generate` as often as you like. LoRAs given to
    `set_loras` or `generate(loras=...)` are merged into the transformer weights exactly,
    and swapped without reloading the base model.
    """

    def __init__(
        self,
        diffusers_pipeline: WanPipeline,
        spec: ModelSpec,
        device: torch.device,
        attention: str = "auto",
        parallel: ParallelPlan | None = None,
        offload: str = "none",
        checkpoints: dict[str, PristineSource] | None = None,
    ) -> None:
        self.diffusers_pipeline = diffusers_pipeline
        self.spec = spec
        self.device = device
        self.experts: list[Expert] = experts_of(diffusers_pipeline, spec.experts, checkpoints, device)
        transformers = [expert.module for expert in self.experts]
        split = parallel.attention_split if parallel else None
        self.attention = choose_backend(attention, device, split, attention_dtype(transformers[0]))
        if self.attention != "sdpa":  # sdpa is diffusers' default: nothing to install
            for transformer in transformers:
                install_backend(transformer, self.attention)
        self.parallel = Parallel(transformers, parallel, device) if parallel is not None else None
        self.batched_guidance = [BatchedGuidance().install(transformer) for transformer in transformers]
        self.base_scheduler = diffusers_pipeline.scheduler  # as loaded: what a saved model gets
        self.loader = LoraLoader()
        self.switch = None
        if offload == "experts":
            self.switch = ExpertSwitch([(e.module, e.loras) for e in self.experts], device)
        self.load_timings: dict[str, float] = {}
        self.memory_plan: MemoryPlan | None = None  # on a GPU: the plan it was placed by (wanlora.runtime.memory)
        self.placement: dict[str, object] = {}  # the host arenas and streams placement made, by component
        self.quantize: str | None = None  # the block linears' weight format, when not full precision
        self.component_ids: dict[str, Identity] = {}  # what proves which files the shareable components came from
        self._encoded: dict[tuple, tuple] | None = None  # a sweep's text embeddings, by prompt

    @classmethod
    @error_boundary
    def from_pretrained(
        cls,
        model: str | ModelSpec = "t2v-14b",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attention: str = "auto",
        share_from: WanLoraPipeline | None = None,
        compile: bool | str = False,
        offload: str = "auto",
        parallel: ParallelPlan | str | bool | None = None,
        quantize: str | None = None,
        transformer: str | Path | Sequence[str | Path] | None = None,
        lora_mode: str | None = None,
    ) -> WanLoraPipeline:
        """Load a base model once.

        Args:
            model: A catalogue variant (`wanlora models` lists them), a Hub repo id, a local
                diffusers-layout folder, `tiny`, or a `ModelSpec`.
            device: "cpu", "cuda", "cuda:N" or a `torch.device`; by default CUDA when there is a GPU, else the CPU.
            dtype: The transformer's and text encoder's dtype: bf16 on CUDA and fp32 on CPU by default.
            attention: The attention kernel: "auto" (xformers on CUDA where installed, else torch's SDPA), or
                one by name (`wanlora.runtime.attention`).
            share_from: A loaded pipeline whose tokenizer, text encoder and VAE this one reuses where
                they are the same.
            compile: Compile the transformer blocks with torch.compile (a string names the backend).
            offload: "auto", "none", "encoder", "experts", "model" or "group": what stays on the GPU.
            parallel: "auto", a `ParallelPlan` or diffusers' `ContextParallelConfig`: one generation
                shared by the GPUs of a torch.distributed group.
            quantize: None (full precision), or the name of a weight format to store the transformer's block
                linears in (`wanlora.weights.formats`; `wanlora generate --help` lists them).
            transformer: A single transformer file, `.safetensors` or `.gguf` (or a folder, or a (high, low)
                pair for Wan2.2 A14B) replacing the model's own.
            lora_mode: How LoRAs apply where the weights' format offers several ways (a `.gguf` file:
                "unfused", the default, "requantize" or "promote"); None: the format's default.

        Returns:
            The `WanLoraPipeline`, with no LoRA set: call `generate`, `set_loras` or `sweep` on it.

        In more detail: `model` is a catalogue variant (`t2v-1.3b`, `t2v-14b`, ...), a Hub repo id, a
        local diffusers-layout folder, or `tiny` (random weights, built offline: noise, not art).
        A catalogue model found in the weights folder (WANLORA_WEIGHTS) loads from there.
        `dtype` defaults to bf16 on CUDA and fp32 on CPU; the VAE and the modules diffusers
        keeps in fp32 stay fp32 either way. `share_from` reuses another pipeline's tokenizer,
        text encoder and VAE instead of loading them, each where it is proven the same as this
        model's own (the same files, or the same content by the Hub's hashes: wanlora.weights.components).

        `compile=True` compiles the repeated transformer blocks with torch.compile (a string
        names the backend); LoRA swaps rewrite weights in place and never recompile.
        `offload` ("auto", "none", "encoder", "experts", "model", "group") trades speed for GPU
        memory; "auto" plans each stage from the GPU's memory and takes the fastest mode that fits
        (wanlora.runtime.memory); the VAE tiles only where memory requires it.

        `quantize` names a weight format to store the transformer's block linears in
        (wanlora.weights.formats registers them; `wanlora generate --help` lists them with what
        each saves); the format chooses its matmul per device. LoRAs still merge exactly.

        `transformer` replaces the model's transformer by a single file, as ComfyUI and Kijai
        publish them (full precision, or a weight format's: see wanlora.weights.single_file), or a
        folder holding one (Wan2.2 A14B: a high/low pair, or a (high, low) tuple); the rest of the
        model comes from `model`. Block linears the file stores in a format stay in it, and are
        the W0 LoRAs merge onto. A `.gguf` file (city96's Wan2.1, QuantStack's Wan2.2 experts) keeps its
        quantized block linears as the file's own blocks (wanlora.weights.formats.gguf).

        `lora_mode` says how LoRAs apply to a format that offers several ways (a `.gguf` transformer:
        "unfused", the default, beside the matmul and exact; "requantize", merged into the file's own
        types; "promote", the touched layers in bf16); None: each format's default.

        `parallel` ("auto", a `ParallelPlan`, or diffusers' `ContextParallelConfig`) shares
        each generation between the processes of a torch.distributed group, one per GPU
        (torchrun starts them; the process group is joined here if needed): see
        wanlora.parallel. Call `generate` on every rank with the same arguments; rank 0 gets
        the video, the others None.
        """
        spec = model if isinstance(model, ModelSpec) else identify_model(model)
        quantize = formats.check_quantize(quantize)
        dtype = check_dtype(dtype)
        lora_mode = formats.check_lora_mode(lora_mode)
        plan = None
        if parallel is not None:
            rank_device = init_distributed()  # joins the process group, so it runs either way
            device = resolve_device(device if device is not None else rank_device)
            plan = resolve_plan(parallel, spec.arch.num_attention_heads, spec.name, device)
        device = resolve_device(device)
        offload = check_offload(offload, device, spec)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        shared, identities = share_from.shared_components(spec) if share_from is not None else ({}, {})
        timings = {}
        checkpoints: dict[str, PristineSource] = {}
        started = time.perf_counter()
        kept: set[str] = set()  # the formats transformer files kept block linears in, each in its own dtype
        if transformer is not None:
            for name, path in transformer_files(transformer, spec).items():
                module, checkpoints[name], kept_formats = load_transformer_file(path, spec, dtype, device)
                shared[ATTRIBUTES[name]] = module
                kept |= kept_formats
        if spec.source == "tiny":
            diffusers_pipeline = tiny_pipeline(kind=TINY_NAMES[spec.name])
            for name in ("transformer", "transformer_2"):
                if getattr(diffusers_pipeline, name, None) is not None:
                    cast_keeping_fp32(getattr(diffusers_pipeline, name), dtype)
            diffusers_pipeline.text_encoder.to(dtype)
            diffusers_pipeline.register_modules(**shared)
            identities = tiny_identities(spec) | identities
        else:
            folder = Path(spec.source)
            if not folder.exists():  # a Hub repo: fetch what is not shared, then load from disk
                folder = download_model(spec.source, skip=list(identities))
                timings["download_seconds"] = time.perf_counter() - started
                logger.info("downloaded %s in %.1fs", spec.source, timings["download_seconds"])
            diffusers_pipeline = load_diffusers_pipeline(folder, dtype, shared, spec)
            own = model_identities(spec.source, folder, tuple(n for n in SHARABLE if n not in identities))
            identities = {**own, **identities}
            from_folder = tuple(name for name in spec.experts if name not in checkpoints)
            checkpoints |= transformer_checkpoints(folder, from_folder, dtype)
        memory_plan = None
        weights = quantize or min(kept, default=formats.DENSE)  # what the plan counts the transformers in
        if device.type == "cuda":  # planned from the components as loaded (a finetune may differ in size)
            sizes = planned_sizes(diffusers_pipeline, spec, quantize)
            memory_plan = gpu_plan(device, spec, offload, weights, sizes)
        offload = memory_plan.mode if memory_plan is not None else "none" if offload == "auto" else offload
        if quantize is not None:  # asked for: every full-precision block linear; a file's own mix is kept otherwise
            fmt = formats.get(quantize)
            matmul = fmt.choose_matmul("auto", device)
            for name in spec.experts:
                home = device if resident(name, device, offload) else None  # quantized where it will live
                layers = fmt.convert_transformer(getattr(diffusers_pipeline, ATTRIBUTES[name]), matmul, home)
                logger.info("%s: %d more block linears, on %s", quantize, layers, home or "the CPU")
        quantize = quantize or (weights if kept else None)
        if lora_mode is not None:
            set_lora_mode(diffusers_pipeline, spec, lora_mode, kept | {quantize or formats.DENSE})
        for name in spec.experts if quantize is not None else ():
            layers_of = getattr(diffusers_pipeline, ATTRIBUTES[name])
            logger.info("%s matmuls (%s): %s", quantize, name, formats.get(weights).describe(layers_of))
        placement = place(diffusers_pipeline, device, offload)
        timings["load_seconds"] = time.perf_counter() - started - timings.get("download_seconds", 0.0)
        logger.info("loaded %s (%s) on %s in %.1fs", spec.name, spec.source, device, timings["load_seconds"])
        loaded = cls(diffusers_pipeline, spec, device, attention, plan, offload, checkpoints)
        loaded.load_timings = timings
        loaded.quantize = quantize
        loaded.memory_plan, loaded.placement = memory_plan, placement
        loaded.component_ids = identities
        if compile:
            backend = "inductor" if compile is True else compile
            for expert in loaded.experts:
                # context-parallel attention calls collectives that dynamo cannot trace in one graph
                compile_blocks(expert.module, backend, fullgraph=plan is None)
            logger.info("compiled the transformer blocks with torch.compile (%s)", backend)
        return loaded

    def shared_components(self, spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Identity]]:
        """What `spec`'s model can take from this one, and their identities: each of the tokenizer, text
        encoder and VAE proven the same as the one `spec`'s model has (wanlora.weights.components)."""
        held = {n: i for n, i in self.component_ids.items() if getattr(self.diffusers_pipeline, n, None) is not None}
        if not held:
            return {}, {}
        theirs = (
            tiny_identities(spec) if spec.source == "tiny" else model_identities(spec.source, local(spec), tuple(held))
        )
        same = [name for name, identity in held.items() if theirs.get(name) == identity]
        if len(same) < len(held):
            logger.info(
                "%s loads its own %s: not the same files as the model before",
                spec.name,
                ", ".join(sorted(set(held) - set(same))),
            )
        return {name: getattr(self.diffusers_pipeline, name) for name in same}, {name: held[name] for name in same}

    def release_transformer(self) -> None:
        """Drop the transformers and their LoRA state, to free memory for another variant."""
        for expert in self.experts:
            setattr(self.diffusers_pipeline, ATTRIBUTES[expert.name], None)
        # and whatever else holds them: the switch (with the experts' pinned copies), their arenas, the hooks
        self.experts, self.switch, self.batched_guidance, self.parallel = [], None, [], None
        for name in ("transformer", "transformer_2"):
            self.placement.pop(name, None)

    @property
    def transformer(self) -> torch.nn.Module:
        """The diffusers `WanTransformer3DModel` LoRAs are merged into (Wan2.2 A14B: the high-noise expert)."""
        return self.diffusers_pipeline.transformer

    @property
    def active_loras(self) -> list[LoraRequest]:
        """The LoRA set merged now, as requested (each request once, whatever experts it is on)."""
        return list(dict.fromkeys(c.request for expert in self.experts for c in expert.loras.active))

    @error_boundary
    def set_loras(
        self,
        loras: Sequence[str | tuple[str, float | Sequence[float]] | LoraRequest] | None,
        credentials: Credentials | None = None,
    ) -> None:
        """Make the weights equal to base + sum(strength_i * delta_i), exactly.

        Args:
            loras: The LoRA set, replacing the current one: each a reference (a Hub repo or file, a Hugging
                Face, Civitai or Replicate link, an https:// link to a .safetensors file, or a local file) at
                strength 1, a `(reference, strength)` pair, or a `LoraRequest` (one expert of Wan2.2 A14B).
                A strength is a number, or a list of them: a schedule over the denoising steps. `None` or
                `[]`: the base model alone.
            credentials: Per-request Hub and Civitai tokens (`wanlora.lora.fetch.Credentials`).

        Returns:
            None. `active_loras` holds the set now merged.

        Every LoRA is fetched, parsed and checked against the model, and every new weight
        proven finite and representable, before any weight changes; if one fails, the
        model stays as it was. The same set as now rewrites nothing (access to a LoRA that
        needed a token is still re-checked). A list strength is a schedule over equal
        phases of the denoising steps; outside `generate` its first value applies.
        `credentials` carries per-request Hub and Civitai tokens (HF_TOKEN and
        CIVITAI_API_TOKEN apply otherwise).

        In a parallel run every rank must succeed: if one fails, all raise and keep their set.
        """
        requests = parse_requests(loras or [])
        if self.parallel is None:
            return self._set_loras(requests, credentials)
        previous = self.active_loras
        error = None
        try:
            self._set_loras(requests, credentials)
        except Exception as exc:  # any failure: the other ranks must hear of it, or they wait forever
            error = exc
        failure = self.parallel.first_failure(error)
        if failure is None:
            return None
        if error is None:  # another rank failed and kept its set: keep the ranks' weights equal
            self._set_loras(previous, credentials)
        raise failure

    @error_boundary
    def save_merged(self, folder: str | os.PathLike) -> Path:
        """Write this model, with its current LoRAs baked into the weights, as a diffusers-layout folder.

        The folder appears only once complete: it is written beside its final name and then
        renamed, and a failure (SIGTERM included) leaves nothing behind. It must be new or empty.
        """
        target = Path(folder)
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InvalidInput("folder", str(folder), "a new or empty folder")
        if self.quantize is not None:  # diffusers' loader would read a format's stored rows without their scales
            why = f"its block linears are stored as {self.quantize}; load it in full precision"
            why += " (no quantize, no quantized transformer file)"
            raise InvalidInput("quantize", self.quantize, f"none to save a merged model: {why}")
        pipeline = self.diffusers_pipeline
        sampler, pipeline.scheduler = pipeline.scheduler, self.base_scheduler
        try:
            with staged_folder(target) as staging:
                pipeline.save_pretrained(staging, safe_serialization=True)
        finally:
            pipeline.scheduler = sampler
        logger.info("wrote %s with %s merged", target, plural(len(self.active_loras), "LoRA"))
        return target

    def _set_loras(self, requests: list[LoraRequest], credentials: Credentials | None) -> None:
        check_targets(requests, self.spec.experts, self.spec.name)
        credentials = credentials or Credentials()
        builtin = replace(credentials, local_files=True)  # a preset's own file, not a user's path
        loaded = [(r, self.loader.load(r.ref, builtin if r.builtin else credentials)) for r in requests]
        for request, files in loaded:  # before any weight changes: a LoRA named for another model is refused
            for _, lora in files:
                said = lora_placement.place(lora.metadata, lora.path, lora.civitai_base_model)
                lora_placement.refuse_other_base(said, self.spec, request.label)
        chosen = assign(loaded, self.spec.experts)
        started = time.perf_counter()
        rewritten = apply_together([(expert.loras, chosen[expert.name]) for expert in self.experts])
        if not rewritten:
            return
        seconds = time.perf_counter() - started
        for request, files in loaded:
            aimed = "" if request.expert == EVERY_EXPERT else f" on the {request.expert}-noise expert"
            for role, lora in files:
                taking = [
                    e for e in self.experts if any(c.lora is lora and c.request is request for c in chosen[e.name])
                ]
                if not taking:  # a pair's other file, for a request aimed at one expert
                    continue
                self._tell_applied(lora, taking)
                logger.info(
                    "applied %s at strength %s%s: %s, rank %s, %d tensors, trigger words: %s (merge %.2fs)",
                    lora.label,  # a pair's file says its expert in its label already
                    request.strength,
                    aimed if role == EVERY_EXPERT else "",
                    lora.layout,
                    "/".join(map(str, lora.ranks)) or "-",
                    len(lora.deltas),
                    ", ".join(lora.trigger_words) or "none found",
                    seconds,
                )
        if not requests:
            logger.info("LoRAs removed: base weights restored (%.2fs)", seconds)

    def _tell_applied(self, lora: LoraFile, taking: list[Expert]) -> None:
        """The notice a person sees without -v: the LoRA and how much of the model it changes (the same words
        whatever its strength, so that the CLI, which says each notice once, says it once per LoRA and model)."""
        if not logger.isEnabledFor(NOTICE):
            return
        model = self.spec.name
        if len(self.experts) > 1:
            model += f"'s {taking[0].name}-noise expert" if len(taking) == 1 else ", on each of its two experts"
        coverage = coverage_line(coverage_of(lora, taking[0].loras.merger.params, model))
        rank = "/".join(map(str, lora.ranks)) or "-"
        logger.log(NOTICE, "LoRA %s: changes %s; %s, rank %s", lora.label, coverage, lora.layout, rank)

    @error_boundary
    @takes_options
    def generate(
        self, prompt: str, *, credentials: Credentials | None = None, progress: bool = True, **options: Any
    ) -> Video | None:
        """Generate a video. Every option is checked before any work starts.

        Args:
            prompt: What the video shows.
            credentials: Per-request Hub and Civitai tokens (`wanlora.lora.fetch.Credentials`); HF_TOKEN and
                CIVITAI_API_TOKEN apply otherwise.
            progress: Show a progress bar over the denoising steps.
            **options: The fields of `wanlora.options.GenerationOptions`, in diffusers' names: `negative_prompt`,
                `image`, `last_image`, `resize`, `resolution`, `aspect_ratio`, `width`, `height`, `num_frames`,
                `fps`, `num_inference_steps`, `guidance_scale`, `guidance_scale_2`, `flow_shift`, `seed`,
                `loras`, `fast_mode`, `accelerator`, `cfg_batch`. Each has its default, bounds and help there.

        Returns:
            The `Video` (frames, fps, seed, metadata; `.save(path)` writes the MP4), or None on the ranks
            but 0 of a parallel run.

        Left unset, an option takes this model's own default from its reference configs (`pipe.spec`):
        frames and fps, steps, guidance (Wan2.2 A14B: `guidance_scale` for the high-noise expert,
        `guidance_scale_2` for the low-noise one), flow shift and negative prompt. `seed=None` picks a
        random seed, reported in `Video.seed`. `loras` replaces the current LoRA set for this call and
        the ones after it (a call that fails, interrupted ones included, puts the set before it back); `None`
        keeps the current set (less an accelerator's own LoRA from an earlier call). `fast_mode` ("off",
        "balanced", "fast") skips transformer work on steps that change little (First Block Cache).

        Image-to-video models need `image` (a path, an https:// link, a PIL image or a uint8 array), and
        take an optional `last_image` to end on. Without an explicit size, the frame keeps the image's
        aspect at the resolution's pixel area, as the reference code does; with a size or
        `aspect_ratio`, `resize` brings the image to it: "fit" (scale and center-crop), "pad" (scale
        and letterbox) or "stretch".

        `accelerator` (`wanlora models` lists them) stacks a step-distillation LoRA on the LoRA set and
        samples as it was trained: few steps, no guidance, its own shift and timesteps. Explicit steps,
        guidance or shift still win where the preset allows. `cfg_batch=True` runs the guided and
        unguided passes of each step as one forward of batch two: fewer, larger matmuls for twice the
        activation memory.

        In a parallel run (see `from_pretrained`) every rank calls this with the same arguments; rank
        0's seed is used everywhere, and only rank 0 gets the Video.

        Example:
            >>> video = pipe.generate("a fox in the snow", loras=[("style.safetensors", 0.8)], seed=7)
            >>> video.save("fox.mp4")
        """
        chosen = options_from({"prompt": prompt, **options}, "WanLoraPipeline.generate()")
        return self.run(resolve_request(self.spec, chosen), credentials, progress)

    @error_boundary
    def run(self, request: Request, credentials: Credentials | None = None, progress: bool = True) -> Video | None:
        """Generate from a request `wanlora.request.resolve_request` made for this pipeline's model."""
        if request.spec != self.spec:
            raise InvalidInput("request", request.spec.name, f"a request resolved for {self.spec.name}")
        settings = request.settings
        if self.parallel is not None:
            self.parallel.plan.check_fast_mode(request.fast_mode)
            if request.cfg_batch and self.parallel.plan.cfg:
                raise InvalidInput("cfg_batch", True, "False with CFG-parallel, which runs both passes at once already")
            width, height = self.parallel.plan.split_size(
                settings.width,
                settings.height,
                lambda w, h: self.spec.token_count(w, h, settings.num_frames),
                self.spec.side_multiple,
            )
            if (width, height) != (settings.width, settings.height):
                ranks = self.parallel.plan.context_degree
                logger.warning(
                    "%s does not split across %d processes: %dx%d instead", settings.size, ranks, width, height
                )
            settings = replace(settings, width=width, height=height, seed=self.parallel.shared_seed(settings.seed))
        # None keeps the caller's set (the library's promise to Python callers), but never a preset's own
        # LoRA an earlier request stacked: that belongs to its request alone. Access is re-checked.
        kept = [lora for lora in self.active_loras if not lora.builtin]
        loras = list(request.loras if request.loras is not None else kept)
        if distilled := request.accelerator_loras:
            replaced = accelerator_refs(self.spec)  # another preset's LoRA from an earlier run goes
            loras = [r for r in loras if r.ref not in replaced] + list(distilled)
        with self._lora_set_kept(after_success=False):  # a failure changes nothing, the LoRA set included
            return self._merge_and_denoise(loras, request, settings, credentials, progress)

    def _merge_and_denoise(
        self, loras: list[LoraRequest], request: Request, settings, credentials: Credentials | None, progress: bool
    ) -> Video | None:
        """`run`, its LoRA set and its settings decided: merge the set, set up the step hooks, and denoise."""
        started = time.perf_counter()
        self.set_loras(loras, credentials)
        lora_seconds = time.perf_counter() - started
        self._hint_trigger_words(settings.prompt)
        for expert in self.experts:
            apply_fast_mode(expert.module, self.spec, request.fast_mode, settings.num_inference_steps)
        size = (settings.width, settings.height)
        names = ("image", "last_image")
        conditioning = {
            name: resize_image(img, size, request.resize) for name, img in zip(names, request.images, strict=False)
        }
        extra: dict[str, Any] = {}
        if request.images:
            logger.info("image %dx%d brought to %dx%d (%s)", *request.images[0].size, *size, request.resize)
            framing = "the image's aspect" if request.framed_by_image else "as asked"
            extra = {"image_size": list(request.images[0].size), "framing": framing, "resize": request.resize}
        if request.accelerator is not None:
            extra["accelerator"] = request.accelerator.name
        guided = settings.guidance_scale > 1  # else the pipeline makes one pass per step (diffusers' rule)
        for hook in self.batched_guidance:
            hook.active = request.cfg_batch and guided
        if self.parallel is not None:
            self.parallel.set_guidance(guided)
        video = self._denoise(settings, progress, conditioning, extra, request)
        if video is not None:
            video.timings["lora_load_seconds"] = lora_seconds
        return video

    def _hint_trigger_words(self, prompt: str) -> None:
        files = {c.lora.label: c.lora for expert in self.experts for c in expert.loras.active}
        for label, lora in files.items():
            words = lora.trigger_words
            if words and not any(word.lower() in prompt.lower() for word in words):
                logger.warning("the prompt has none of %s's trigger words: %s", label, ", ".join(words[:5]))

    def _denoise(
        self,
        settings,
        progress: bool,
        conditioning: dict[str, Any],
        extra: dict[str, Any],
        request: Request,
    ) -> Video | None:
        pipeline = self._diffusers_pipeline_for(request)
        tiling = vae_tiling_for(
            self.memory_plan, self.spec.vae_scale, settings.width, settings.height, settings.num_frames
        )
        set_vae_tiling(pipeline.vae, tiling)
        extra = {**extra, "vae_decode": "untiled" if tiling is None else f"tiled: {tiling}"}
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        sampler = self._sampler_for(request, settings.flow_shift, generator)
        pipeline.scheduler = self.diffusers_pipeline.scheduler = sampler
        boundary_ratio = self.spec.boundary_ratio if request.phases is None else request.phases.boundary_ratio
        steps = expert_steps(sampler, settings.num_inference_steps, boundary_ratio, self.spec.experts)
        callbacks = [schedule_callback(self.experts, steps)]
        if request.phases is not None:
            extra = {**extra, "phases": request.phases.describe()}
            logger.info("%s: %s", request.accelerator.name if request.accelerator else "phases", extra["phases"])
            callbacks.append(self._unguided_after(request.phases.guided))
        if isinstance(sampler, RcmSampler):  # its first latent is the noise at its first sigma, below 1
            conditioning = {**conditioning, "latents": self._first_latents(pipeline, settings, generator, sampler)}
        main = self.parallel is None or self.parallel.is_main
        pipeline.set_progress_bar_config(disable=True)  # wanlora's own bar instead, below
        shown = progress and main
        bar = tqdm(total=settings.num_inference_steps, desc="denoising", unit="step", leave=False, disable=not shown)
        logger.info(
            "generating seed=%d %dx%d %d frames, %d steps",
            settings.seed,
            settings.width,
            settings.height,
            settings.num_frames,
            settings.num_inference_steps,
        )
        started = time.perf_counter()
        second = {"guidance_scale_2": settings.guidance_scale_2} if settings.guidance_scale_2 is not None else {}
        try:
            with expert_switch_at(pipeline, boundary_ratio), schedules_restarted_after(self.experts):
                output = pipeline(
                    **self._text(pipeline, settings),
                    width=settings.width,
                    height=settings.height,
                    num_frames=settings.num_frames,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    generator=generator,
                    output_type="np" if main else "latent",  # only rank 0 decodes
                    callback_on_step_end=step_callback(callbacks, bar),
                    **second,
                    **conditioning,
                )
        except BaseException:
            self.diffusers_pipeline.maybe_free_model_hooks()  # see below: a failed call never got there
            raise
        finally:
            bar.close()
        if pipeline is not self.diffusers_pipeline:
            # diffusers puts model-offloaded components back on the host at the end of a call that ends well, and
            # only on the pipeline that enabled the offload: not after a failure, nor on an image's twin (above).
            self.diffusers_pipeline.maybe_free_model_hooks()
        seconds = time.perf_counter() - started
        if not main:
            return None
        frames = (np.clip(output.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        logger.info("denoised and decoded in %.1fs", seconds)
        metadata = {**self._metadata(settings), **extra}
        video = Video(frames=frames, fps=settings.fps, seed=settings.seed, metadata=metadata)
        video.timings["denoising_seconds"] = seconds
        return video

    def _unguided_after(self, guided_steps: int):
        """A step callback that ends guidance after the first `guided_steps` steps (a phased recipe's first phase).

        diffusers decides each step whether to run the unconditional pass from the pipeline's
        `_guidance_scale` (its documented way to change guidance in a callback); the guidance
        hooks follow it. The next call sets it afresh from its own arguments.
        """

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if step == guided_steps - 1:
                pipeline._guidance_scale = 1.0
                for hook in self.batched_guidance:
                    hook.active = False
                if self.parallel is not None:
                    self.parallel.set_guidance(False)
            return tensors

        return on_step_end

    def _sampler_for(self, request: Request, flow_shift: float, generator: torch.Generator):
        return sampler_for(request, self.base_scheduler.config, flow_shift, generator)

    @staticmethod
    def _first_latents(pipeline: Any, settings, generator: torch.Generator, sampler: RcmSampler) -> torch.Tensor:
        """The noise diffusers would draw for this seed (same shape, generator and dtype), times the first sigma."""
        shape = (
            1,
            pipeline.vae.config.z_dim,
            (settings.num_frames - 1) // pipeline.vae_scale_factor_temporal + 1,
            settings.height // pipeline.vae_scale_factor_spatial,
            settings.width // pipeline.vae_scale_factor_spatial,
        )
        noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return noise.to(torch.float64).mul(sampler.initial_sigma).to(torch.float32)

    def _diffusers_pipeline_for(self, request: Request) -> WanPipeline:
        """diffusers' pipeline for the request: a task whose image runs through another class (TI2V-5B: its
        image-to-video twin) gets that class over the same components."""
        pipeline = self.diffusers_pipeline
        twin = self.spec.task.image_pipeline_class
        if twin is None or not request.images:
            return pipeline
        return getattr(diffusers, twin)(
            **pipeline.components, image_encoder=None, image_processor=None, expand_timesteps=self.spec.expand_timesteps
        )

    def _text(self, pipeline: Any, settings) -> dict[str, Any]:
        """The prompts for diffusers, or, in a sweep, their embeddings: each prompt is encoded once per sweep."""
        if self._encoded is None:
            return {"prompt": settings.prompt, "negative_prompt": settings.negative_prompt}
        key = (settings.prompt, settings.negative_prompt)
        if key not in self._encoded:  # both, guided or not: an unguided call ignores the negative one
            with torch.no_grad():  # as diffusers' own call encodes: with grad on, CPU kernels round differently
                self._encoded[key] = pipeline.encode_prompt(
                    prompt=settings.prompt,
                    negative_prompt=settings.negative_prompt,
                    do_classifier_free_guidance=True,
                    max_sequence_length=TEXT_TOKENS,
                )
        positive, negative = self._encoded[key]
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    @error_boundary
    @takes_options(sweep_axes=True)
    def sweep(
        self,
        prompt: str,
        *,
        strengths: Sequence[float] | None = None,
        strengths_2: Sequence[float] | None = None,
        max_width: int = MAX_WIDTH,
        credentials: Credentials | None = None,
        progress: bool = True,
        **options: Any,
    ) -> Sweep | None:
        """The same request over one or two axes, as one labelled grid `Video` and its cells.

        Args:
            prompt: What the video shows.
            strengths: The first LoRA of `loras`'s strengths, one cell each (a LoRA aimed at one Wan2.2
                expert varies on that expert only).
            strengths_2: The second LoRA's strengths.
            max_width: The grid's widest, in pixels (64 or more); cells are scaled down to fit it.
            credentials: Per-request Hub and Civitai tokens, as `generate` takes them.
            progress: Show a progress bar over the cells.
            **options: `generate`'s options, each left out its default: without `loras`, no LoRAs (never the
                set an earlier call left); and an option's values as an axis, by the names in
                `wanlora.options.SWEEP_AXES` (`seeds=[1, 2, 3]`, `prompts=[...]`).

        Returns:
            The `Sweep` (`.grid`, a `Video`; `.cells`, each cell's `Video`), or None on the ranks but 0 of a
            parallel run.

        With two axes, the first in the order strengths, strengths_2, seeds, prompts runs down the rows.
        Every cell has the same seed (and so the same initial noise) unless seeds are the axis, and is
        bitwise what `generate` gives for its settings. The grid's metadata lists every cell's. After the
        sweep, the pipeline holds the LoRA set it held before (what `loras=None` keeps), whatever the cells merged.
        """
        axes_given = {name: options.pop(name) for name in SWEEP_AXES if name in options}
        chosen = options_from({"prompt": prompt, **options}, "WanLoraPipeline.sweep()")
        if chosen.loras is None:
            chosen = replace(chosen, loras=[])  # left out, or None: no LoRAs, never the set an earlier call left
        request = resolve_request(self.spec, chosen)
        axes = sweep_axes(list(request.loras or ()), strengths, strengths_2, **axes_given)
        with self._lora_set_kept():
            return run_sweep(self, request, axes, credentials, max_width, progress)

    @contextmanager
    def _lora_set_kept(self, after_success: bool = True) -> Iterator[None]:
        """Inside, the LoRA set may change (a sweep's cells, a run's set); after, each expert holds its set from
        before again (with `after_success=False`, only when what ran inside failed), merged from the files it was
        read from (nothing is fetched): a later call without `loras` keeps the caller's set, never the last
        cell's nor a failed call's."""
        before = [(expert.loras, list(expert.loras.active)) for expert in self.experts]
        try:
            yield
        except BaseException:
            apply_together(before)
            raise
        if after_success:
            apply_together(before)

    @contextmanager
    def prompts_encoded_once(self) -> Iterator[None]:
        """Inside, each prompt is encoded once and its embeddings kept (a sweep's cells share them)."""
        self._encoded = {}
        try:
            yield
        finally:
            self._encoded = None

    def _metadata(self, settings) -> dict[str, Any]:
        return {
            **settings.as_dict(),
            "model": self.spec.name,
            "weights": self.quantize or "full precision",
            "loras": [r.describe() for r in self.active_loras],
            "wanlora": __version__,
        }


def step_callback(callbacks: list, bar: tqdm):
    """diffusers' callback_on_step_end: each of `callbacks` (None: nothing to do) in turn, then one tick of the
    bar."""

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        for callback in callbacks:
            if callback is not None:
                tensors = callback(pipeline, step, timestep, tensors)
        bar.update()
        return tensors

    return on_step_end


@contextmanager
def expert_switch_at(pipeline: Any, boundary_ratio: float | None) -> Iterator[None]:
    """diffusers' pipeline switching experts at `boundary_ratio` for one call (a phased recipe moves it off the
    model's own boundary), its own put back after, whatever happens."""
    own = pipeline.config.get("boundary_ratio")
    if own is None or boundary_ratio == own:
        yield
        return
    pipeline.register_to_config(boundary_ratio=boundary_ratio)
    try:
        yield
    finally:
        pipeline.register_to_config(boundary_ratio=own)


def meta_transformer(spec: ModelSpec) -> WanTransformer3DModel:
    """The transformer a spec describes, on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return WanTransformer3DModel(**spec.arch.transformer_config())


def tiny_identities(spec: ModelSpec) -> dict[str, Identity]:
    """The tiny models' components, built from code with one seed: the VAE differs with Wan2.2's."""
    return {
        "tokenizer": (("code", "tiny tokenizer"),),
        "text_encoder": (("code", "tiny umt5, seed 0"),),
        "vae": (("code", f"tiny vae, seed 0, {spec.vae_scale}x"),),
    }


def local(spec: ModelSpec) -> Path | None:
    """The model's folder where it is on disk, None for a Hub repo."""
    return Path(spec.source) if Path(spec.source).exists() else None


def planned_sizes(diffusers_pipeline: Any, spec: ModelSpec, quantize: str | None) -> Sizes:
    """The components' sizes as they will be placed: as loaded, and transformers about to be converted to the
    format `quantize` (where they will live, so after the plan) at that format's size."""
    components = {n: getattr(diffusers_pipeline, n, None) for n in PLANNED_COMPONENTS}
    sizes = measure({n: c for n, c in components.items() if c is not None})
    if quantize is None:
        return sizes
    converted = catalogue_sizes(spec, quantize)
    experts = [name for name in ("transformer", "transformer_2") if name in sizes.weights]
    weights: dict[str, int] = {**sizes.weights, **{name: converted.weights[name] for name in experts}}
    return replace(sizes, weights=weights, transformer_window=converted.transformer_window)


def set_lora_mode(diffusers_pipeline: Any, spec: ModelSpec, mode: str, used: set[str]) -> None:
    """How LoRAs apply to the weights of every format in `used` that offers `mode`; an error where none does."""
    offering = [fmt for fmt in map(formats.get, sorted(used)) if mode in fmt.lora_modes]
    if not offering:
        where = sorted(entry.name for entry in formats.ENTRIES if mode in entry.lora_modes)
        raise InvalidInput("lora_mode", mode, f"a model whose weights offer it ({', '.join(where)}); these are "
                           f"{', '.join(sorted(used))}")  # fmt: skip
    for name in spec.experts:
        for fmt in offering:
            fmt.set_lora_mode(getattr(diffusers_pipeline, ATTRIBUTES[name]), mode)
    logger.info("LoRAs apply %s (%s)", mode, ", ".join(fmt.name for fmt in offering))


def sampler_for(request: Request, base_config: Any, flow_shift: float, generator: torch.Generator | None = None):
    """The reference's sampler: an accelerator's own (fixed sigmas with Euler, or rCM's), else UniPC on Wan's
    schedule at `flow_shift`. Always a new one: no state from the last run."""
    preset, distilled = request.accelerator, request.distilled
    if distilled is not None and distilled.timesteps:  # the variant's own recipe, in place of the preset's sampler
        return FixedTimestepEuler(distilled.timesteps)
    if preset is not None and preset.sampler == "euler":
        return FixedSigmaEuler(list(preset.sigmas), flow_shift)
    if preset is not None and preset.sampler == "wan2gp-euler":
        return Wan2gpEuler(flow_shift)
    if preset is not None and preset.sampler == "rcm":
        if distilled is None or distilled.sigma_max is None:
            raise InternalError(f"the catalogue row of {preset.name} has no sigma_max")
        return RcmSampler(distilled.sigma_max, generator)
    return WanFlowUniPC.for_shift(base_config, flow_shift)


def resident(expert: str, device: torch.device, offload: str) -> bool:
    """Whether the expert's weights will live on the GPU (`memory.place`): where to quantize them."""
    if device.type != "cuda":
        return False
    return offload in ("none", "encoder") or (offload == "experts" and ATTRIBUTES[expert] == "transformer")


def transformer_checkpoints(folder: Path, experts: tuple[str, ...], dtype: torch.dtype) -> dict[str, PristineSource]:
    """Each transformer's files in a diffusers-layout folder, where LoRA merges can read W0 back exactly."""
    sources: dict[str, PristineSource] = {}
    for name in experts:
        checkpoint = Checkpoint.of_folder(folder / ATTRIBUTES[name], dtype)
        if checkpoint is not None:
            sources[name] = checkpoint
    logger.info("LoRA merges read W0 from %s", "the checkpoint files" if sources else "host copies")
    return sources


def load_diffusers_pipeline(folder: Path, dtype: torch.dtype, shared: dict[str, Any], spec: ModelSpec) -> WanPipeline:
    """Load a diffusers-layout Wan model from a folder, as the pipeline class its task needs.

    The VAE and the CLIP image encoder (Wan2.1 I2V) stay fp32, as Wan's reference code runs
    them; Wan2.2's two experts load as `transformer` and `transformer_2`. Components in
    `shared` are taken as they are instead of being loaded.

    Every file is read into memory, never mapped (`disable_mmap`): weights left on the CPU as
    views of a file's mapping die with SIGBUS when that file is cut short under them.
    """
    shared = dict(shared)
    unmapped = {"disable_mmap": True}
    try:
        if "vae" not in shared:
            shared["vae"] = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32, **unmapped)
        if "text_encoder" not in shared and (folder / "text_encoder").is_dir():
            from transformers import UMT5EncoderModel

            shared["text_encoder"] = UMT5EncoderModel.from_pretrained(
                folder, subfolder="text_encoder", dtype=dtype, **unmapped
            )
        if spec.task.takes_images and spec.arch.image_dim is not None:  # Wan2.1 I2V's CLIP image branch
            # imported here: without torchvision, transformers warns about CLIP's processor
            from transformers import CLIPVisionModel

            shared["image_encoder"] = CLIPVisionModel.from_pretrained(
                folder, subfolder="image_encoder", dtype=torch.float32, **unmapped
            )
        pipeline_class = getattr(diffusers, spec.task.pipeline_class)
        pipeline = pipeline_class.from_pretrained(folder, dtype=dtype, **unmapped, **shared)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"could not load {folder} as a diffusers Wan model: {exc}") from exc
    check_whole(pipeline, folder, spec)
    return pipeline


def check_whole(pipeline: Any, folder: Path, spec: ModelSpec) -> None:
    """Every transformer the model's layout needs is there, and every weight was read: diffusers leaves a component
    model_index.json omits as None (a Wan2.2 index on a one-transformer folder), and a weight its files lack on
    `meta` (a shard without it, a config of another variant), each an error only at first use."""
    problems = [f"no {ATTRIBUTES[name]}" for name in spec.experts if getattr(pipeline, ATTRIBUTES[name], None) is None]
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            unread = [key for key, value in component.state_dict(keep_vars=True).items() if value.is_meta]
            if unread:
                problems.append(f"{name} lacks {unread[0]}" + (f" and {len(unread) - 1} more" if unread[1:] else ""))
    if problems:
        raise ModelNotFound(
            f"{folder} is not a whole {spec.name} model ({'; '.join(problems)}): download it again, or check its "
            "model_index.json and configs"
        )
