"""The catalogue of Wan base models: where they live, their shapes and their defaults.

Pure data and lookups; nothing here touches torch state. `resolve_model` turns whatever a
person typed for `--model` into a `ModelSpec` without downloading anything;
`identify_model` then settles a Hub repo by its transformer config (a few hundred bytes),
or finds it pre-fetched in the weights folder.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InvalidInput, ModelNotFound, shown_value
from .hub import read_config
from .settings import ASPECT_RATIOS

# Wan's sizes (its SIZE_CONFIGS); Wan2.1's sides are multiples of 16. The reference's
# text-to-video sizes are 832x480 and 480x832 (480p), 1280x720 and 720x1280 (720p): the square
# ones are wanlora's own for text-to-video, and what the reference gives a square image for
# image-to-video (its pixel area at the image's aspect).
SIZE_PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (624, 624)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)},
}
# Wan2.2's SUPPORTED_SIZES: A14B at 480p and 720p without a square; TI2V-5B at 1280x704 only
# (its VAE compresses 16x, so sides are multiples of 32).
A14B_PRESETS = {size: {a: wh for a, wh in presets.items() if a != "1:1"} for size, presets in SIZE_PRESETS.items()}
TI2V_PRESETS = {"720p": {"16:9": (1280, 704), "9:16": (704, 1280)}}
# Wan's sample_neg_prompt (wan/configs/shared_config.py, the same in Wan2.1 and Wan2.2): what an
# empty negative prompt means. Wan2.1's I2V 14B config puts a word before it, and its FLF2V 14B
# config, a copy of I2V's, one more (wan/configs/__init__.py: "镜头切换，" + i2v_14B's).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，"
    "多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，"
    "倒着走"
)
SHAKY_CAMERA = "镜头晃动，"  # Wan2.1 i2v_14B: "camera shake"
CUT = "镜头切换，"  # Wan2.1 flf2v_14B: "shot change"
TWO_EXPERTS = ("high", "low")  # Wan2.2 A14B: `transformer` takes the high-noise steps, `transformer_2` the rest
ONE_TRANSFORMER = ("transformer",)  # Wan2.1 and TI2V-5B: diffusers' `transformer`


@dataclass(frozen=True)
class Task:
    """What a model's task decides: every question the code would otherwise answer by comparing task names.

    A new task is one record here (registered in TASKS) and the catalogue rows that run it.
    """

    name: str  # Wan's short name: "t2v"
    title: str  # as people say it: "text-to-video"
    pipeline_class: str  # the diffusers class a model folder of this task loads as
    min_images: int  # the conditioning images a request must bring (the start frame: `image`)
    # ... and may bring: a second is `last_image`, on a transformer that embeds two frames (FLF2V's)
    max_images: int
    # How a frame is chosen from an image (`images.reference_frame_size`): "per_side" as Wan's image2video.py,
    # "best_output_size" as Wan2.2's textimage2video.py; None where the task takes no image.
    framing: str | None = None
    # The diffusers class a request with an image runs through, when not `pipeline_class`: TI2V-5B's loads as
    # WanPipeline and takes an image through its image-to-video twin, which shares its components.
    image_pipeline_class: str | None = None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):  # `spec.task == "t2v"` would be False, silently, whatever the task
            raise TypeError(f"a Task compared with {other!r}: ask the record (task.takes_images, ...) or task.name")
        return isinstance(other, Task) and self.__dict__ == other.__dict__

    @property
    def takes_images(self) -> bool:
        return self.max_images > 0

    @property
    def runs_without_image(self) -> bool:
        return self.min_images == 0


T2V = Task("t2v", "text-to-video", "WanPipeline", min_images=0, max_images=0)
I2V = Task("i2v", "image-to-video", "WanImageToVideoPipeline", min_images=1, max_images=2, framing="per_side")
TI2V = Task(
    "ti2v",
    "text-and-image-to-video",
    "WanPipeline",
    min_images=0,
    max_images=1,
    framing="best_output_size",
    image_pipeline_class="WanImageToVideoPipeline",
)
TASKS: dict[str, Task] = {task.name: task for task in (T2V, I2V, TI2V)}


@dataclass(frozen=True)
class Architecture:
    """The `WanTransformer3DModel` config fields that tell Wan variants apart."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # set on first-last-frame (FLF2V) models: two image embeddings

    @property
    def takes_last_image(self) -> bool:
        return self.pos_embed_seq_len is not None

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def transformer_config(self) -> dict[str, Any]:
        """Keyword arguments for `WanTransformer3DModel(**config)`."""
        return {
            "patch_size": (1, 2, 2),
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "text_dim": self.text_dim,
            "freq_dim": 256,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6,
            "image_dim": self.image_dim,
            "added_kv_proj_dim": self.added_kv_proj_dim,
            "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": self.pos_embed_seq_len,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """Read the distinguishing fields of a diffusers transformer config."""
        names = cls.__dataclass_fields__
        required = {name: None for name in names if names[name].default is MISSING}  # absent: wrong_fields says so
        return cls(**{**required, **{k: config[k] for k in names if k in config}})

    def wrong_fields(self) -> list[tuple[str, object]]:
        """(name, value) of each field that is not a count above 0 (or None, where a field may be)."""
        names = self.__dataclass_fields__
        return [
            (name, value)
            for name in names
            if not ((value := getattr(self, name)) is None and names[name].default is None)
            and not (isinstance(value, int) and not isinstance(value, bool) and value > 0)
        ]


@dataclass(frozen=True)
class Phases:
    """A three-phase recipe (Wan2GP's "3 Phases" profiles): phase 1 guided on the high-noise expert without the
    accelerator, phase 2 on the high-noise expert with its accelerator LoRA, phase 3 on the low-noise expert with
    its own, both unguided.

    A phase starts at the first step whose timestep is at or below its threshold (Wan2GP's
    `get_model_switch_steps`), so the low-noise expert takes over at `thresholds[1]`, not at the model's boundary.
    """

    thresholds: tuple[float, float]  # phase 2 starts at t <= [0], phase 3 (the low-noise expert's) at t <= [1]


@dataclass(frozen=True)
class Distilled:
    """An accelerator's LoRA(s) for one variant, and what its recipe sets for that variant.

    Either `lora` (one file; on Wan2.2 A14B a folder holding a `high_noise_model`/`low_noise_model`
    pair, or one file for both experts), or a file per expert (`high`, `low`).
    """

    lora: str | None = None
    high: str | None = None
    low: str | None = None
    strengths: tuple[float, float] = (1.0, 1.0)  # (the high-noise expert, or the only transformer; the low-noise)
    sigma_max: float | None = None  # rCM: its sampler's first sigma on this variant (its inference script's)
    shift: float | None = None  # the recipe's shift on this variant, where it is not the preset's
    phases: Phases | None = None  # a phased recipe's switch points on this variant
    # A recipe on fixed timesteps on this variant, in place of the preset's sampler: Euler from the first N of
    # these to 0, unshifted (Wan2GP's "causvid" solver); () for the preset's own
    timesteps: tuple[int, ...] = ()
    note: str = ""  # where the files and strengths come from, when not the preset's own reference

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(ref for ref in (self.lora, self.high, self.low) if ref is not None)

    def check_steps(self, preset: str, steps: object) -> None:
        if self.timesteps and steps not in range(1, len(self.timesteps) + 1):
            why = f"1 to {len(self.timesteps)} with {preset} on this model: it samples the first of fixed timesteps"
            raise InvalidInput("num_inference_steps", steps, why)


@dataclass(frozen=True)
class ModelSpec:
    """One base model: its source, shapes, task and generation defaults."""

    name: str
    source: str  # a Hub repo id, a local folder, or "tiny"
    arch: Architecture
    task: Task  # what it makes from what: T2V, I2V or TI2V (a record of TASKS)
    resolutions: tuple[str, ...]
    default_steps: int
    presets: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: SIZE_PRESETS)
    default_guidance: float = 5.0
    default_guidance_2: float | None = None  # the low-noise expert's, on two-expert models
    flow_shifts: tuple[float, float] = (5.0, 5.0)  # up to 480p-sized frames, and above
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # what an empty negative prompt means: the reference's
    default_fps: int = 16
    default_frames: int = 81
    max_frames: int = 81
    boundary_ratio: float | None = None  # two experts: `transformer` takes t >= ratio x 1000
    expand_timesteps: bool = False  # TI2V-5B: a timestep per token, the first frame's kept clean
    vae_scale: int = 8  # the VAE's spatial compression: 16 for Wan2.2's TI2V VAE
    published_params: int | None = None  # per transformer
    # First Block Cache thresholds for fast_mode (balanced, fast). Starting points taken from
    # the TeaCache settings used on Replicate; not yet calibrated on real weights.
    fast_thresholds: tuple[float, float] = (0.15, 0.2)
    # False for a Hub repo outside the catalogue until its transformer config has been read.
    identified: bool = True
    family: str = ""  # the weights a LoRA is trained for, as people name them: "Wan2.1 14B"
    predictor: str | None = None  # the predictor's `model` choice that runs it, if any
    tiny: str | None = None  # the kind of its tiny stand-in (`wanlora tiny-model --kind`), if it has one
    accelerators: dict[str, Distilled] = field(default_factory=dict)  # accelerator preset -> its LoRA(s) here

    @property
    def default_resolution(self) -> str:
        return self.resolutions[0]

    @property
    def max_images(self) -> int:
        """The images a request may bring: its task's, but a last frame only where the transformer embeds two."""
        return min(self.task.max_images, 2 if self.arch.takes_last_image else 1)

    @property
    def experts(self) -> tuple[str, ...]:
        """The transformers LoRAs can be aimed at: "high" and "low" on Wan2.2 A14B, else "transformer"."""
        return TWO_EXPERTS if self.boundary_ratio is not None else ONE_TRANSFORMER

    @property
    def side_multiple(self) -> int:
        """Sides are a multiple of the VAE's compression times the transformer's 2x2 patches."""
        return self.vae_scale * 2

    @property
    def aspect_ratios(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a for presets in self.presets.values() for a in presets))

    def size(self, resolution: str | None = None, aspect_ratio: str = "16:9") -> tuple[int, int]:
        """(width, height) of a preset, refusing resolutions and shapes this model was not trained for."""
        resolution = resolution or self.default_resolution
        if resolution not in self.resolutions:
            allowed = " or ".join(self.resolutions)
            raise InvalidInput("resolution", resolution, f"{self.name} supports {allowed} only")
        if aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInput("aspect_ratio", aspect_ratio, f"one of {', '.join(ASPECT_RATIOS)}")
        if aspect_ratio not in self.presets[resolution]:
            shapes = ", ".join(self.presets[resolution])
            raise InvalidInput("aspect_ratio", aspect_ratio, f"{self.name} was trained at {shapes} only")
        return self.presets[resolution][aspect_ratio]

    def default_shift(self, width: int, height: int) -> float:
        """The reference's flow shift: Wan2.1 I2V's depends on the frame size (3 up to 480p), the others' do not."""
        return self.flow_shifts[0] if width * height <= 832 * 480 else self.flow_shifts[1]

    def max_area(self, resolution: str | None = None) -> int:
        """The pixel area of a resolution: its presets' largest (the reference's MAX_AREA_CONFIGS)."""
        resolution = resolution or self.default_resolution
        if resolution not in self.resolutions:
            self.size(resolution)  # the error that says which resolutions there are
        return max(w * h for w, h in self.presets[resolution].values())

    def token_count(self, width: int, height: int, num_frames: int) -> int:
        return token_count(width, height, num_frames, self.vae_scale)


def latent_shape(num_frames: int, height: int, width: int, vae_scale: int = 8) -> tuple[int, int, int]:
    """(frames, height, width) of the latents: 4x fewer frames plus the first, `vae_scale`x smaller sides."""
    return (num_frames - 1) // 4 + 1, height // vae_scale, width // vae_scale


def token_count(width: int, height: int, num_frames: int, vae_scale: int = 8) -> int:
    """Transformer tokens: the latent frames x the 2x2 patches of latent cells."""
    frames, rows, columns = latent_shape(num_frames, height, width, vae_scale)
    return frames * (rows // 2) * (columns // 2)


WAN_1_3B = Architecture(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)
WAN_14B = Architecture(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824)
WAN_14B_I2V = replace(WAN_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
WAN_FLF2V_14B = replace(WAN_14B_I2V, pos_embed_seq_len=2 * 257)  # a CLIP embedding for each of the two frames
# Wan2.2 (diffusers' convert_wan_to_diffusers.py; Wan2.2's wan/configs). The A14B experts are
# Wan2.1 14B's architecture; the I2V ones take the image through 20 more latent channels and
# have no CLIP branch; TI2V-5B is a new 3072-wide model on Wan2.2's 48-channel VAE.
WAN22_I2V_A14B = replace(WAN_14B, in_channels=36)
WAN22_TI2V_5B = Architecture(
    num_layers=30, num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, in_channels=48, out_channels=48
)

# The components every variant shares, at their published shapes (the Diffusers repos' config.json):
# the UMT5-XXL text encoder, Wan2.1 I2V's CLIP ViT-H/14 image encoder, and the two VAEs (Wan2.1's
# is AutoencoderKLWan's defaults; Wan2.2's, TI2V-5B's 48-channel one, compresses 16x in space).
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
}
CLIP_VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
WAN21_VAE: dict[str, Any] = {}
WAN22_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "is_residual": True,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
}

# ---------------------------------------------------------------------------- accelerator presets
#
# Step distillations ("accelerators", wanlora/accelerators.py): each preset is the sampling its
# distillation was trained for, held to its reference code in tests/test_reference.py. Three samplers:
# "euler" (flow-matching Euler on fixed sigmas, shifted: the whole lightx2v / Wan2.2-Lightning family,
# distilled on sigmas 1, 0.75, 0.5, 0.25 at shift 5), "rcm" (NVlabs' rCM: TrigFlow times, no shift, a
# stochastic step), "unipc" (the base model's own: CausVid on 14B, which no reference code samples so) and
# "wan2gp-euler" (Wan2GP's Euler on shifted linspace(1000, 1, N): its three-phase Lightning recipe).
# Each variant's row below names its LoRA(s) for the presets it has (`Distilled`), and may put a recipe of
# fixed timesteps in place of the preset's sampler (CausVid on 1.3B: Wan2GP's profile).

LIGHTNING_SIGMAS = (1.0, 0.75, 0.5, 0.25)  # before the shift: LightX2V's [1000, 750, 500, 250] / 1000


@dataclass(frozen=True)
class Accelerator:
    name: str
    steps: int
    guidance: float
    shift: float | None  # None: its sampler does not shift (rCM's fixed times)
    sampler: str  # "euler" on `sigmas`, "rcm", "unipc" (the base model's) or "wan2gp-euler"
    sigmas: tuple[float, ...] = ()  # "euler": the distillation's sigmas before the shift
    step_counts: tuple[int, ...] = ()  # the step counts it samples; () for any
    reference: str = ""  # the code its schedule is held to

    def check_steps(self, steps: object) -> None:
        if self.step_counts and steps not in self.step_counts:
            counts = " or ".join(map(str, self.step_counts))
            raise InvalidInput("num_inference_steps", steps, f"{counts} with {self.name}: it samples fixed times")


def _lightning(name: str, reference: str) -> Accelerator:
    """A release of the lightx2v / Wan2.2-Lightning family: same schedule, its own files."""
    return Accelerator(name, 4, 1.0, 5.0, "euler", LIGHTNING_SIGMAS, (4,), reference)


LIGHTX2V_CONFIG = "ModelTC/LightX2V configs/distill/wan22/wan_moe_{}.json"
ACCELERATORS: dict[str, Accelerator] = {
    preset.name: preset
    for preset in (
        # Wan2.1: lightx2v's CFG and step distillation; Wan2.2 A14B: Wan2.2-Lightning Seko V1.1 (T2V) / V1 (I2V)
        _lightning("lightx2v-4step", "ModelTC/Wan2.2-Lightning wan/utils/fm_solvers_euler.py, wan/configs"),
        _lightning("lightning-250928", "ModelTC/Wan2.2-Lightning (250928 changed no code)"),
        _lightning("lightx2v-1217", LIGHTX2V_CONFIG.format("t2v_distill_lora")),
        _lightning("lightx2v-1022", LIGHTX2V_CONFIG.format("i2v_distill_with_lora")),
        _lightning("lightx2v-moe", LIGHTX2V_CONFIG.format("i2v_distill_with_lora")),
        _lightning("lightx2v-260412", LIGHTX2V_CONFIG.format("i2v_distill_with_lora")),
        # Wan2GP's three-phase Lightning profiles: 8 steps, the first guided (3.5) without the accelerator
        Accelerator(
            "lightning-3phase",
            8,
            3.5,
            3.0,
            "wan2gp-euler",
            reference="deepbeepmeep/Wan2GP profiles/wan_2_2/Lightning * 3 Phases - 8 Steps.json",
        ),
        Accelerator("rcm", 4, 1.0, None, "rcm", step_counts=(1, 2, 3, 4), reference="NVlabs/rcm rcm/inference/"),
        # Bidirectional CausVid distillation: on 1.3B, Wan2GP's profile on its fixed timesteps (the row's
        # `timesteps`); on 14B, UniPC like the base model, which no reference does. Each row's note says which.
        Accelerator("causvid", 8, 1.0, 5.0, "unipc"),
    )
}


KIJAI = "Kijai/WanVideo_comfy"
LIGHTNING = "lightx2v/Wan2.2-Lightning"  # a folder per model, each a high/low pair
LIGHTX2V_I2V = f"{KIJAI}/Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"  # serves 720p too
# lightx2v's Wan2.2 distill LoRAs, as LightX2V's configs/distill/wan22/wan_moe_i2v_distill_with_lora.json and
# wan_moe_t2v_distill_lora.json name them (each at strength 1 on its expert).
DISTILL_LORAS = (
    "lightx2v/Wan2.2-Distill-Loras/wan2.2_{task}_A14b_{expert}_noise_lora_rank64_lightx2v_4step_{release}.safetensors"
)
KIJAI_22 = f"{KIJAI}/LoRAs/Wan22_Lightx2v"  # Kijai's LoRAs extracted from lightx2v's full distilled experts
MOE_HIGH = f"{KIJAI_22}/Wan_2_2_I2V_A14B_HIGH_lightx2v_MoE_distill_lora_rank_64_bf16.safetensors"
# rCM (NVlabs/rcm) is trained on Wan2.1 T2V; Kijai's LoRAs are its weight delta. Wan2.2 I2V takes the same
# delta merged into each expert: the authors' Wan.md runs high-rCM4.0 / low-rCM1.0 merges.
RCM_14B = f"{KIJAI}/LoRAs/rCM/Wan_2_1_T2V_14B_480p_rCM_lora_average_rank_83_bf16.safetensors"
RCM_1_3B = f"{KIJAI}/LoRAs/rCM/Wan_2_1_T2V_1_3B_480p_rCM_lora_average_rank_64_bf16.safetensors"
CAUSVID_NOTE = "no reference code samples it so: CausVid's own is 3 DMD steps on 1.3B; a community recipe"
# Wan2GP's "causvid" solver (models/wan/any2video.py): the first N of these timesteps, Euler to 0, no shift.
WAN2GP_CAUSVID_TIMESTEPS = (1000, 934, 862, 756, 603, 410, 250, 140, 74)


def distill_pair(task: str, release: str) -> Distilled:
    high, low = (DISTILL_LORAS.format(task=task, expert=e, release=release) for e in ("high", "low"))
    return Distilled(high=high, low=low)


# One row per variant: everything wanlora knows about it. Defaults are each reference's:
# Wan2.1's generate.py and wan/configs (50 steps, 40 for I2V; guidance 5; shift 5, but 3 for
# I2V at 480p), Wan2.2's wan/configs (guidance is (high, low) on A14B). Parameter counts are
# per transformer: Wan2.1's are the published checkpoints' safetensors index total_size / 4
# (FLF2V adds 657,920 for its two frames' position embeddings); Wan2.2's A14B experts share
# Wan2.1 14B's shapes (the I2V ones add 409,600 to the patch embedding for 36 input channels).
CATALOGUE_ROWS = [
    ModelSpec(
        name="t2v-14b",
        source="Wan-AI/Wan2.1-T2V-14B-Diffusers",
        arch=WAN_14B,
        task=T2V,
        resolutions=("480p", "720p"),
        default_steps=50,
        published_params=14_288_491_584,
        family="Wan2.1 14B",
        predictor="14b",
        tiny="t2v",
        accelerators={
            "lightx2v-4step": Distilled(f"{KIJAI}/Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"),
            "causvid": Distilled(f"{KIJAI}/Wan21_CausVid_14B_T2V_lora_rank32.safetensors", note=CAUSVID_NOTE),
            "rcm": Distilled(RCM_14B, sigma_max=80.0),  # rcm/inference/wan2pt1_t2v_rcm_infer.py's default
        },
    ),
    ModelSpec(
        name="t2v-1.3b",
        source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        arch=WAN_1_3B,
        task=T2V,
        resolutions=("480p",),
        default_steps=50,
        published_params=1_418_996_800,
        fast_thresholds=(0.07, 0.08),
        family="Wan2.1 1.3B",
        predictor="1.3b",
        accelerators={
            "causvid": Distilled(
                f"{KIJAI}/Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors",
                timesteps=WAN2GP_CAUSVID_TIMESTEPS,
                note="Wan2GP's profiles/wan_1.3B/'Causvid Rank32 - 8 Steps': this file at 1, 8 steps, guidance 1, "
                "its 'causvid' solver",
            ),
            "rcm": Distilled(RCM_1_3B, sigma_max=80.0),
        },
    ),
    ModelSpec(
        name="i2v-14b-480p",
        source="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        arch=WAN_14B_I2V,
        task=I2V,
        resolutions=("480p",),
        default_steps=40,
        flow_shifts=(3.0, 5.0),
        negative_prompt=SHAKY_CAMERA + WAN_NEGATIVE_PROMPT,
        published_params=16_394_878_784,
        fast_thresholds=(0.19, 0.26),
        family="Wan2.1 14B",
        predictor="14b",
        tiny="i2v",
        accelerators={"lightx2v-4step": Distilled(LIGHTX2V_I2V)},
    ),
    ModelSpec(
        name="i2v-14b-720p",
        source="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        arch=WAN_14B_I2V,
        task=I2V,
        resolutions=("720p", "480p"),
        default_steps=40,
        flow_shifts=(3.0, 5.0),
        negative_prompt=SHAKY_CAMERA + WAN_NEGATIVE_PROMPT,
        published_params=16_394_878_784,
        fast_thresholds=(0.2, 0.3),
        family="Wan2.1 14B",
        predictor="14b",
        accelerators={"lightx2v-4step": Distilled(LIGHTX2V_I2V, note="the 480p LoRA: no 720p one is published")},
    ),
    # First and last frame: Wan2.1's generate.py samples it 50 steps at shift 16.
    ModelSpec(
        name="flf2v-14b",
        source="Wan-AI/Wan2.1-FLF2V-14B-720P-Diffusers",
        arch=WAN_FLF2V_14B,
        task=I2V,
        resolutions=("720p", "480p"),
        default_steps=50,
        flow_shifts=(16.0, 16.0),
        negative_prompt=CUT + SHAKY_CAMERA + WAN_NEGATIVE_PROMPT,  # flf2v_14B is i2v_14B's config, plus a word
        published_params=16_395_536_704,
        family="Wan2.1 14B",
    ),
    ModelSpec(
        name="t2v-a14b",
        source="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        arch=WAN_14B,
        task=T2V,
        resolutions=("480p", "720p"),
        default_steps=40,
        presets=A14B_PRESETS,
        default_guidance=4.0,
        default_guidance_2=3.0,
        flow_shifts=(12.0, 12.0),
        boundary_ratio=0.875,
        published_params=14_288_491_584,
        family="Wan2.2 A14B",
        predictor="2.2-a14b",
        tiny="t2v-a14b",
        accelerators={
            "lightx2v-4step": Distilled(f"{LIGHTNING}/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"),
            "lightning-250928": Distilled(f"{LIGHTNING}/Wan2.2-T2V-A14B-4steps-lora-250928"),
            "lightx2v-1217": distill_pair("t2v", "1217"),
            "lightning-3phase": Distilled(
                f"{LIGHTNING}/Wan2.2-T2V-A14B-4steps-lora-250928",
                phases=Phases((965.0, 800.0)),
                note="Wan2GP's 'Lightning t2v v2025-09-28 3 Phases - 8 Steps' profile, with lightx2v's own files of "
                "the release it names",
            ),
        },
    ),
    ModelSpec(
        name="i2v-a14b",
        source="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        arch=WAN22_I2V_A14B,
        task=I2V,
        resolutions=("480p", "720p"),
        default_steps=40,
        presets=A14B_PRESETS,
        default_guidance=3.5,
        default_guidance_2=3.5,
        flow_shifts=(5.0, 5.0),
        boundary_ratio=0.9,
        published_params=14_288_901_184,
        family="Wan2.2 A14B",
        predictor="2.2-a14b",
        tiny="i2v-a14b",
        accelerators={
            "lightx2v-4step": Distilled(f"{LIGHTNING}/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1"),
            "lightx2v-1022": distill_pair("i2v", "1022"),
            # The MoE distill (2025-10): lightx2v's SVD-extracted low-noise LoRA, Kijai's extraction of the high one
            "lightx2v-moe": Distilled(
                high=MOE_HIGH,
                low="lightx2v/Wan2.2-I2V-A14B-Moe-Distill-Lightx2v/loras/low_noise_model_rank64.safetensors",
            ),
            # 260412 (720p): lightx2v publishes full models only; these are Kijai's rank-64 extractions of them
            "lightx2v-260412": Distilled(
                high=f"{KIJAI_22}/Wan_2_2_I2V_A14B_HIGH_lightx2v_4step_lora_260412_rank_64_fp16.safetensors",
                low=f"{KIJAI_22}/Wan_2_2_I2V_A14B_LOW_lightx2v_4step_lora_260412_rank_64_fp16.safetensors",
                note="lightx2v ships full models only (or load them with --transformer); no LightX2V config names "
                "260412, so its schedule is the family's I2V distill config",
            ),
            "lightning-3phase": Distilled(
                high=MOE_HIGH,
                low=f"{LIGHTNING}/Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/low_noise_model.safetensors",
                shift=5.0,
                phases=Phases((985.0, 800.0)),
                note="Wan2GP's 'Lightning i2v v2025-10-14 3 Phases - 8 Steps' profile: the MoE distill's high-noise "
                "LoRA, Seko V1's low-noise one",
            ),
            # rcm/inference/wan2pt2_i2v_rcm_infer.py: sigma_max 200; Wan.md merges the delta at 4.0 (high), 1.0 (low)
            "rcm": Distilled(RCM_14B, strengths=(4.0, 1.0), sigma_max=200.0),
        },
    ),
    ModelSpec(
        name="ti2v-5b",
        source="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        arch=WAN22_TI2V_5B,
        task=TI2V,
        resolutions=("720p",),
        default_steps=50,
        presets=TI2V_PRESETS,
        flow_shifts=(5.0, 5.0),
        default_fps=24,
        default_frames=121,
        max_frames=121,
        expand_timesteps=True,
        vae_scale=16,
        published_params=4_999_787_712,
        family="Wan2.2 TI2V-5B",
        predictor="2.2-5b",
        tiny="ti2v-5b",
    ),
]
CATALOGUE: dict[str, ModelSpec] = {spec.name: spec for spec in CATALOGUE_ROWS}

# ---------------------------------------------------------------------------- tiny stand-ins
#
# The offline test models: each variant with a `tiny` kind has one, with its real layout
# (task, experts, boundary, VAE, image branch) at tiny shapes and few steps, random weights.
# They make noise, not art.

TINY_SHAPE = {
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 32,
    "text_dim": 32,
    "rope_max_seq_len": 32,
}
# GGUF's K-quants (Q4_K ...) need rows of whole 256-weight blocks: a "wide" stand-in's block linears take
# 256 inputs (2 heads of 128; an FFN of 256), everything else as the tiny one's. Made with `wide=True`
# (`write_tiny_model`), and known by its folder's config like the others.
TINY_WIDE_SHAPE = {**TINY_SHAPE, "attention_head_dim": 128, "ffn_dim": 256}
TINY_IMAGE_DIM = 32  # the tiny CLIP's width
TINY_SHORT_SIDE = 64  # pixels: the presets keep their aspect at this short side
TINY_KINDS: dict[str, str] = {spec.tiny: spec.name for spec in CATALOGUE_ROWS if spec.tiny}  # kind -> variant
TINY_NAMES = {"tiny" if kind == "t2v" else f"tiny-{kind}": kind for kind in TINY_KINDS}


def tiny_architecture(real: Architecture, wide: bool = False) -> Architecture:
    """Tiny shapes (`wide`: 256 wide) with the real model's inputs, outputs and image branch."""
    tiny = Architecture(**(TINY_WIDE_SHAPE if wide else TINY_SHAPE))
    return replace(
        tiny,
        in_channels=real.in_channels,
        out_channels=real.out_channels,
        image_dim=TINY_IMAGE_DIM if real.image_dim else None,
        added_kv_proj_dim=tiny.dim if real.added_kv_proj_dim else None,  # the width, as in the real model
    )


TINY_ARCH = tiny_architecture(WAN_14B)


def tiny_presets(real: ModelSpec) -> dict[str, dict[str, tuple[int, int]]]:
    """The real model's presets at its first resolution, shrunk to TINY_SHORT_SIDE, aspect and multiple kept."""
    resolution, step = real.default_resolution, real.side_multiple

    def shrink(width: int, height: int) -> tuple[int, int]:
        scale = TINY_SHORT_SIDE / min(width, height)
        return max(step, round(width * scale / step) * step), max(step, round(height * scale / step) * step)

    return {resolution: {aspect: shrink(*size) for aspect, size in real.presets[resolution].items()}}


def tiny_spec(source: str = "tiny", kind: str = "t2v", wide: bool = False) -> ModelSpec:
    """A tiny stand-in for a catalogue variant, in memory or (with `source`) from a `wanlora tiny-model` folder;
    `wide`: its 256-wide form (GGUF K-quant files fit it)."""
    real = CATALOGUE[TINY_KINDS[kind]]
    presets = tiny_presets(real)
    return replace(
        real,
        name=("tiny" if kind == "t2v" else f"tiny-{kind}") + ("-wide" if wide else ""),
        source=source,
        arch=tiny_architecture(real.arch, wide),
        resolutions=tuple(presets),
        default_steps=4,
        presets=presets,
        default_frames=9,
        published_params=None,
        fast_thresholds=(0.05, 0.1),  # measured on the tiny model: 14 and 4 of 16 block runs
    )


def catalogue_markdown() -> str:
    """The catalogue as Markdown tables, the variants' and their accelerators': what `wanlora models` prints, and
    what docs/models.md shows."""
    lines = [
        "| variant | repo | task | experts | steps | guidance | shift (480p, 720p) | frames, fps | sizes | predictor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in CATALOGUE_ROWS:
        experts = f"high-noise for t ≥ {spec.boundary_ratio * 1000:g}, then low-noise" if spec.boundary_ratio else "one"
        guidance = f"{spec.default_guidance:g}" + (f" / {spec.default_guidance_2:g}" if spec.default_guidance_2 else "")
        shifts = " / ".join(f"{shift:g}" for shift in dict.fromkeys(spec.flow_shifts))
        sizes = "; ".join(
            f"{res}: " + ", ".join(f"{w}×{h}" for w, h in spec.presets[res].values()) for res in spec.resolutions
        )
        lines.append(
            f"| `{spec.name}` | `{spec.source}` | {spec.task.title} | {experts} | {spec.default_steps} | {guidance} | "
            f"{shifts} | {spec.default_frames} at {spec.default_fps} | {sizes} | {spec.predictor or '-'} |"
        )
    return "\n".join(lines) + "\n\n" + accelerators_markdown()


def transformer_kind(width: int | None, in_channels: int | None, image_branch: bool) -> str:
    """How people name a Wan transformer of these shapes: its catalogue family and task where the shapes
    say which, else its task alone (a tiny or unknown model)."""
    rows = [
        s for s in CATALOGUE_ROWS if (s.arch.in_channels, s.arch.image_dim is not None) == (in_channels, image_branch)
    ]
    same_width = [s for s in rows if s.arch.dim == width]
    families = list(dict.fromkeys(s.family for s in same_width or rows))
    tasks = list(dict.fromkeys(s.task.title for s in same_width or rows)) or ["text-to-video"]
    return f"{families[0]} {tasks[0]}" if len(families) == 1 and len(tasks) == 1 else tasks[0]


def families_of_width(width: int, image_branch: bool) -> list[str]:
    """The families whose transformers are `width` wide (and have an image branch, if asked)."""
    rows = [s for s in CATALOGUE_ROWS if s.arch.dim == width and (s.arch.image_dim is not None or not image_branch)]
    return list(dict.fromkeys(s.family for s in rows))


def resolve_model(model: str) -> ModelSpec:
    """Map a `--model` value to a spec: a variant name, a tiny one, a local folder or a Hub repo id.

    A local folder's own configs decide its architecture and layout, and the catalogue's
    defaults apply when they match a known variant. A repo id outside the catalogue gets the
    defaults of the variant whose architecture it declares once identified; until then it is
    assumed to be like `t2v-14b`.
    """
    if not isinstance(model, str) or not model.strip():
        raise InvalidInput("model", model, "a model name, folder or Hub repo id (text)")
    if model in CATALOGUE:
        return CATALOGUE[model]
    if model in TINY_NAMES:
        return tiny_spec(kind=TINY_NAMES[model])
    path = Path(model).expanduser()
    if path.exists():
        return spec_for_folder(path)
    if model.count("/") == 1 and not model.startswith((".", "/")) and "\\" not in model:
        for spec in CATALOGUE.values():
            if spec.source == model:
                return spec
        base = CATALOGUE["t2v-14b"]
        return replace(base, name=model, source=model, identified=False)
    known = ", ".join([*CATALOGUE, *TINY_NAMES])
    raise ModelNotFound(
        f"model {shown_value(model)} is not a catalogue variant ({known}), an existing folder, "
        "or a Hub repo id (owner/name)"
    )


def spec_for_folder(path: Path) -> ModelSpec:
    """The spec of a diffusers-layout folder, matched to the catalogue by its configs."""
    index_file, config_file = path / "model_index.json", path / "transformer" / "config.json"
    if not index_file.is_file() or not config_file.is_file():
        raise ModelNotFound(
            f"{path} is not a diffusers-layout Wan model: it needs model_index.json and transformer/config.json "
            "(write one with `wanlora tiny-model DIR` or download a *-Diffusers repo)"
        )
    return spec_for_config(read_config(config_file), str(path), read_config(index_file))


def spec_for_config(config: dict[str, Any], source: str, index: dict[str, Any]) -> ModelSpec:
    """The spec whose transformer config and pipeline layout (model_index.json: experts, VAE) these are, each
    value checked: a count that is not one, or a layout field of another type, names the field."""
    arch = Architecture.from_config(config)
    problems = [
        f"transformer config's {name} {'absent' if value is None else shown_value(value)} (a whole number above 0)"
        for name, value in arch.wrong_fields()
    ]
    boundary, expand = index.get("boundary_ratio"), index.get("expand_timesteps")
    if boundary is not None and not (isinstance(boundary, float | int) and not isinstance(boundary, bool)):
        problems.append(f"model_index.json's boundary_ratio {shown_value(boundary)} (a number between 0 and 1)")
    elif boundary is not None and not 0 < boundary < 1:
        problems.append(f"model_index.json's boundary_ratio {boundary!r} (a number between 0 and 1)")
    if expand is not None and not isinstance(expand, bool):
        problems.append(f"model_index.json's expand_timesteps {shown_value(expand)} (true or false)")
    if problems:
        raise ModelNotFound(f"{source} is not a Wan model wanlora can read: {'; '.join(problems)}")
    layout = (boundary is not None, bool(expand))
    for kind, wide in ((kind, wide) for wide in (False, True) for kind in TINY_KINDS):
        candidate = tiny_spec(source, kind, wide)
        if arch == candidate.arch and layout == (candidate.boundary_ratio is not None, candidate.expand_timesteps):
            return candidate
    for spec in CATALOGUE_ROWS:
        if spec.arch == arch and layout == (spec.boundary_ratio is not None, spec.expand_timesteps):
            return replace(spec, source=source, boundary_ratio=index.get("boundary_ratio", spec.boundary_ratio))

    def likeness(spec: ModelSpec) -> tuple[bool, ...]:  # a model outside the catalogue takes its nearest row's defaults
        same_layout = layout == (spec.boundary_ratio is not None, spec.expand_timesteps)
        same_inputs = (spec.arch.in_channels, spec.arch.image_dim is None) == (arch.in_channels, arch.image_dim is None)
        return same_layout, same_inputs, spec.arch.dim == arch.dim

    base = max(CATALOGUE_ROWS, key=likeness)
    name = os.path.basename(source.rstrip("/")) or source
    return replace(base, name=name, source=source, arch=arch, boundary_ratio=index.get("boundary_ratio"))


def identify_model(model: str) -> ModelSpec:
    """`resolve_model`, then for a Hub repo: its copy in the weights folder (WANLORA_WEIGHTS) when
    there, else its transformer config and model index from the Hub, so that a missing repo, a
    gated one or no network is named as such before anything large moves, and a repo outside
    the catalogue is identified."""
    from .hub import local_copy, model_configs

    spec = resolve_model(model)
    if spec.source == "tiny" or Path(spec.source).exists():
        return spec
    prefetched = local_copy(spec.source)
    if prefetched is not None:
        found = spec_for_folder(prefetched)  # i2v-14b-720p's configs are i2v-14b-480p's: keep the name asked for
        same = (spec.arch, spec.experts, spec.expand_timesteps) == (found.arch, found.experts, found.expand_timesteps)
        return replace(spec, source=found.source) if same else found
    config, index = model_configs(spec.source)
    return spec if spec.identified else spec_for_config(config, spec.source, index)


def schedule_words(preset: Accelerator, distilled: Distilled) -> str:
    if preset.sampler == "euler":
        sigmas = ", ".join(f"{s:g}" for s in preset.sigmas)
        return f"Euler on sigmas {sigmas}, shift {preset.shift:g}"
    if distilled.timesteps:
        return f"Euler on timesteps {', '.join(map(str, distilled.timesteps))} (the first N), unshifted"
    if preset.sampler == "rcm":
        return f"rCM (stochastic), sigma_max {distilled.sigma_max:g}"
    shift = preset.shift if distilled.shift is None else distilled.shift
    if preset.sampler == "wan2gp-euler":
        switches = " and ".join(f"t <= {t:g}" for t in distilled.phases.thresholds) if distilled.phases else ""
        return f"Wan2GP's Euler, shift {shift:g}; phases from {switches} (the low-noise expert at the second)"
    return f"UniPC, shift {shift:g}"


def accelerators_markdown() -> str:
    """Each variant's accelerators as a Markdown table: part of what `wanlora models` prints."""
    lines = [
        "| accelerator | variant | LoRA(s) | steps | guidance | sampling | strengths | schedule held to |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in CATALOGUE_ROWS:
        for name, distilled in spec.accelerators.items():
            preset = ACCELERATORS[name]
            files = f"`{distilled.lora}`" if distilled.lora else f"high: `{distilled.high}`<br>low: `{distilled.low}`"
            two = spec.boundary_ratio is not None
            strengths = "{:g} / {:g}".format(*distilled.strengths) if two else f"{distilled.strengths[0]:g}"
            guidance = f"{preset.guidance:g}"
            if distilled.phases is not None:  # the high-noise file off in the guided first phase
                strengths = "0 then {:g} / {:g}".format(*distilled.strengths)
                guidance += " in phase 1, then 1"
            reference = "; ".join(words for words in (preset.reference, distilled.note) if words)
            steps = "/".join(map(str, preset.step_counts)) or f"{preset.steps}"
            lines.append(
                f"| `{name}` | `{spec.name}` | {files} | {steps} | {guidance} | "
                f"{schedule_words(preset, distilled)} | {strengths} | {reference} |"
            )
    return "\n".join(lines) + "\n"
