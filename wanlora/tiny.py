"""Tiny offline Wan models in the real diffusers layout: `--model tiny`, smoke runs, tests.

Everything is built from code with a fixed seed, tokenizer included, so the same tiny model
comes out on every machine without a network. The weights are random: it makes noise, not art.
"""

from __future__ import annotations

import string
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from .models import CATALOGUE, TINY_ARCH, TINY_IMAGE_DIM, TINY_KINDS, Architecture, tiny_spec

TINY_TEXT_CONFIG = {
    "d_model": 32,
    "d_ff": 32,
    "d_kv": 16,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
}


def tiny_tokenizer() -> T5TokenizerFast:
    """A character-level T5 tokenizer: pad=0, eos=1, unk=2, like UMT5's special ids."""
    pieces = ["<pad>", "</s>", "<unk>", "▁", *string.ascii_lowercase, *string.digits, *".,!?'-"]
    vocab = [(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(pieces)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


def flow_scheduler(shift: float = 3.0) -> UniPCMultistepScheduler:
    """Wan's scheduler: UniPC on flow-matching sigmas, as in the published scheduler_config.json."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000
    )


def tiny_transformer(arch: Architecture = TINY_ARCH, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**arch.transformer_config()).eval()


def tiny_vae(seed: int, wan22: bool = False) -> AutoencoderKLWan:
    """Wan2.1's VAE (16 latent channels, 8x8), or Wan2.2's (48 channels, 16x16: 2x2 patches, residual blocks)."""
    torch.manual_seed(seed)
    shape = {"dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "temperal_downsample": [False, True, True]}
    if not wan22:
        return AutoencoderKLWan(base_dim=3, z_dim=16, **shape).eval()
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
        **shape,
    ).eval()


def tiny_clip(seed: int):
    """A tiny CLIP vision encoder and its processor, for Wan2.1's image-to-video models."""
    # imported here: without torchvision, transformers warns about CLIP's image processor on import
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TINY_IMAGE_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    return encoder, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def tiny_pipeline(seed: int = 0, kind: str = "t2v", wide: bool = False) -> WanPipeline:
    """A complete tiny Wan pipeline in fp32, the same for the same seed, for a kind of `TINY_KINDS` (`wide`: its
    transformer 256 wide, for GGUF's K-quants).

    It has the real variant's layout: two experts with their boundary for A14B, the
    Wan2.2 VAE and per-token timesteps for TI2V-5B, a tiny CLIP for Wan2.1 image-to-video.
    Its text is padded to 512 tokens like the real model's, because diffusers' Wan
    attention takes everything before the last 512 context tokens as image tokens.
    """
    spec = tiny_spec(kind=kind, wide=wide)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_CONFIG)).eval()
    parts = {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "scheduler": flow_scheduler(),
        "vae": tiny_vae(seed, wan22=spec.vae_scale == 16),
        "transformer": tiny_transformer(spec.arch, seed),
    }
    if spec.boundary_ratio is not None:
        parts.update(transformer_2=tiny_transformer(spec.arch, seed + 1), boundary_ratio=spec.boundary_ratio)
    if spec.expand_timesteps:
        parts["expand_timesteps"] = True
    if spec.task.takes_images and spec.arch.image_dim:  # Wan2.1 I2V's CLIP image branch
        parts["image_encoder"], parts["image_processor"] = tiny_clip(seed)
    return getattr(diffusers, spec.task.pipeline_class)(**parts)


def write_tiny_model(path: str | Path, seed: int = 0, kind: str = "t2v", wide: bool = False) -> Path:
    """Save a tiny model (`wide`: 256 wide, see `tiny_pipeline`) in the exact diffusers folder layout and return
    the folder.

    Beside it, `accelerators/` holds a random stand-in for each accelerator preset's LoRA
    that the real variant has (a high/low pair for A14B), so that `--accelerator` runs
    offline on the tiny model too, and `loras/` two small random LoRAs to try (see
    `write_tiny_loras`).
    """
    from safetensors.torch import save_file

    from .accelerators import TINY_FOLDER

    path = Path(path)
    pipeline = tiny_pipeline(seed, kind, wide)
    pipeline.save_pretrained(path, safe_serialization=True)
    real = CATALOGUE[TINY_KINDS[kind]]
    for number, preset in enumerate(sorted(real.accelerators)):
        if pipeline.transformer_2 is None:
            files = {path / TINY_FOLDER / f"{preset}.safetensors": seed + number}
        else:  # a Wan2.2 pair, laid out as lightx2v's Lightning LoRAs are
            folder = path / TINY_FOLDER / preset
            files = {
                folder / "high_noise_model.safetensors": seed + number,
                folder / "low_noise_model.safetensors": seed,
            }
        for target, file_seed in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(stand_in_lora(pipeline.transformer, file_seed), str(target))
    write_tiny_loras(path / TINY_LORAS, pipeline.transformer, seed)
    return path


TINY_LORAS = "loras"  # the folder of a tiny model's LoRAs to try

# The block linears' original-Wan names (docs/lora-formats.md, "Module names"): what most published LoRAs use.
ORIGINAL_BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def write_tiny_loras(folder: Path, transformer: WanTransformer3DModel, seed: int) -> None:
    """Two small random LoRAs for a tiny model, in the layouts most published Wan LoRAs come in, so that
    LoRAs can be tried offline: `style.safetensors` on the attention linears in original-Wan names
    (`diffusion_model.blocks.0.self_attn.q.lora_down.weight`, as ComfyUI and kijai write them), and
    `motion.safetensors` on the FFN in kohya/musubi-tuner's flattened names (`lora_unet_blocks_0_ffn_0...`)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    attention = [name for name in ORIGINAL_BLOCK_LINEARS if name.startswith("attn")]
    style = random_lora(transformer, attention, lambda module: f"diffusion_model.{module}", seed)
    motion = random_lora(
        transformer, ["ffn.net.0.proj", "ffn.net.2"], lambda module: "lora_unet_" + module.replace(".", "_"), seed + 1
    )
    save_file(style, str(folder / "style.safetensors"))
    save_file(motion, str(folder / "motion.safetensors"), metadata={"ss_network_dim": "4", "ss_network_alpha": "4"})


def random_lora(transformer: WanTransformer3DModel, linears: list[str], key, seed: int) -> dict[str, torch.Tensor]:
    """Rank-4 lora_down/lora_up factors (alpha 4: strength 1 adds up @ down) on `linears` of every block,
    keyed by `key` of the module's original-Wan name."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in transformer.named_parameters():
        parts = name.removesuffix(".weight").split(".", 2)  # blocks, N, module
        if parts[0] != "blocks" or parts[2] not in linears or not name.endswith(".weight"):
            continue
        base = key(f"blocks.{parts[1]}.{ORIGINAL_BLOCK_LINEARS[parts[2]]}")
        tensors[f"{base}.lora_down.weight"] = torch.randn(4, param.shape[1], generator=generator) * 0.25
        tensors[f"{base}.lora_up.weight"] = torch.randn(param.shape[0], 4, generator=generator) * 0.1
        tensors[f"{base}.alpha"] = torch.tensor(4.0)
    return tensors


def stand_in_lora(transformer: WanTransformer3DModel, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA shaped like the distillation ones: rank-4 factors on the attention linears, full deltas
    (and bias deltas) on the FFN's, in diffusers' names. Small values: it changes the frames, not wildly."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in transformer.named_parameters():
        module = name.removesuffix(".weight")
        if not module.startswith("blocks.") or param.dim() != 2:
            continue
        key = f"transformer.{module}"
        if ".attn" in module:
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, param.shape[1], generator=generator) * 0.25
            tensors[f"{key}.lora_B.weight"] = torch.randn(param.shape[0], 4, generator=generator) * 0.1
        else:
            tensors[f"{key}.diff"] = torch.randn(param.shape, generator=generator) * 0.01
            tensors[f"{key}.diff_b"] = torch.randn(param.shape[0], generator=generator) * 0.01
    return tensors
