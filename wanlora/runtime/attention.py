"""Choosing and installing the attention kernel, through diffusers' attention dispatcher.

Light (no torch at import): the CLI reads its choices before anything heavy loads.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from diffusers import WanTransformer3DModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    dispatcher_name: str  # diffusers' AttentionBackendName value
    needs_cuda: bool
    package: str | None = None  # the import that must exist
    context_parallel: bool = False  # diffusers can split it across processes (Ulysses)
    ring: bool = False  # it returns log-sum-exp, which ring attention needs
    half_only: bool = False  # its kernels take bf16 and fp16 only (diffusers' constraint; unchecked unless asked)


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("native", needs_cuda=False, context_parallel=True),
    "sdpa-cudnn": Backend("_native_cudnn", needs_cuda=True, context_parallel=True, ring=True, half_only=True),
    "sdpa-flash": Backend("_native_flash", needs_cuda=True, context_parallel=True, ring=True, half_only=True),
    "sdpa-efficient": Backend("_native_efficient", needs_cuda=True),
    "xformers": Backend("xformers", needs_cuda=True, package="xformers"),
    "flash": Backend("flash", needs_cuda=True, package="flash_attn", context_parallel=True, ring=True, half_only=True),
    "flash3": Backend("_flash_3", needs_cuda=True, package="flash_attn_interface", half_only=True),
    "sage": Backend("sage", needs_cuda=True, package="sageattention", context_parallel=True, ring=True, half_only=True),
}
CHOICES = ("auto", *BACKENDS)


def unavailable_reason(
    name: str, device: torch.device, parallel: str | None = None, dtype: torch.dtype | None = None
) -> str | None:
    """Why `name` cannot run on `device` (split `parallel`: "ulysses" or "ring") for a model computing in `dtype`,
    or None when it can."""
    backend = BACKENDS[name]
    if backend.needs_cuda and device.type != "cuda":
        return f"it needs a CUDA GPU and the model is on {device.type}"
    if backend.half_only and dtype is not None and dtype.itemsize != 2:  # bf16 and fp16 (never int16 here)
        return f"its kernels take bf16 or fp16 and the model computes in {str(dtype).removeprefix('torch.')}"
    if backend.package and importlib.util.find_spec(backend.package) is None:
        return f"the `{backend.package}` package is not installed"
    if parallel and not backend.context_parallel:
        return "diffusers cannot split it across processes"
    if parallel == "ring" and not backend.ring:
        return "ring attention needs a kernel that returns log-sum-exp"
    return None


def choose_backend(
    requested: str, device: torch.device, parallel: str | None = None, dtype: torch.dtype | None = None
) -> str:
    """Resolve `requested` ("auto" or a name in BACKENDS) to a backend that can run here, in `dtype`.

    auto: xformers' memory-efficient kernel on CUDA when installed (the Cog image has it),
    else torch's SDPA, whose own dispatcher then picks flash, cuDNN or mem-efficient.
    Split across processes (`parallel`), xformers cannot take part: SDPA for Ulysses, and
    for ring a kernel that returns log-sum-exp (flash-attn when installed, else cuDNN's).
    """
    if requested not in CHOICES:
        raise InvalidInput("attention", requested, f"one of {', '.join(CHOICES)}")
    if requested != "auto":
        reason = unavailable_reason(requested, device, parallel, dtype)
        if reason:
            raise InvalidInput("attention", requested, f"not available here: {reason}; use attention='auto'")
        logger.info("attention: %s (requested)", requested)
        return requested
    if parallel == "ring":
        name = "flash" if unavailable_reason("flash", device, parallel) is None else "sdpa-cudnn"
        logger.info("attention: %s (auto: ring attention)", name)
        return name
    if parallel:
        logger.info("attention: sdpa (auto: context parallel)")
        return "sdpa"
    if device.type == "cuda" and unavailable_reason("xformers", device) is None:
        logger.info("attention: xformers (auto: CUDA with xformers installed)")
        return "xformers"
    why = "CUDA without xformers" if device.type == "cuda" else f"{device.type} device"
    logger.info("attention: sdpa (auto: %s)", why)
    return "sdpa"


def attention_dtype(transformer: WanTransformer3DModel) -> torch.dtype:
    """What the transformer's attention computes in: its hidden states', which its patch embedding makes."""
    return transformer.patch_embedding.weight.dtype


def install_backend(transformer: WanTransformer3DModel, name: str) -> None:
    """Route every attention call of `transformer` through the chosen kernel."""
    transformer.set_attention_backend(BACKENDS[name].dispatcher_name)
