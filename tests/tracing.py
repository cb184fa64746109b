"""Peak memory of real-shape computations, traced on the `meta` device: for tests and the GPU run's accounting.

`LiveBytes` is a dispatch mode that counts the bytes of every tensor an operation creates until
it is freed, and keeps the peak. Tensors that existed before (weights, inputs) are not counted,
and views share their base's bytes. Attention runs through a flash-like stand-in: the output
and the log-sum-exp, never the tokens x tokens scores, as every GPU kernel wanlora uses.

`trace_step` traces one step of a generation (wanlora.runtime.memory's steps) at a variant's real
shapes, as diffusers' Wan pipelines run it.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wanlora.models import CLIP_VIT_H, UMT5_XXL, WAN21_VAE, WAN22_VAE, ModelSpec, latent_shape

TEXT_TOKENS = 512


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors created inside it while they live; `peak` is the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage()._cdata for t in tensors}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key = storage._cdata
        if key in inputs or key in self._sizes:  # a view, or an in-place result
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)


def flash_like_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """What a fused attention kernel allocates: its output and the fp32 log-sum-exp per query row."""
    out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
    del lse
    return out


@contextlib.contextmanager
def flash_attention():
    """torch's SDPA (diffusers' default backend, and transformers' for UMT5 and CLIP) as a fused kernel."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = flash_like_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def traced_peak(run) -> int:
    """The peak bytes of live tensors `run()` creates, with flash-like attention and no autograd."""
    with torch.no_grad(), flash_attention(), LiveBytes() as live:
        run()
    return live.peak


# ---------------------------------------------------------------------------- real-shape components on meta


def meta_transformer(spec: ModelSpec, weights: str = "bf16", num_layers: int | None = None):
    from diffusers import WanTransformer3DModel

    from wanlora.weights import formats
    from wanlora.weights.dense import cast_keeping_fp32

    arch = replace(spec.arch, num_layers=num_layers or spec.arch.num_layers)
    with torch.device("meta"):
        model = WanTransformer3DModel(**arch.transformer_config()).eval()
    cast_keeping_fp32(model, torch.bfloat16)
    if weights != formats.DENSE:  # with the matmul whose activations are the largest: the plan must cover it
        formats.for_plan(weights).build_for_plan(model, weights)
    return model


@functools.cache
def meta_text_encoder():
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        return UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16).eval()


@functools.cache
def meta_image_encoder():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        return CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)).eval()


@functools.cache
def meta_vae(vae_scale: int):
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan(**(WAN22_VAE if vae_scale == 16 else WAN21_VAE)).eval()


def bytes_of(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# ---------------------------------------------------------------------------- one step, as the pipelines run it


def empty(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def transformer_inputs(spec: ModelSpec, width: int, height: int, frames: int, batch: int = 1) -> dict:
    """What diffusers' Wan pipelines pass the transformer for one pass at this size."""
    arch = spec.arch
    latents = latent_shape(frames, height, width, spec.vae_scale)
    inputs = {
        "hidden_states": empty(batch, arch.in_channels, *latents, dtype=torch.bfloat16),
        "timestep": empty(batch),
        "encoder_hidden_states": empty(batch, TEXT_TOKENS, arch.text_dim, dtype=torch.bfloat16),
    }
    if spec.expand_timesteps:  # a timestep per token (TI2V-5B)
        inputs["timestep"] = empty(batch, spec.token_count(width, height, frames))
    if arch.image_dim:  # CLIP's penultimate layer; first-last-frame models take two images
        images = 2 if arch.takes_last_image else 1
        inputs["encoder_hidden_states_image"] = empty(batch * images, 257, arch.image_dim, dtype=torch.bfloat16)
    return inputs


def trace_step(spec: ModelSpec, step: str, size: tuple[int, int, int], weights: str, tiled: bool) -> int:
    """The traced peak of live activations of `step` (wanlora.runtime.memory's) for `spec` at `size` (width, height,
    frames). The transformer is traced with two blocks: its peak is one block's, and nothing outlives a
    block but the hidden states (tests/test_memory_plan.py checks this against the full depth)."""
    width, height, frames = size
    if step == "text":
        return _trace("text")
    if step == "image":
        return _trace("image", images=2 if spec.arch.takes_last_image else 1)
    if step.startswith("denoise"):
        return _trace_denoise(spec.arch, spec.expand_timesteps, spec.vae_scale, size, weights)
    frames = 1 if step == "vae-encode" and spec.task.name == "ti2v" else frames
    return _trace(step, vae_scale=spec.vae_scale, size=(width, height, frames), tiled=tiled)


@functools.cache
def _trace(step: str, images: int = 1, vae_scale: int = 8, size: tuple[int, int, int] = (0, 0, 0), tiled=False) -> int:
    width, height, frames = size
    if step == "text":
        encoder = meta_text_encoder()
        return traced_peak(lambda: encoder(empty(1, TEXT_TOKENS, dtype=torch.long)).last_hidden_state)
    if step == "image":
        clip = meta_image_encoder()
        return traced_peak(lambda: clip(empty(images, 3, 224, 224), output_hidden_states=True).hidden_states[-2])
    vae = meta_vae(vae_scale)
    (vae.enable_tiling if tiled else vae.disable_tiling)()
    if step == "vae-encode":

        def encode() -> None:  # the image, and zeros for the frames after it (WanImageToVideoPipeline)
            image = empty(1, 3, 1, height, width)
            video = image if frames == 1 else torch.cat([image, image.new_zeros(1, 3, frames - 1, height, width)], 2)
            vae.encode(video).latent_dist.mode()

        return traced_peak(encode)
    latents = empty(1, vae.config.z_dim, *latent_shape(frames, height, width, vae_scale))
    return traced_peak(lambda: vae.decode(latents, return_dict=False))


@functools.cache
def _trace_denoise(arch, expand_timesteps: bool, vae_scale: int, size: tuple[int, int, int], weights: str) -> int:
    from wanlora.models import CATALOGUE

    spec = replace(CATALOGUE["t2v-14b"], arch=arch, expand_timesteps=expand_timesteps, vae_scale=vae_scale)
    model = meta_transformer(spec, weights, num_layers=2)
    inputs = transformer_inputs(spec, *size)
    return traced_peak(lambda: model(**inputs, return_dict=False))
