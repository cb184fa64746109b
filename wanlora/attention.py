"""Choosing and installing the attention kernel, through diffusers' attention dispatcher."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import InvalidInput

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    dispatcher_name: str  # diffusers' AttentionBackendName value
    needs_cuda: bool
    package: str | None = None  # the import that must exist


BACKENDS: dict[str, Backend] = {
    "sdpa": Backend("native", needs_cuda=False),
    "sdpa-cudnn": Backend("_native_cudnn", needs_cuda=True),
    "sdpa-flash": Backend("_native_flash", needs_cuda=True),
    "sdpa-efficient": Backend("_native_efficient", needs_cuda=True),
    "xformers": Backend("xformers", needs_cuda=True, package="xformers"),
    "flash": Backend("flash", needs_cuda=True, package="flash_attn"),
    "flash3": Backend("_flash_3", needs_cuda=True, package="flash_attn_interface"),
    "sage": Backend("sage", needs_cuda=True, package="sageattention"),
}
CHOICES = ("auto", *BACKENDS)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why `name` cannot run on `device`, or None when it can."""
    backend = BACKENDS[name]
    if backend.needs_cuda and device.type != "cuda":
        return f"it needs a CUDA GPU and the model is on {device.type}"
    if backend.package and importlib.util.find_spec(backend.package) is None:
        return f"the `{backend.package}` package is not installed"
    return None


def choose_backend(requested: str, device: torch.device) -> str:
    """Resolve `requested` ("auto" or a name in BACKENDS) to a backend that can run here.

    auto: xformers' memory-efficient kernel on CUDA when installed (the Cog image has it),
    else torch's SDPA, whose own dispatcher then picks flash, cuDNN or mem-efficient.
    """
    if requested not in CHOICES:
        raise InvalidInput("attention", requested, f"one of {', '.join(CHOICES)}")
    if requested != "auto":
        reason = unavailable_reason(requested, device)
        if reason:
            raise InvalidInput("attention", requested, f"not available here: {reason}; use attention='auto'")
        logger.info("attention: %s (requested)", requested)
        return requested
    if device.type == "cuda" and unavailable_reason("xformers", device) is None:
        logger.info("attention: xformers (auto: CUDA with xformers installed)")
        return "xformers"
    why = "CUDA without xformers" if device.type == "cuda" else f"{device.type} device"
    logger.info("attention: sdpa (auto: %s)", why)
    return "sdpa"


def install_backend(transformer: torch.nn.Module, name: str) -> None:
    """Route every attention call of `transformer` through the chosen kernel."""
    transformer.set_attention_backend(BACKENDS[name].dispatcher_name)
