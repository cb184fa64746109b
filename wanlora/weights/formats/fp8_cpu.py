"""fp8 rows to fp32 and back on the CPU, a pass a row, by kernels numba compiles (fp8_cpu_kernels.py).

On a CPU, torch converts fp32 to fp8 one value at a time (about 0.56 ns a value on one core of
an AVX-512 Xeon) and fp8 to fp32 slower still (3.6 ns). The torch path in fp8.py goes around the
second with fp16 bit tricks, but a quantized merge still makes nine passes over each chunk of
rows around its GEMM (widen, shift, mask, scale; amax, amin, divide, round): the fp8 swap took
four times the bf16 one. Here the widening and scaling are one pass, and the rounding two a
row (its amax, then the quotients, from the L1 cache), with the same bits as the torch path,
and without the GIL, so the merge's threads (wanlora.weights.spread) run side by side.

numba is imported, and its kernels compiled or read from its cache, on first use. Where it is
missing or fails, every call answers "not here" and fp8.py takes the torch path; the log says
why, once.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: list[ModuleType | None] = []  # empty until the first call: then the kernels' module, or None


def kernels() -> ModuleType | None:
    """fp8_cpu_kernels, compiled; None where numba cannot give it (logged once)."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> ModuleType | None:
    try:
        from . import fp8_cpu_kernels
    except Exception as exc:  # missing, or a numba that fails to compile here: the torch path serves
        logger.info("fp8 on the CPU: torch's conversions, slower (numba's kernels are unavailable: %s)", exc)
        return None
    return fp8_cpu_kernels


def dequantize_into(out: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor) -> bool:
    """out = quantized x scale per row, in one pass; False (nothing written) where these kernels do not apply."""
    compiled = _for(out, quantized, scale)
    if compiled is None:
        return False
    widen = compiled.widen_e4m3fn if quantized.dtype == torch.float8_e4m3fn else compiled.widen_e5m2
    widen(_numpy(quantized.view(torch.uint8)), _numpy(scale), _numpy(out))
    return True


def quantize_rows_into(rows: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> bool:
    """fp8.quantize_rows_into's rounding of `rows` into `out`, its scales into `scale` (rows are left as they
    were); False (nothing written) where these kernels do not apply."""
    compiled = _for(rows, out, scale)
    if compiled is None:
        return False
    narrow = compiled.narrow_e4m3fn if out.dtype == torch.float8_e4m3fn else compiled.narrow_e5m2
    narrow(_numpy(rows), _numpy(out.view(torch.uint8)), _numpy(scale))
    return True


def _for(values: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> ModuleType | None:
    """The kernels, where they take these tensors: on the CPU, fp32 rows and fp8 codes of one 2-D shape and a
    scale per row, each contiguous. Anything else (a GPU's, a strided view) goes to the torch path."""
    fits = (
        values.device.type == codes.device.type == scale.device.type == "cpu"
        and values.dtype == scale.dtype == torch.float32
        and codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        and values.dim() == codes.dim() == 2
        and values.shape == codes.shape
        and tuple(scale.shape) == (codes.shape[0],)
        and values.is_contiguous()
        and codes.is_contiguous()
        and scale.is_contiguous()
    )
    return kernels() if fits else None


def _numpy(tensor: torch.Tensor):
    return tensor.detach().numpy()
