"""`WanLoraPipeline`: a Wan2.1 base model loaded once, with LoRAs merged exactly and swapped fast.

Example (offline, with the tiny random model):

    >>> from wanlora import WanLoraPipeline
    >>> pipe = WanLoraPipeline.from_pretrained("tiny")
    >>> video = pipe.generate("a fox in the snow", width=64, height=48, num_frames=9, steps=2, seed=7)
    >>> video.frames.shape
    (9, 48, 64, 3)
    >>> path = video.save("fox.mp4")
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from . import __version__
from .accelerators import Accelerator, accelerator_for, accelerator_refs, fixed_timestep_scheduler
from .attention import choose_backend, install_backend
from .distributed import Parallel, init_distributed, resolve_plan
from .errors import InvalidInput, ModelNotFound
from .fastmode import apply_fast_mode, check_fast_mode
from .guidance import BatchedGuidance
from .images import RESIZE_MODES, ImageInput, load_image, nearest_aspect_ratio, resize_image
from .lora.fetch import Credentials, hub_transport_errors
from .lora.loader import LoraLoader, LoraRequest, parse_requests, phase_strengths
from .lora.merge import LoraMerger
from .memory import check_offload, place, set_vae_tiling
from .models import ModelSpec, resolve_model, spec_for_config
from .parallel import ParallelPlan
from .settings import GenerationSettings, resolve_settings
from .testing import tiny_pipeline
from .video import Video

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast like diffusers' loader does: modules in `_keep_in_fp32_modules` stay fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if not any(part in keep for part in name.split(".")):
            param.data = param.data.to(dtype)


class WanLoraPipeline:
    """A Wan2.1 text- or image-to-video pipeline that takes LoRAs from anywhere.

    Build it with `from_pretrained`; call `generate` as often as you like. LoRAs given to
    `set_loras` or `generate(loras=...)` are merged into the transformer weights exactly,
    and swapped without reloading the base model.
    """

    def __init__(
        self,
        pipe: WanPipeline,
        spec: ModelSpec,
        device: torch.device,
        attention: str = "auto",
        parallel: ParallelPlan | None = None,
    ) -> None:
        self.pipe = pipe
        self.spec = spec
        self.device = device
        self.attention = choose_backend(attention, device, parallel.attention_split if parallel else None)
        if self.attention != "sdpa":  # sdpa is diffusers' default: nothing to install
            install_backend(pipe.transformer, self.attention)
        self.parallel = Parallel(pipe.transformer, parallel, device) if parallel is not None else None
        self.batched_guidance = BatchedGuidance().install(pipe.transformer)
        self.base_scheduler_config = pipe.scheduler.config
        self.loader = LoraLoader()
        self.merger = LoraMerger(pipe.transformer)
        self.active_loras: list[LoraRequest] = []

    @classmethod
    def from_pretrained(
        cls,
        model: str = "t2v-14b",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        attention: str = "auto",
        share_from: WanLoraPipeline | None = None,
        compile: bool | str = False,
        offload: str = "none",
        parallel: ParallelPlan | str | bool | None = None,
    ) -> WanLoraPipeline:
        """Load a base model once.

        `model` is a catalogue variant (`t2v-1.3b`, `t2v-14b`, ...), a Hub repo id, a local
        diffusers-layout folder, or `tiny` (random weights, built offline: noise, not art).
        `dtype` defaults to bf16 on CUDA and fp32 on CPU; the VAE and the modules diffusers
        keeps in fp32 stay fp32 either way. `share_from` reuses another pipeline's tokenizer,
        text encoder and VAE (the same for every Wan2.1 variant) instead of loading them.

        `compile=True` compiles the repeated transformer blocks with torch.compile (a string
        names the backend); LoRA swaps rewrite weights in place and never recompile.
        `offload` ("none", "model", "group") trades speed for GPU memory: see wanlora.memory.

        `parallel` ("auto", a `ParallelPlan`, or diffusers' `ContextParallelConfig`) shares
        each generation between the processes of a torch.distributed group, one per GPU
        (torchrun starts them; the process group is joined here if needed): see
        wanlora.parallel. Call `generate` on every rank with the same arguments; rank 0 gets
        the video, the others None.
        """
        spec = resolve_model(model)
        if spec.source != "tiny" and not Path(spec.source).exists():
            # A Hub model: its small transformer config comes first, so that a missing repo, a
            # gated one or no network is named as such, and a repo outside the catalogue is identified.
            config = hub_transformer_config(spec.source)
            if not spec.identified:
                spec = spec_for_config(config, spec.source)
        plan = None
        if parallel is not None:
            rank_device = init_distributed()  # joins the process group, so it runs either way
            device = torch.device(device if device is not None else rank_device)
            plan = resolve_plan(parallel, spec.arch.num_attention_heads, spec.name, device)
        device = torch.device(device) if device is not None else default_device()
        check_offload(offload, device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        started = time.perf_counter()
        shared = share_from.shared_components() if share_from is not None else {}
        if spec.source == "tiny":
            pipe = tiny_pipeline(i2v=spec.task == "i2v")
            cast_keeping_fp32(pipe.transformer, dtype)
            pipe.text_encoder.to(dtype)
            pipe.register_modules(**shared)
        else:
            pipe = load_diffusers_pipeline(spec.source, dtype, shared, i2v=spec.task == "i2v")
        place(pipe, device, offload)
        logger.info("loaded %s (%s) on %s in %.1fs", spec.name, spec.source, device, time.perf_counter() - started)
        loaded = cls(pipe, spec, device, attention, plan)
        if compile:
            backend = "inductor" if compile is True else compile
            # context-parallel attention calls collectives that dynamo cannot trace in one graph
            pipe.transformer.compile_repeated_blocks(fullgraph=plan is None, backend=backend)
            logger.info("compiled the transformer blocks with torch.compile (%s)", backend)
        return loaded

    def shared_components(self) -> dict[str, Any]:
        """The parts every Wan2.1 variant has in common."""
        return {name: getattr(self.pipe, name) for name in ("tokenizer", "text_encoder", "vae")}

    def release_transformer(self) -> None:
        """Drop the transformer and its LoRA state, to free memory for another variant."""
        self.pipe.transformer = None
        self.merger = None
        self.active_loras = []

    @property
    def transformer(self) -> torch.nn.Module:
        """The diffusers `WanTransformer3DModel` that LoRAs are merged into."""
        return self.pipe.transformer

    def set_loras(
        self,
        loras: Sequence[tuple[str, float | Sequence[float]]] | None,
        credentials: Credentials | None = None,
    ) -> None:
        """Make the weights equal to base + sum(strength_i * delta_i), exactly.

        Every LoRA is fetched, parsed and checked against the model before any weight
        changes; if one fails, the model stays as it was. The same set as now does nothing.
        A list strength is a schedule over equal phases of the denoising steps; outside
        `generate` its first value applies. `credentials` carries per-request Hub and
        Civitai tokens (HF_TOKEN and CIVITAI_API_TOKEN apply otherwise).

        In a parallel run every rank must succeed: if one fails, all raise and keep their set.
        """
        if self.parallel is None:
            return self._set_loras(loras, credentials)
        previous = [(r.ref, r.strength) for r in self.active_loras]
        error = None
        try:
            self._set_loras(loras, credentials)
        except Exception as exc:  # any failure: the other ranks must hear of it, or they wait forever
            error = exc
        failure = self.parallel.first_failure(error)
        if failure is None:
            return None
        if error is None:  # another rank failed and kept its set: keep the ranks' weights equal
            self._set_loras(previous, credentials)
        raise failure

    def _set_loras(self, loras, credentials: Credentials | None) -> None:
        requests = parse_requests(loras or [])
        loaded = [self.loader.load(r.ref, credentials) for r in requests]
        started = time.perf_counter()
        rewritten = self.merger.apply(
            [(lora, phase_strengths(r.strength, 0)) for lora, r in zip(loaded, requests, strict=True)]
        )
        self.active_loras = requests
        if rewritten:
            seconds = time.perf_counter() - started
            for lora, r in zip(loaded, requests, strict=True):
                logger.info(
                    "applied %s at strength %s: %s, rank %s, %d tensors, trigger words: %s (merge %.2fs)",
                    r.ref,
                    r.strength,
                    lora.layout,
                    "/".join(map(str, lora.ranks)) or "-",
                    len(lora.deltas),
                    ", ".join(lora.trigger_words) or "none found",
                    seconds,
                )
            if not requests:
                logger.info("LoRAs removed: base weights restored (%.2fs)", seconds)

    def _merge_phase(self, phase: int) -> None:
        self.merger.apply([(self.loader.load(r.ref), phase_strengths(r.strength, phase)) for r in self.active_loras])

    def generate(
        self,
        prompt: str,
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
        image: ImageInput | None = None,
        last_image: ImageInput | None = None,
        resize: str = "fit",
        loras: Sequence[tuple[str, float | Sequence[float]]] | None = None,
        credentials: Credentials | None = None,
        fast_mode: str = "off",
        accelerator: str | None = None,
        cfg_batch: bool = False,
        progress: bool = True,
    ) -> Video | None:
        """Generate a video. Every argument is checked before any work starts.

        Unset arguments take the model's defaults (Wan's: 81 frames at 16 fps, 50 steps,
        guidance 5, flow shift 3 at 480p and 5 at 720p). `seed=None` picks a random seed,
        reported in `Video.seed`. `loras` replaces the current LoRA set for this call and
        the ones after it; `None` keeps the current set. `fast_mode` ("off", "balanced",
        "fast") skips transformer work on steps that change little (First Block Cache).

        Image-to-video models need `image` (a path, PIL image or uint8 array), and take an
        optional `last_image` to end on. Without an explicit size, the preset whose aspect
        is nearest the image's is used; `resize` brings the image to it: "fit" (scale and
        center-crop), "pad" (scale and letterbox) or "stretch".

        `accelerator` ("lightx2v-4step", "causvid") stacks a step-distillation LoRA on the
        LoRA set and samples as it was trained: few steps, no guidance, its own shift and
        timesteps. Explicit steps, guidance or shift still win where the preset allows.

        `cfg_batch=True` runs the guided and unguided passes of each step as one forward of
        batch two: fewer, larger matmuls for twice the activation memory. Whether it pays
        depends on the GPU and the size; benchmarks/ measure it.

        In a parallel run (see `from_pretrained`) every rank calls this with the same
        arguments; rank 0's seed is used everywhere, and only rank 0 gets the Video.
        """
        images = self._check_images(image, last_image, resize)
        preset = None
        if accelerator is not None:
            preset, accelerator_ref = accelerator_for(accelerator, self.spec.name)
            steps = preset.steps if steps is None else steps
            guidance_scale = preset.guidance if guidance_scale is None else guidance_scale
            shift = preset.shift if shift is None else shift
            if preset.timesteps and steps != len(preset.timesteps):
                raise InvalidInput(
                    "steps", steps, f"{len(preset.timesteps)} with {accelerator}: it samples fixed timesteps"
                )
        if images and aspect_ratio is None and width is None:
            aspect_ratio = nearest_aspect_ratio(images[0])
        settings = resolve_settings(
            self.spec,
            prompt,
            negative_prompt=negative_prompt,
            resolution=resolution,
            aspect_ratio=aspect_ratio,
            width=width,
            height=height,
            num_frames=num_frames,
            fps=fps,
            steps=steps,
            guidance_scale=guidance_scale,
            shift=shift,
            seed=seed,
        )
        check_fast_mode(fast_mode)
        if not isinstance(cfg_batch, bool):
            raise InvalidInput("cfg_batch", cfg_batch, "True or False")
        if self.parallel is not None:
            self.parallel.plan.check_fast_mode(fast_mode)
            if cfg_batch and self.parallel.plan.cfg:
                raise InvalidInput("cfg_batch", True, "False with CFG-parallel, which runs both passes at once already")
            self.parallel.plan.check_tokens(settings.token_count, settings.size)
            settings = replace(settings, seed=self.parallel.shared_seed(settings.seed))
        if preset is not None:
            style = parse_requests(loras) if loras is not None else self.active_loras
            loras = [(r.ref, r.strength) for r in style if r.ref not in accelerator_refs()]
            loras.append((accelerator_ref, preset.strength))
        if loras is not None:
            self.set_loras(loras, credentials)
        self._hint_trigger_words(settings.prompt)
        apply_fast_mode(self.transformer, self.spec, fast_mode, settings.steps)
        size = (settings.width, settings.height)
        conditioning = {
            name: resize_image(img, size, resize) for name, img in zip(("image", "last_image"), images, strict=False)
        }
        extra = {}
        if images:
            logger.info("image %dx%d brought to %dx%d (%s)", *images[0].size, *size, resize)
            extra = {"image_size": list(images[0].size), "resize": resize}
        if preset is not None:
            extra["accelerator"] = preset.name
        guided = settings.guidance_scale > 1  # else the pipeline makes one pass per step
        self.batched_guidance.active = cfg_batch and guided
        if self.parallel is not None:
            self.parallel.set_guidance(guided)
        return self._denoise(settings, progress, conditioning, extra, preset)

    def _check_images(self, image, last_image, resize: str) -> list:
        """The conditioning images, read and checked; the right number for the model's task."""
        if self.spec.task == "t2v":
            if image is not None or last_image is not None:
                raise InvalidInput("image", "(an image)", f"{self.spec.name} is text-to-video; use an i2v model")
            return []
        if image is None:
            raise InvalidInput("image", None, f"{self.spec.name} is image-to-video and needs a start image")
        if resize not in RESIZE_MODES:
            raise InvalidInput("resize", resize, f"one of {', '.join(RESIZE_MODES)}")
        images = [load_image(image)]
        if last_image is not None:
            if not self.spec.arch.takes_last_image:
                raise InvalidInput(
                    "last_image",
                    "(an image)",
                    f"{self.spec.name} takes one image; a last frame "
                    "needs a first-last-frame model such as Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers",
                )
            images.append(load_image(last_image, "last_image"))
        return images

    def _hint_trigger_words(self, prompt: str) -> None:
        for request in self.active_loras:
            words = self.loader.load(request.ref).trigger_words
            if words and not any(word.lower() in prompt.lower() for word in words):
                logger.warning("the prompt has none of %s's trigger words: %s", request.ref, ", ".join(words[:5]))

    def _denoise(
        self,
        settings: GenerationSettings,
        progress: bool,
        conditioning: dict[str, Any],
        extra: dict[str, Any],
        preset: Accelerator | None = None,
    ) -> Video | None:
        set_vae_tiling(self.pipe.vae, settings.width, settings.height)
        if preset is not None and preset.timesteps:
            self.pipe.scheduler = fixed_timestep_scheduler(preset)
        elif getattr(self.pipe.scheduler.config, "flow_shift", None) != settings.shift:
            self.pipe.scheduler = UniPCMultistepScheduler.from_config(
                self.base_scheduler_config, flow_shift=settings.shift
            )
        main = self.parallel is None or self.parallel.is_main
        self.pipe.set_progress_bar_config(disable=not (progress and main), desc="denoising", leave=False)
        logger.info(
            "generating seed=%d %dx%d %d frames, %d steps",
            settings.seed,
            settings.width,
            settings.height,
            settings.num_frames,
            settings.steps,
        )
        started = time.perf_counter()
        output = self.pipe(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            width=settings.width,
            height=settings.height,
            num_frames=settings.num_frames,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(settings.seed),
            output_type="np" if main else "latent",  # only rank 0 decodes
            callback_on_step_end=self._schedule_callback(settings.steps),
            **conditioning,
        )
        seconds = time.perf_counter() - started
        if not main:
            return None
        frames = (np.clip(output.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        logger.info("denoised and decoded in %.1fs", seconds)
        metadata = {**self._metadata(settings), **extra}
        video = Video(frames=frames, fps=settings.fps, seed=settings.seed, metadata=metadata)
        video.timings["denoise_seconds"] = seconds
        return video

    def _schedule_callback(self, steps: int):
        """Re-merge at phase boundaries when a LoRA strength is a schedule, else nothing."""
        phases = max((len(r.strength) for r in self.active_loras if isinstance(r.strength, tuple)), default=1)
        if phases == 1:
            return None
        self._merge_phase(0)

        def on_step_end(pipe: WanPipeline, step: int, timestep: Any, tensors: dict) -> dict:
            phase, next_phase = step * phases // steps, (step + 1) * phases // steps
            if step + 1 < steps and next_phase != phase:
                self._merge_phase(next_phase)
            return tensors

        return on_step_end

    def _metadata(self, settings: GenerationSettings) -> dict[str, Any]:
        return {
            **settings.as_dict(),
            "model": self.spec.name,
            "loras": [{"ref": r.ref, "strength": r.strength} for r in self.active_loras],
            "wanlora": __version__,
        }


def meta_transformer(spec: ModelSpec) -> WanTransformer3DModel:
    """The transformer a spec describes, on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return WanTransformer3DModel(**spec.arch.transformer_config())


def hub_transformer_config(repo_id: str) -> dict[str, Any]:
    """A Hub model's transformer config.json, a few hundred bytes, to identify it before loading."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    try:
        return json.loads(Path(hf_hub_download(repo_id, "transformer/config.json")).read_text())
    except (LocalEntryNotFoundError, *hub_transport_errors()) as exc:  # before EntryNotFoundError, its base
        raise ModelNotFound(
            f"{repo_id} is not in the Hugging Face cache and the Hub cannot be reached: connect once, "
            "or point --model at a local diffusers-layout folder"
        ) from exc
    except EntryNotFoundError as exc:
        raise ModelNotFound(
            f"{repo_id} has no transformer/config.json: it is not a diffusers-layout Wan model"
        ) from exc
    except GatedRepoError as exc:
        raise ModelNotFound(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(f"{repo_id} is not a Hub repo you can read: check the name, or set HF_TOKEN") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFound(f"cannot read {repo_id} from the Hub ({type(exc).__name__}); check the name") from exc


def load_diffusers_pipeline(
    source: str, dtype: torch.dtype, shared: dict[str, Any] | None = None, i2v: bool = False
) -> WanPipeline:
    """Load a diffusers-layout Wan model from a folder or the Hub (an image-to-video one with `i2v`).

    The VAE and the CLIP image encoder stay fp32, as Wan's reference code runs them.
    Components in `shared` are taken as they are instead of being loaded.
    """
    shared = dict(shared or {})
    try:
        if "vae" not in shared:
            shared["vae"] = AutoencoderKLWan.from_pretrained(source, subfolder="vae", dtype=torch.float32)
        if i2v:  # imported here: without torchvision, transformers warns about CLIP's processor
            from diffusers import WanImageToVideoPipeline
            from transformers import CLIPVisionModel

            shared["image_encoder"] = CLIPVisionModel.from_pretrained(
                source, subfolder="image_encoder", dtype=torch.float32
            )
            return WanImageToVideoPipeline.from_pretrained(source, dtype=dtype, **shared)
        return WanPipeline.from_pretrained(source, dtype=dtype, **shared)
    except GatedRepoError as exc:
        raise ModelNotFound(f"{source} is gated: accept its terms on the Hub and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(f"{source} is not a Hub repo you can read: check the name, or set HF_TOKEN") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotFound(
            f"{source} is not in the Hugging Face cache and the Hub cannot be reached: "
            "connect once, or point --model at a local diffusers-layout folder"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"could not load {source} as a diffusers Wan model: {exc}") from exc
