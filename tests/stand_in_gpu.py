"""CUDA's device rule on a machine without CUDA: one operation takes tensors of one device.

`StandInGPU` is a torch function mode. A tensor moved `.to("cuda")` inside it stays a CPU tensor (its
values real) but counts as on the GPU, and so does whatever an operation computes from it; an operation
that mixes such tensors with host ones raises as CUDA's would. Copies cross (`to`, `copy_`, setting
`.data`), and a 0-dim host tensor goes with anything, as CUDA allows. What CUDA itself would be asked
(`torch.cuda.synchronize`, pinning) the test stubs.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


def _target(args: tuple, kwargs: dict) -> torch.device | None:
    """The device a `Tensor.to` call names, if any."""
    named = kwargs.get("device")
    if named is None:
        named = next((a for a in args if isinstance(a, (torch.device, str))), None)
    return None if named is None else torch.device(named)


class StandInGPU(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.on_gpu: dict[int, torch.Tensor] = {}  # storage address -> a tensor keeping that storage alive

    def is_on_gpu(self, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self.on_gpu

    def _mark(self, result: object) -> None:
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
                self.on_gpu[tensor.untyped_storage().data_ptr()] = tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        if func is torch.Tensor.copy_ or getattr(func, "__name__", "") == "__set__":  # copies cross devices
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        sized = [t for t in tensors if t.dim() > 0 and t.untyped_storage().nbytes()]
        gpu = [self.is_on_gpu(t) for t in sized]
        if any(gpu) and not all(gpu):
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                f"({getattr(func, '__name__', func)})"
            )
        result = func(*args, **kwargs)
        if any(gpu):
            self._mark(result)
        return result

    def _to(self, func, args: tuple, kwargs: dict):
        target = _target(args[1:], kwargs)
        rest = [a for a in args[1:] if not isinstance(a, (torch.device, str))]
        options = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking")}
        source = args[0]
        moved = func(source, *rest, **options)
        shared = moved.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
        if target is None:
            if self.is_on_gpu(source):
                self._mark(moved)
            return moved
        if target.type == "cuda":
            moved = moved.clone() if shared else moved
            self._mark(moved)
        elif self.is_on_gpu(source):  # back to the host: memory of its own
            moved = moved.clone() if shared else moved
        return moved
