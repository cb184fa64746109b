"""Which device a pipeline runs on, checked against this machine before anything loads, and in which dtype."""

from __future__ import annotations

import torch

from ..errors import InvalidInput
from ..messages import plural
from ..weights import formats


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` checked against this machine; None: CUDA when there is a GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInput("device", device, "cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise InvalidInput("device", device, "cpu: this machine has no CUDA GPU")
        if resolved.index is not None and resolved.index >= count:
            raise InvalidInput("device", device, f"cuda:0 to cuda:{count - 1}: this machine has {plural(count, 'GPU')}")
    elif resolved.type != "cpu":
        raise InvalidInput("device", device, "cpu, cuda or cuda:N")
    return resolved


DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what Wan's weights compute in; smaller is `quantize`'s


def check_dtype(dtype: object) -> torch.dtype | None:
    """`dtype` checked: None (the device's default), or one of DTYPES as a `torch.dtype`."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES):
        return dtype
    quantized = formats.quantizing_to(dtype) if isinstance(dtype, torch.dtype) else None
    hint = f" ({dtype} is a weight format: quantize={quantized!r})" if quantized else ""
    raise InvalidInput("dtype", dtype, f"torch.bfloat16, torch.float16 or torch.float32{hint}")
