"""Cog predictor: maps Replicate-style inputs onto wanlora's VideoService, and nothing else.

`cog build`, `cog predict` and `cog push` read the Input() arguments below from this file's
source, without running it: every choice list, bound, default and description is a
literal, or a constant of this module bound to one. tests/test_predict_schema.py holds
them to Cog's rules, and to the library's own constants.
"""

import pathlib
import shutil
import sys
import tempfile

from cog import BaseRunner, Input, Path, Secret

from wanlora.errors import InternalError, InvalidInput, WanLoraError
from wanlora.frontends.service import PredictorInputs, VideoService
from wanlora.frontends.workers import WorkerGroup, worker_count
from wanlora.logs import configure as configure_logging

LORA_HELP = "A LoRA to apply. Paste any of: a Hugging Face repo (owner/repo, owner/repo/file.safetensors, owner/repo@revision/file.safetensors) or a huggingface.co link; a Civitai page (civitai.com/models/ID?modelVersionId=V), its download link (civitai.com/api/download/models/V) or civitai:V; a Replicate model (owner/model, replicate.com/owner/model) or its trained_model.tar link; or any https:// link to a .safetensors file. Private files: add hf_api_token or civitai_api_token. On 2.2-a14b it goes on both experts, and a Wan2.2 pair (a repo or folder holding a high_noise_model and a low_noise_model file, or *HIGH* and *LOW* ones) puts each file on its own expert."
EXTRA_LORA_HELP = "A second LoRA, applied together with the first (same forms as lora_weights): for example a style plus a motion LoRA."
HIGH_LORA_HELP = "A LoRA for diffusers' transformer only: with model=2.2-a14b the high-noise expert (the first steps: composition and motion), with the other models their one transformer. Same forms as lora_weights; stacks with lora_weights and extra_lora, which go on both experts. Give a Wan2.2 pair's high_noise_model file here and its low_noise_model file in lora_weights_transformer_2 (or give the pair's repo or folder once, in lora_weights)."
LOW_LORA_HELP = "A LoRA for transformer_2, Wan2.2 A14B's low-noise expert (the last steps: detail and texture); model=2.2-a14b only. Same forms as lora_weights; stacks with the other LoRA inputs."
LORAS_HELP = 'More LoRAs, in the form of the fal Wan2.2 LoRA endpoints: a JSON list of up to 8 {"path": REF, "scale": 1, "transformer": "high" | "low" | "both"} items, e.g. [{"path": "owner/repo", "scale": 0.8, "transformer": "low"}]. path takes the forms of lora_weights (weight_name picks a file in a Hugging Face repo); scale is -1 to 3, as in the other slots. transformer: which 2.2-a14b expert it goes on; left out, the one the metadata or name of the file says (a musubi-tuner timestep range, an ai-toolkit _high_noise or _low_noise name), else both. The fal default is high: give transformer to keep the meaning of a fal request. Stacks with the other LoRA inputs; a LoRA given in one of them may not be repeated here.'


class Predictor(BaseRunner):
    def setup(self) -> None:
        """Load the default model (t2v-14b, or WANLORA_MODEL) once; other variants load on first use.

        WANLORA_I2V_MODEL likewise overrides the image-to-video model, WANLORA_WEIGHTS
        points at pre-fetched weights (cog.weights.yaml mounts them), and WANLORA_TRANSFORMER
        names a transformer file (a GGUF one) for some variants. With several GPUs
        visible (or WANLORA_GPUS set), one persistent worker per GPU shares every prediction.
        """
        configure_logging(verbose=True, stream=sys.stdout, fmt="%(message)s", force=True)
        self.outputs = pathlib.Path(tempfile.mkdtemp(prefix="wanlora-out-"))
        workers = worker_count()
        if workers > 1:
            group = WorkerGroup(workers)
            group.wait_ready()
            self.service: VideoService | WorkerGroup = group
        else:
            one = VideoService()
            one.load(one.model_for("14b"))
            self.service = one

    def run(
        self,
        prompt: str = Input(
            description="What the video shows. Include your LoRAs' trigger words: the log names them when the prompt has none."
        ),
        negative_prompt: str = Input(
            description="What the video should avoid, e.g. blurry, distorted, static. Empty: the model's own, as Wan's official code uses it (a Chinese list of flaws: oversaturated, overexposed, static, blurry details, subtitles, worst quality, JPEG artifacts, ugly, extra fingers, deformed limbs, cluttered background, walking backwards...). none: no negative prompt at all.",
            default="",
        ),
        image: Path | None = Input(
            description="A start image to animate (image-to-video). model=14b runs Wan2.1 I2V 14B (480p or 720p by resolution), 2.2-a14b runs Wan2.2 I2V A14B, 2.2-5b conditions Wan2.2 TI2V 5B on it; 1.3b takes none. With aspect_ratio auto, the video keeps the image's own aspect at the resolution's pixel count, as Wan's official code does.",
            default=None,
            accept="image/*",
        ),
        model: str = Input(
            description="Base model: 14b (Wan2.1 14B, 480p or 720p), 1.3b (Wan2.1 1.3B: fast, 480p only), 2.2-a14b (Wan2.2 A14B: two 14B experts, high-noise then low-noise, 480p or 720p, 16:9 and 9:16) or 2.2-5b (Wan2.2 TI2V 5B: 1280x704 or 704x1280 only, 24 fps, up to 121 frames). A LoRA works only on the model size it was trained for; Wan2.1 14B LoRAs also fit 2.2-a14b.",
            choices=["14b", "1.3b", "2.2-a14b", "2.2-5b"],
            default="14b",
        ),
        resolution: str = Input(
            description="480p, or 720p (14b and 2.2-a14b; about 4 times slower). 2.2-5b ignores it: it runs at 720p (1280x704) only.",
            choices=["480p", "720p"],
            default="480p",
        ),
        aspect_ratio: str = Input(
            description="Frame shape. auto: the image's own aspect when there is an image (as Wan's official code frames it), else 16:9. 16:9 is 832x480 at 480p, 9:16 is 480x832, 1:1 is 624x624 (1280x720, 720x1280, 960x960 at 720p; 1280x704 and 704x1280 on 2.2-5b); with an image, these frame it that way, cropping it to fit. The Wan2.2 models have no 1:1.",
            choices=["auto", "16:9", "9:16", "1:1"],
            default="auto",
        ),
        num_frames: int | None = Input(
            description="Number of frames, 4k+1 from 5: up to 81 (5 seconds at 16 fps), or 121 on 2.2-5b (5 seconds at 24 fps). Empty: the model's most, 81 or 121.",
            ge=5,
            le=121,
            default=None,
        ),
        fps: int | None = Input(
            description="Frames per second of the MP4. Empty: the model's own, 16 (Wan2.1, 2.2-a14b) or 24 (2.2-5b).",
            ge=1,
            le=60,
            default=None,
        ),
        sample_steps: int | None = Input(
            description="Denoising steps: more is slower and finer. Empty: 30, or the accelerator's own (4 for lightx2v-4step, which needs exactly 4; 8 for lightning-3phase and causvid).",
            ge=1,
            le=100,
            default=None,
        ),
        sample_guide_scale: float | None = Input(
            description="How closely to follow the prompt (classifier-free guidance); on 2.2-a14b, the high-noise expert's. Empty: 5 (2.2-a14b: 4, or 3.5 with an image), or 1 with an accelerator (guidance 1 skips the second pass of each step); with lightning-3phase, its first phase's (3.5).",
            ge=0,
            le=20,
            default=None,
        ),
        sample_guide_scale_2: float | None = Input(
            description="Guidance of 2.2-a14b's low-noise expert; other models take none. Empty: sample_guide_scale when you set it, else 3 (3.5 with an image), or 1 with an accelerator (lightning-3phase takes none: its low-noise phase runs unguided).",
            ge=0,
            le=20,
            default=None,
        ),
        sample_shift: float | None = Input(
            description="Flow shift of the sampler: higher spends more steps on composition. Empty: the model's own, as Wan's official code sets it: 5, but 3 for 14b with an image at 480p; 2.2-a14b 12 (5 with an image); 2.2-5b 5; 5 with an accelerator (lightning-3phase: 3 for text-to-video, 5 with an image).",
            ge=0.1,
            le=20,
            default=None,
        ),
        seed: int | None = Input(
            description="Random seed. On the same hardware and software, the same seed and inputs give the same video; another GPU type may differ in small details. Empty: a random one, shown in the log and stored in the MP4.",
            ge=0,
            default=None,
        ),
        fast_mode: str = Input(
            description="Skip work on denoising steps that change little (First Block Cache): Balanced is faster with little change, Fast faster still.",
            choices=["Off", "Balanced", "Fast"],
            default="Off",
        ),
        accelerator: str = Input(
            description="Step distillation for speed, each sampled as its own reference code does: lightx2v-4step samples 4 steps without guidance (14b and 2.2-a14b; on 2.2-a14b the Wan2.2-Lightning Seko pair, one file per expert); on 2.2-a14b also lightning-250928 and lightx2v-1217 (text-to-video), lightx2v-1022, lightx2v-moe and lightx2v-260412 (image-to-video), all 4 steps; lightning-3phase (2.2-a14b) runs Wan2GP's three-phase recipe: 8 steps, the first guided (sample_guide_scale, 3.5) without the accelerator, then the high-noise and the low-noise accelerator unguided; rcm samples 1 to 4 steps with rCM's own stochastic sampler (14b and 1.3b text-to-video, 2.2-a14b image-to-video); causvid 8 steps (14b and 1.3b text-to-video; 1.3b: Wan2GP's profile, on its fixed timesteps; 14b: a community recipe). Its LoRA stacks with the LoRA inputs, and it sets sample_steps, the guidance and sample_shift unless you do.",
            choices=[
                "none",
                "lightx2v-4step",
                "lightning-250928",
                "lightx2v-1217",
                "lightx2v-1022",
                "lightx2v-moe",
                "lightx2v-260412",
                "lightning-3phase",
                "rcm",
                "causvid",
            ],
            default="none",
        ),
        lora_weights: str | None = Input(description=LORA_HELP, default=None),
        lora_scale: float = Input(
            description="Strength of lora_weights (or of replicate_weights): 1 as trained, 0 off, negative to push away from the style.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        lora_scale_sweep: str | None = Input(
            description="Compare strengths: comma-separated strengths of lora_weights (or replicate_weights), e.g. 0,0.5,1, at most 6. The output is then one grid video with a labelled cell per strength, every cell from the same seed and noise, and lora_scale is not used.",
            default=None,
        ),
        extra_lora: str | None = Input(description=EXTRA_LORA_HELP, default=None),
        extra_lora_scale: float = Input(
            description="Strength of extra_lora: 1 as trained, 0 off, negative to push away from the style.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        replicate_weights: str | None = Input(
            description="The LoRA of a fine-tuned version of this model. Replicate fills this in when you run a trained version; leave it empty otherwise. It takes the place of lora_weights, at lora_scale.",
            default=None,
        ),
        lora_weights_transformer: str | None = Input(description=HIGH_LORA_HELP, default=None),
        lora_scale_transformer: float = Input(
            description="Strength of lora_weights_transformer: 1 as trained, 0 off, negative to push away from the style.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        lora_weights_transformer_2: str | None = Input(description=LOW_LORA_HELP, default=None),
        lora_scale_transformer_2: float = Input(
            description="Strength of lora_weights_transformer_2: 1 as trained, 0 off, negative to push away from the style.",
            ge=-1,
            le=3,
            default=1.0,
        ),
        loras: str | None = Input(description=LORAS_HELP, default=None),
        hf_api_token: Secret | None = Input(
            description="Hugging Face token, for LoRAs in private or gated repos.", default=None
        ),
        civitai_api_token: Secret | None = Input(
            description="Civitai API token, for LoRAs that need a login to download.", default=None
        ),
        output_quality: int = Input(
            description="MP4 quality from 0 to 100, higher is better and larger: 80 is H.264 CRF 18, near-lossless to the eye.",
            ge=0,
            le=100,
            default=80,
        ),
    ) -> Path:
        arguments = {name: value for name, value in locals().items() if name != "self"}  # every input, once
        for stale in self.outputs.iterdir():  # Cog has delivered the previous output by now
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        try:
            arguments.update(
                image=downloaded_file("image", image),
                hf_api_token=secret_text("hf_api_token", hf_api_token),
                civitai_api_token=secret_text("civitai_api_token", civitai_api_token),
            )
            result = self.service.generate(PredictorInputs.of(**arguments), out_dir=self.outputs)
            if result is None:  # only a parallel rank other than 0 returns none, and this process is rank 0
                raise InternalError("the generation returned no video")
        except WanLoraError as exc:
            raise exc from None  # the one-line message; no library exception chained below it
        except Exception as exc:  # a bug outside the library's own boundary: still one clean line
            raise InternalError.of(exc) from None
        for name, seconds in result.timings.items():
            self.record_metric(name, seconds)
        self.record_metric("frames", result.frames)
        self.record_metric("steps", result.steps)
        return Path(result.path)


def downloaded_file(field: str, value: object) -> str | None:
    """A file input: only one Cog downloaded for this request (from a URL or an upload).

    Cog passes a plain server path through as text, and a shared server must not open it;
    the refusal does not depend on whether such a file exists.
    """
    if value is None:
        return None
    temp = pathlib.Path(tempfile.gettempdir())
    if not isinstance(value, pathlib.Path) or value.parent != temp or not value.name.startswith("tmp"):
        raise InvalidInput(field, "(a path on the server)", "a URL or an uploaded file")
    return str(value)


def secret_text(field: str, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Secret):
        return value.get_secret_value()
    raise InvalidInput(field, type(value).__name__, "a token (text), or empty")
