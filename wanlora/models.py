"""The catalogue of Wan base models: where they live, their shapes and their defaults.

Pure data and lookups; nothing here touches torch state. `resolve_model` turns whatever a
person typed for `--model` into a `ModelSpec` without downloading anything;
`identify_model` then settles a Hub repo by its transformer config (a few hundred bytes),
or finds it pre-fetched in the weights folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInput, ModelNotFound
from .settings import ASPECT_RATIOS

# Wan's published sizes (its SIZE_CONFIGS); every side is a multiple of 16.
SIZE_PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (624, 624)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)},
}
FLOW_SHIFT = {"480p": 3.0, "720p": 5.0}


@dataclass(frozen=True)
class Architecture:
    """The `WanTransformer3DModel` config fields that tell Wan variants apart."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    in_channels: int = 16
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
            "out_channels": 16,
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
        return cls(**{k: config[k] for k in names if k in config})


@dataclass(frozen=True)
class ModelSpec:
    """One base model: its source, shapes, task and generation defaults."""

    name: str
    source: str  # a Hub repo id, a local folder, or "tiny"
    arch: Architecture
    task: str  # "t2v" or "i2v"
    resolutions: tuple[str, ...]
    default_steps: int
    presets: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: SIZE_PRESETS)
    default_guidance: float = 5.0
    default_fps: int = 16
    default_frames: int = 81
    max_frames: int = 81
    published_params: int | None = None
    # First Block Cache thresholds for fast_mode (balanced, fast). Starting points taken from
    # the TeaCache settings used on Replicate; not yet calibrated on real weights.
    fast_thresholds: tuple[float, float] = (0.15, 0.2)
    # False for a Hub repo outside the catalogue until its transformer config has been read.
    identified: bool = True

    @property
    def default_resolution(self) -> str:
        return self.resolutions[0]

    def size(self, resolution: str | None = None, aspect_ratio: str = "16:9") -> tuple[int, int]:
        """(width, height) of a preset, refusing resolutions this model was not trained for."""
        resolution = resolution or self.default_resolution
        if resolution not in self.resolutions:
            allowed = " or ".join(self.resolutions)
            raise InvalidInput("resolution", resolution, f"{self.name} supports {allowed} only")
        if aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInput("aspect_ratio", aspect_ratio, f"one of {', '.join(ASPECT_RATIOS)}")
        return self.presets[resolution][aspect_ratio]

    def default_shift(self, width: int, height: int) -> float:
        """Wan's flow shift: 3.0 up to 480p-sized frames, 5.0 above."""
        return FLOW_SHIFT["480p"] if width * height <= 832 * 480 else FLOW_SHIFT["720p"]


WAN_1_3B = Architecture(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)
WAN_14B = Architecture(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824)
WAN_14B_I2V = Architecture(
    num_layers=40,
    num_attention_heads=40,
    attention_head_dim=128,
    ffn_dim=13824,
    in_channels=36,
    image_dim=1280,
    added_kv_proj_dim=5120,
)

# Parameter counts are the published checkpoints' safetensors index total_size / 4 (fp32).
CATALOGUE: dict[str, ModelSpec] = {
    "t2v-1.3b": ModelSpec(
        name="t2v-1.3b",
        source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        arch=WAN_1_3B,
        task="t2v",
        resolutions=("480p",),
        default_steps=50,
        published_params=1_418_996_800,
        fast_thresholds=(0.07, 0.08),
    ),
    "t2v-14b": ModelSpec(
        name="t2v-14b",
        source="Wan-AI/Wan2.1-T2V-14B-Diffusers",
        arch=WAN_14B,
        task="t2v",
        resolutions=("480p", "720p"),
        default_steps=50,
        published_params=14_288_491_584,
    ),
    "i2v-14b-480p": ModelSpec(
        name="i2v-14b-480p",
        source="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        arch=WAN_14B_I2V,
        task="i2v",
        resolutions=("480p",),
        default_steps=40,
        published_params=16_394_878_784,
        fast_thresholds=(0.19, 0.26),
    ),
    "i2v-14b-720p": ModelSpec(
        name="i2v-14b-720p",
        source="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        arch=WAN_14B_I2V,
        task="i2v",
        resolutions=("720p", "480p"),
        default_steps=40,
        published_params=16_394_878_784,
        fast_thresholds=(0.2, 0.3),
    ),
}

# The offline test model: real layout, random weights, tiny shapes. It makes noise, not art.
TINY_ARCH = Architecture(
    num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=32, rope_max_seq_len=32
)
TINY_I2V_ARCH = Architecture(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=12,
    ffn_dim=32,
    in_channels=36,
    text_dim=32,
    image_dim=32,  # the tiny CLIP's width
    added_kv_proj_dim=24,  # the transformer's width, as in the real model (5120)
    rope_max_seq_len=32,
)
TINY_PRESETS = {"480p": {"16:9": (112, 64), "9:16": (64, 112), "1:1": (64, 64)}}


def tiny_spec(source: str = "tiny", i2v: bool = False) -> ModelSpec:
    """`tiny` or `tiny-i2v`, in memory or (with `source`) from a folder `wanlora tiny-model` wrote."""
    return ModelSpec(
        name="tiny-i2v" if i2v else "tiny",
        source=source,
        arch=TINY_I2V_ARCH if i2v else TINY_ARCH,
        task="i2v" if i2v else "t2v",
        resolutions=("480p",),
        default_steps=4,
        presets=TINY_PRESETS,
        default_frames=9,
        fast_thresholds=(0.05, 0.1),  # measured on the tiny model: 14 and 4 of 16 block runs
    )


def resolve_model(model: str) -> ModelSpec:
    """Map a `--model` value to a spec: a variant name, `tiny`, a local folder or a Hub repo id.

    A local folder's own transformer config decides its architecture, and the catalogue's
    defaults apply when it matches a known variant. A repo id outside the catalogue gets the
    defaults of the variant whose architecture it declares once loaded; until then it is
    assumed to be like `t2v-14b`, the most permissive variant.
    """
    if model in CATALOGUE:
        return CATALOGUE[model]
    if model in ("tiny", "tiny-i2v"):
        return tiny_spec(i2v=model == "tiny-i2v")
    path = Path(model).expanduser()
    if path.exists():
        return spec_for_folder(path)
    if model.count("/") == 1 and not model.startswith((".", "/")) and "\\" not in model:
        for spec in CATALOGUE.values():
            if spec.source == model:
                return spec
        base = CATALOGUE["t2v-14b"]
        return ModelSpec(**{**base.__dict__, "name": model, "source": model, "identified": False})
    known = ", ".join([*CATALOGUE, "tiny", "tiny-i2v"])
    raise ModelNotFound(
        f"model {model!r} is not a catalogue variant ({known}), an existing folder, or a Hub repo id (owner/name)"
    )


def spec_for_folder(path: Path) -> ModelSpec:
    """The spec of a diffusers-layout folder, matched to the catalogue by its transformer config."""
    config_file = path / "transformer" / "config.json"
    if not (path / "model_index.json").is_file() or not config_file.is_file():
        raise ModelNotFound(
            f"{path} is not a diffusers-layout Wan model: it needs model_index.json and transformer/config.json "
            "(write one with `wanlora tiny-model DIR` or download a *-Diffusers repo)"
        )
    return spec_for_config(json.loads(config_file.read_text()), str(path))


def spec_for_config(config: dict[str, Any], source: str) -> ModelSpec:
    arch = Architecture.from_config(config)
    for candidate in (TINY_ARCH, TINY_I2V_ARCH):
        if arch == candidate:
            return tiny_spec(source, i2v=candidate is TINY_I2V_ARCH)
    for spec in CATALOGUE.values():
        if spec.arch == arch:
            return ModelSpec(**{**spec.__dict__, "source": source})
    i2v = arch.in_channels != 16
    base = CATALOGUE["i2v-14b-720p" if i2v else "t2v-14b"]  # e.g. Wan2.1-FLF2V-14B-720P-Diffusers
    return ModelSpec(
        **{**base.__dict__, "name": os.path.basename(source.rstrip("/")) or source, "source": source, "arch": arch}
    )


def identify_model(model: str) -> ModelSpec:
    """`resolve_model`, then for a Hub repo: its copy in the weights folder (WANLORA_WEIGHTS) when
    there, else its transformer config from the Hub, so that a missing repo, a gated one or no
    network is named as such before anything large moves, and a repo outside the catalogue is
    identified."""
    from .hub import local_copy, transformer_config

    spec = resolve_model(model)
    if spec.source == "tiny" or Path(spec.source).exists():
        return spec
    prefetched = local_copy(spec.source)
    if prefetched is not None:
        return spec_for_folder(prefetched)
    config = transformer_config(spec.source)
    return spec if spec.identified else spec_for_config(config, spec.source)
