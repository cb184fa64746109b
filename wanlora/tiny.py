"""Tiny offline Wan models in the real diffusers layout: `--model tiny`, smoke runs, tests.

Everything is built from code with a fixed seed, tokenizer included, so the same tiny model
comes out on every machine without a network. The weights are random: it makes noise, not art.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from .models import TINY_ARCH, TINY_I2V_ARCH, Architecture

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


def tiny_pipeline(seed: int = 0, i2v: bool = False) -> WanPipeline:
    """A complete tiny Wan pipeline in fp32, the same for the same seed.

    The image-to-video one has a tiny CLIP vision encoder whose width is the transformer's
    `image_dim`. Its text is padded to 512 tokens like the real model's, because diffusers'
    Wan attention takes everything before the last 512 context tokens as image tokens.
    """
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_TEXT_CONFIG)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    common = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "scheduler": flow_scheduler()}
    if not i2v:
        return WanPipeline(**common, transformer=tiny_transformer(seed=seed))
    # imported here: without torchvision, transformers warns about CLIP's image processor on import
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TINY_I2V_ARCH.image_dim,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).eval()
    return WanImageToVideoPipeline(
        **common,
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        transformer=tiny_transformer(TINY_I2V_ARCH, seed=seed),
    )


def write_tiny_model(path: str | Path, seed: int = 0, i2v: bool = False) -> Path:
    """Save a tiny model in the exact diffusers folder layout and return the folder.

    Beside it, `accelerators/` holds a random stand-in for each accelerator preset's LoRA
    (wanlora.accelerators), so that `--accelerator` runs offline on the tiny model too.
    """
    from safetensors.torch import save_file

    from .accelerators import ACCELERATORS, TINY_FOLDER
    from .testing import lora_tensors

    path = Path(path)
    pipeline = tiny_pipeline(seed, i2v=i2v)
    pipeline.save_pretrained(path, safe_serialization=True)
    shapes = {name: tuple(p.shape) for name, p in pipeline.transformer.named_parameters()}
    (path / TINY_FOLDER).mkdir()
    for number, name in enumerate(ACCELERATORS):
        tensors, _ = lora_tensors(shapes, "full-deltas", seed=seed + number)
        save_file(tensors, str(path / TINY_FOLDER / f"{name}.safetensors"))
    return path
