"""Which device a pipeline runs on, checked against this machine before anything loads."""

from __future__ import annotations

import torch

from ..errors import InvalidInput
from ..messages import plural


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
