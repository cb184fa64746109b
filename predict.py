"""Cog predictor: maps Replicate-style inputs onto wanlora's VideoService, and nothing else."""

import logging
import sys
import tempfile

from cog import BaseRunner, Input, Path, Secret

from wanlora.service import FAST_MODES, MODEL_CHOICES, VideoService
from wanlora.workers import WorkerGroup, worker_count

REF_FORMS = (
    "a Hugging Face repo (owner/repo, owner/repo/file.safetensors, owner/repo@revision/file) or huggingface.co link; "
    "a Civitai link (civitai.com/models/ID?modelVersionId=V or civitai.com/api/download/models/V) or civitai:V; "
    "a Replicate model (owner/model or replicate.com/owner/model) or replicate.delivery .tar; "
    "or any https:// link to a .safetensors file"
)


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load the default model (t2v-14b, or WANLORA_MODEL) once; other variants load on first use.

        WANLORA_I2V_MODEL likewise overrides the image-to-video model. With several GPUs
        visible (or WANLORA_GPUS set), one persistent worker per GPU shares every prediction.
        """
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)
        workers = worker_count()
        if workers > 1:
            self.service = WorkerGroup(workers)
            self.service.wait_ready()
        else:
            self.service = VideoService()
            self.service.load(self.service.model_for("14b"))

    def run(
        self,
        prompt: str = Input(description="What the video shows. Include your LoRAs' trigger words."),
        negative_prompt: str = Input(description="What to avoid", default=""),
        image: Path | None = Input(
            description="Start image: animates it with Wan2.1 I2V 14B (480p or 720p by resolution)", default=None
        ),
        model: str = Input(description="Wan2.1 base model", choices=list(MODEL_CHOICES), default="14b"),
        resolution: str = Input(description="480p, or 720p (14b only)", choices=["480p", "720p"], default="480p"),
        aspect_ratio: str = Input(
            description="Frame shape (with an image, the image's aspect decides)",
            choices=["16:9", "9:16", "1:1"],
            default="16:9",
        ),
        num_frames: int = Input(description="Frames: 4k+1, from 5 to 81", ge=5, le=81, default=81),
        fps: int = Input(description="Frames per second of the MP4", ge=1, le=60, default=16),
        sample_steps: int = Input(description="Denoising steps", ge=1, le=100, default=30),
        sample_guide_scale: float = Input(description="Classifier-free guidance", ge=0, le=20, default=5.0),
        sample_shift: float | None = Input(
            description="Flow shift; empty picks 3 at 480p and 5 at 720p", ge=0.1, le=20, default=None
        ),
        seed: int | None = Input(description="Random seed; empty picks one (logged)", ge=0, default=None),
        fast_mode: str = Input(description="Skip steps that change little", choices=list(FAST_MODES), default="Off"),
        lora_weights: str | None = Input(description=f"A LoRA to apply: {REF_FORMS}", default=None),
        lora_scale: float = Input(description="Strength of lora_weights", ge=-1, le=3, default=1.0),
        extra_lora: str | None = Input(
            description=f"A second LoRA, combined with the first: {REF_FORMS}", default=None
        ),
        extra_lora_scale: float = Input(description="Strength of extra_lora", ge=-1, le=3, default=1.0),
        hf_api_token: Secret | None = Input(description="Hugging Face token for private or gated LoRAs", default=None),
        civitai_api_token: Secret | None = Input(description="Civitai API token for LoRAs that need one", default=None),
        output_quality: int = Input(description="MP4 quality, 0 to 100 (80 is H.264 CRF 18)", ge=0, le=100, default=80),
    ) -> Path:
        result = self.service.generate(
            prompt=prompt,
            negative_prompt=negative_prompt,
            image=str(image) if image else None,
            model=model,
            resolution=resolution,
            aspect_ratio=aspect_ratio,
            num_frames=num_frames,
            fps=fps,
            sample_steps=sample_steps,
            sample_guide_scale=sample_guide_scale,
            sample_shift=sample_shift,
            seed=seed,
            fast_mode=fast_mode,
            lora_weights=lora_weights,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
            hf_api_token=hf_api_token.get_secret_value() if hf_api_token else None,
            civitai_api_token=civitai_api_token.get_secret_value() if civitai_api_token else None,
            output_quality=output_quality,
            out_dir=tempfile.mkdtemp(prefix="wanlora-"),
        )
        self.record_metric("lora_load_seconds", result.timings["lora_load_seconds"])
        self.record_metric("denoising_seconds", result.timings["denoise_seconds"])
        self.record_metric("frames", result.frames)
        return Path(result.path)
