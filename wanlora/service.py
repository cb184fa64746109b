"""A long-lived generation service with Replicate's input conventions, for the Cog predictor.

It keeps one Wan transformer resident at a time and shares the text encoder and VAE
between variants (they are the same for every Wan2.1 model), so switching from 14B to
1.3B frees the 14B weights instead of stacking them. LoRA state follows each request:
the same LoRAs as last time cost nothing, others are an exact swap.

GPU memory plan (bf16 weights; one transformer, the text encoder and the VAE resident,
which an 80 GB GPU holds; the library's offload="model" or "group" is for smaller ones):
- t2v-14b: transformer 28.6 GB + UMT5-XXL 11.4 GB + VAE 0.5 GB (fp32) + activations,
  about 8 GB at 480p and 20 GB at 720p x 81 frames: fits an 80 GB GPU.
- t2v-1.3b: transformer 2.8 GB + the same encoder and VAE: fits a 24 GB GPU at 480p.
- i2v-14b: transformer 32.8 GB + CLIP ViT-H 1.3 GB, otherwise as t2v-14b.
LoRA pristine copies live in host memory, never on the GPU.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput
from .images import load_image, nearest_aspect_ratio
from .lora.fetch import Credentials
from .models import resolve_model
from .settings import resolve_settings

logger = logging.getLogger(__name__)

MODEL_CHOICES = {"14b": "t2v-14b", "1.3b": "t2v-1.3b"}
FAST_MODES = {"Off": "off", "Balanced": "balanced", "Fast": "fast"}
LORA_SCALE_RANGE = (-1.0, 3.0)


def quality_to_crf(quality: int) -> int:
    """output_quality 0-100 (higher is better) to H.264 CRF 51-10; 80 gives CRF 18."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise InvalidInput("output_quality", quality, "a whole number between 0 and 100")
    return round(51 - 0.41 * quality)


def replicate_loras(
    lora_weights: str | None, lora_scale: float, extra_lora: str | None, extra_lora_scale: float
) -> list[tuple[str, float]]:
    """Replicate's two-slot LoRA inputs as a LoRA list; scales must be within -1 to 3."""
    loras = []
    for field, ref, scale in (
        ("lora_scale", lora_weights, lora_scale),
        ("extra_lora_scale", extra_lora, extra_lora_scale),
    ):
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (LORA_SCALE_RANGE[0] <= scale <= LORA_SCALE_RANGE[1])
        ):
            raise InvalidInput(field, scale, f"a number between {LORA_SCALE_RANGE[0]:g} and {LORA_SCALE_RANGE[1]:g}")
        if ref is not None and ref.strip():
            loras.append((ref.strip(), float(scale)))
    return loras


@dataclass
class Result:
    path: Path
    seed: int
    frames: int
    timings: dict[str, float]


class VideoService:
    """Loads models lazily, one transformer at a time, and runs validated requests."""

    def __init__(
        self,
        override: str | None = None,
        i2v_override: str | None = None,
        device: str | None = None,
        parallel: str | None = None,
    ) -> None:
        self.parallel = parallel  # "auto" in a worker of a WorkerGroup (wanlora.workers)
        self.override = override if override is not None else os.environ.get("WANLORA_MODEL") or None
        self.i2v_override = i2v_override if i2v_override is not None else os.environ.get("WANLORA_I2V_MODEL") or None
        self.device = device
        self.pipe = None  # the resident WanLoraPipeline
        self.model = None  # the model name it was loaded from

    def model_for(self, choice: str, image: bool = False, resolution: str = "480p") -> str:
        """The model a request runs on: an image switches 14b to its I2V variant for the resolution."""
        if choice not in MODEL_CHOICES:
            raise InvalidInput("model", choice, f"one of {', '.join(MODEL_CHOICES)}")
        if not image:
            return self.override or MODEL_CHOICES[choice]
        if choice != "14b":
            raise InvalidInput("image", "(an image)", f"model={choice} is text-to-video only; use model=14b")
        return self.i2v_override or ("i2v-14b-720p" if resolution == "720p" else "i2v-14b-480p")

    def load(self, model: str):
        """The pipeline for `model`, loading it (and dropping the resident one) if needed."""
        if self.model == model:
            return self.pipe
        from .pipeline import WanLoraPipeline

        previous, self.pipe, self.model = self.pipe, None, None
        if previous is not None:
            previous.release_transformer()
            gc.collect()
            _empty_cuda_cache()
        self.pipe = WanLoraPipeline.from_pretrained(
            model, device=self.device, share_from=previous, parallel=self.parallel
        )
        self.model = model
        return self.pipe

    def generate(
        self,
        *,
        prompt: str,
        negative_prompt: str = "",
        image: str | None = None,
        model: str = "14b",
        resolution: str = "480p",
        aspect_ratio: str = "16:9",
        num_frames: int = 81,
        fps: int = 16,
        sample_steps: int | None = None,
        sample_guide_scale: float | None = None,
        sample_shift: float | None = None,
        seed: int | None = None,
        fast_mode: str = "Off",
        lora_weights: str | None = None,
        lora_scale: float = 1.0,
        extra_lora: str | None = None,
        extra_lora_scale: float = 1.0,
        hf_api_token: str | None = None,
        civitai_api_token: str | None = None,
        output_quality: int = 80,
        out_dir: Path,
    ) -> Result | None:
        """Validate every input, then make the LoRA state match and generate an MP4 in `out_dir`.

        In a parallel worker, only rank 0 writes the MP4; the other ranks return None.
        """
        name = self.model_for(model, image is not None, resolution)
        spec = resolve_model(name)
        start_image = load_image(image) if image is not None else None
        if fast_mode not in FAST_MODES:
            raise InvalidInput("fast_mode", fast_mode, f"one of {', '.join(FAST_MODES)}")
        if start_image is not None:  # with an image, its own aspect picks the frame shape
            aspect_ratio = nearest_aspect_ratio(start_image)
        settings = resolve_settings(
            spec, prompt, negative_prompt=negative_prompt, resolution=resolution, aspect_ratio=aspect_ratio,
            num_frames=num_frames, fps=fps, steps=sample_steps, guidance_scale=sample_guide_scale,
            shift=sample_shift, seed=seed,
        )  # fmt: skip
        loras = replicate_loras(lora_weights, lora_scale, extra_lora, extra_lora_scale)
        crf = quality_to_crf(output_quality)
        credentials = Credentials(hf_token=hf_api_token or None, civitai_token=civitai_api_token or None)

        pipe = self.load(name)
        started = time.perf_counter()
        pipe.set_loras(loras, credentials)
        lora_seconds = time.perf_counter() - started
        video = pipe.generate(
            **settings.as_dict(),
            fast_mode=FAST_MODES[fast_mode],
            image=start_image,
        )
        if video is None:
            return None
        path = video.save(Path(out_dir) / f"wanlora-{video.seed}.mp4", crf=crf)
        timings = {"lora_load_seconds": lora_seconds, **video.timings}
        return Result(path, video.seed, len(video.frames), timings)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
