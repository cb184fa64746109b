"""Buffers a thread reuses from one chunk of work to the next: allocating one per chunk costs more than the work.

Merges and W0 proofs run a weight per core (wanlora.weights.spread), so each thread keeps its own.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def thread_buffer(purpose: str, elements: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's 1-D CPU buffer for `purpose`, of `elements` values, grown when a larger one is asked for."""
    key = (purpose, dtype)
    buffers = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < elements:
        buffer = buffers[key] = torch.empty(elements, dtype=dtype)
    return buffer[:elements]
