"""Fitting Wan into smaller GPUs: model and group offloading, and VAE tiling above 480p.

GPU memory per variant, bf16, 81 frames. Estimates: weight sizes are exact (parameter
counts x 2 bytes), activations and workspace are rough; `benchmarks/gpu.sh` measures
real peaks on a GPU.

| variant | offload="none" | offload="model" | offload="group" |
|---|---|---|---|
| t2v-1.3b 480p | ~12 GB (2.8 transformer + 11.4 UMT5 + VAE) | ~8 GB | ~5 GB |
| t2v-14b 480p | ~48 GB | ~37 GB (transformer + activations) | ~12 GB |
| t2v-14b 720p | ~62 GB | ~50 GB | ~24 GB |
| i2v-14b 720p | ~66 GB | ~53 GB | ~26 GB |

"model" moves each component (text encoder, transformer, VAE) to the GPU only while it
runs, so the 11 GB text encoder leaves the GPU right after encoding. "group" streams the
transformer's blocks from pinned host memory one at a time, overlapping copies with
compute. LoRA merges work with both: weights are rewritten wherever they live.
"""

from __future__ import annotations

import logging

import torch

from .errors import InvalidInput
from .settings import OFFLOAD_MODES

logger = logging.getLogger(__name__)

VAE_TILING_MIN_PIXELS = 832 * 480 + 1  # tile the VAE decode above 480p-sized frames


def check_offload(mode: str, device: torch.device) -> None:
    if mode not in OFFLOAD_MODES:
        raise InvalidInput("offload", mode, f"one of {', '.join(OFFLOAD_MODES)}")
    if mode != "none" and device.type != "cuda":
        raise InvalidInput("offload", mode, f"offloading moves weights to a GPU on demand; the model is on {device}")


def place(pipe, device: torch.device, mode: str) -> None:
    """Put the pipeline's components on `device`, or arrange for them to come on demand."""
    check_offload(mode, device)
    if mode == "none":
        pipe.to(device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(pipe.transformer, onload_device=device, offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)  # fmt: skip
        apply_group_offloading(pipe.text_encoder, onload_device=device, offload_type="leaf_level", use_stream=True)
        pipe.vae.to(device)
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.image_encoder.to(device)
    logger.info("placement: offload=%s on %s", mode, device)


def set_vae_tiling(vae, width: int, height: int) -> None:
    """Decode in tiles when the frames are larger than 480p, to bound the VAE's peak memory."""
    if width * height >= VAE_TILING_MIN_PIXELS:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
