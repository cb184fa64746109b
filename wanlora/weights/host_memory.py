"""Host memory that feeds a GPU, costing what it holds.

A `HostArena` is one plain allocation of exactly its tensors' (aligned) bytes, registered with
CUDA as pinned pages. `pin_memory=True` would go through PyTorch's caching host allocator, which
rounds each block up to a power of two: a 28.6 GB expert would take 34.4 GB as one block and
43.8 GB as one block per tensor, a 141.6 MB weight 268.4 MB.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..errors import OutOfMemory

ARENA_ALIGN = 512  # bytes between one tensor's start and the next: every dtype's alignment, and DMA-friendly


def arena_layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """Each tensor's byte offset in one buffer, and the buffer's size: the tensors' bytes, aligned."""
    offsets, total = {}, 0
    for name, tensor in tensors.items():
        offsets[name] = total
        total += -(-tensor.numel() * tensor.element_size() // ARENA_ALIGN) * ARENA_ALIGN
    return offsets, total


def caching_allocator_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """What `pin_memory=True` would take for these tensors, one block each: sizes rounded up to powers of two."""
    return sum(1 << max(0, (t.numel() * t.element_size() - 1).bit_length()) for t in tensors.values())


CUDA_ERROR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation: no more pages the system lets CUDA lock


def cuda_register(pointer: int, size: int) -> None:
    error = int(torch.cuda.cudart().cudaHostRegister(pointer, size, 1))  # 1: cudaHostRegisterPortable
    if error == CUDA_ERROR_MEMORY_ALLOCATION:  # the machine's limit, not a bug: said as such, with what to do
        raise OutOfMemory(
            f"could not pin {size / 1e9:.1f} GB more host memory for copies to the GPU: the system's limit on "
            "locked memory is reached (see `ulimit -l`, or free host memory); an offload mode that keeps less on "
            "the host (offload='none' or 'encoder', where the GPU has room) needs less of it"
        )
    if error:
        raise RuntimeError(f"could not pin {size / 1e9:.1f} GB of host memory (CUDA error {error})")


def cuda_unregister(pointer: int) -> None:
    torch.cuda.synchronize()  # a non-blocking copy from these pages may still be in flight
    torch.cuda.cudart().cudaHostUnregister(pointer)


class HostArena:
    """Host copies of `tensors` in one allocation of exactly their (aligned) bytes, pinned with CUDA.

    `views[name]` is each tensor's host buffer, shaped and typed as the tensor; the values are
    copied in when `fill` is true. `register`/`unregister` default to CUDA's (tests pass stand-ins).
    The registration ends with the arena; the memory lives as long as any view of it does.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        pin: bool,
        fill: bool = True,
        register: Callable[[int, int], None] | None = None,
        unregister: Callable[[int], None] | None = None,
    ) -> None:
        offsets, self.nbytes = arena_layout(tensors)
        self.storage = torch.empty(max(self.nbytes, 1), dtype=torch.uint8)  # pageable, the exact size
        self.pinned = pin
        if pin:
            (register or cuda_register)(self.storage.data_ptr(), self.nbytes)
            weakref.finalize(self, unregister or cuda_unregister, self.storage.data_ptr())
        self.views: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            chunk = self.storage[offsets[name] : offsets[name] + size]
            self.views[name] = chunk.view(tensor.dtype).view(tensor.shape)
            if fill:
                self.views[name].copy_(tensor.detach())  # a parameter's autograd stays out of the copy
