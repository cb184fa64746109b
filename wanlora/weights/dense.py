"""Full-precision weights (bf16, fp16, fp32), cast as diffusers' loader casts them."""

from __future__ import annotations

import torch


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast like diffusers' loader does: modules in `_keep_in_fp32_modules` stay fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        if not any(part in keep for part in name.split(".")):
            param.data = param.data.to(dtype)
