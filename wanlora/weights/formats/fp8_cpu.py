"""fp8 rows to fp32 and back on the CPU, a pass a row, by kernels numba compiles (fp8_cpu_kernels.py).

On a CPU, torch converts fp32 to fp8 one value at a time and fp8 to fp32 slower still. The
torch path in fp8.py goes around the second with fp16 bit tricks, but a quantized merge still
made nine passes over each chunk of rows around its GEMM (widen, shift, mask, scale; amax, amin,
divide, round): the fp8 swap took four times the bf16 one. Here the widening and scaling are one
pass, and the rounding two a row (its amax, then the quotients), with the torch path's bits
(but for e4m3fn's NaN code, which no stored weight holds: NaN here, 480 there), and without the
GIL.

They serve where torch's ops run on one thread: the merge's weights, each on its own core
(wanlora.weights.spread), and any process limited to one thread. Where torch would spread an
op over several cores (a forward pass, quantizing at load) its own path keeps it; inside a
graph torch.compile traces, too (dynamo cannot trace into numba).

numba compiles the kernels on first use (or reads them from its cache), and they are checked
against torch on a sample before they serve. Where numba is missing, cannot compile or gets
them wrong, fp8.py's torch path serves, and a notice says why, once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np
import torch

from ...logs import NOTICE

logger = logging.getLogger(__name__)

Kernels = dict[str, Callable]
SUFFIX = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2"}  # each kernel's name ends in its fp8 dtype's

_lock = threading.Lock()
_loaded: list[Kernels | None] = []  # empty until the first call: then the kernels, or None


def _new_lock() -> None:
    global _lock
    _lock = threading.Lock()  # a fork while another thread held it would leave the child waiting for ever


if hasattr(os, "register_at_fork"):  # POSIX: where a process can fork
    os.register_at_fork(after_in_child=_new_lock)


def kernels() -> Kernels | None:
    """The compiled kernels by name; None where numba cannot give them (said once)."""
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> Kernels | None:
    try:
        from . import fp8_cpu_kernels

        try:
            compiled = fp8_cpu_kernels.compile_kernels(cache=True)
        except RuntimeError:  # nowhere to keep numba's cache (a read-only install): compile for this process
            compiled = fp8_cpu_kernels.compile_kernels(cache=False)
        _check(compiled)
    except Exception as exc:  # missing, failing or wrong: the torch path serves
        why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}" if str(exc).strip() else repr(exc)
        logger.log(NOTICE, "fp8 merges on the CPU take torch's slower path: numba's kernels are unavailable (%s)", why)
        return None
    return compiled


def _check(compiled: Kernels) -> None:
    """Raise unless every kernel gives torch's answer on a sample: every code, widened and rounded back."""
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128)
    for dtype, name in SUFFIX.items():
        values = torch.empty(codes.shape)
        compiled[f"widen_{name}"](_numpy(codes), _numpy(torch.ones(2)), _numpy(values))
        torch.testing.assert_close(values, codes.view(dtype).float(), rtol=0, atol=0, equal_nan=True)
        rows = values.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) * 0.37
        rounded, scale = torch.empty_like(codes), torch.empty(2)
        compiled[f"narrow_{name}"](_numpy(rows), _numpy(rounded), _numpy(scale))
        want_scale = rows.abs().amax(dim=1) / torch.finfo(dtype).max
        torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
        torch.testing.assert_close(rounded, (rows / want_scale[:, None]).to(dtype).view(torch.uint8), rtol=0, atol=0)


def dequantize_into(out: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor) -> bool:
    """out = quantized x scale per row, in one pass; False (nothing written) where these kernels do not serve."""
    compiled = _kernels_for(out, quantized, scale)
    if compiled is None:
        return False
    compiled[f"widen_{SUFFIX[quantized.dtype]}"](_numpy(quantized.view(torch.uint8)), _numpy(scale), _numpy(out))
    return True


def quantize_rows_into(rows: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> bool:
    """fp8.quantize_rows_into's rounding of `rows` into `out`, its scales into `scale` (rows are left as they
    were); False (nothing written) where these kernels do not serve."""
    compiled = _kernels_for(rows, out, scale)
    if compiled is None:
        return False
    compiled[f"narrow_{SUFFIX[out.dtype]}"](_numpy(rows), _numpy(out.view(torch.uint8)), _numpy(scale))
    return True


def _kernels_for(values: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> Kernels | None:
    """The kernels, where they serve these tensors: on one thread, outside torch.compile, on the CPU, fp32 rows
    and fp8 codes of one 2-D shape and a scale per row, each contiguous. Else None: the torch path."""
    fits = (
        not torch.compiler.is_compiling()
        and torch.get_num_threads() == 1
        and values.device.type == codes.device.type == scale.device.type == "cpu"
        and values.dtype == scale.dtype == torch.float32
        and codes.dtype in SUFFIX
        and values.dim() == codes.dim() == 2
        and values.shape == codes.shape
        and tuple(scale.shape) == (codes.shape[0],)
        and values.is_contiguous()
        and codes.is_contiguous()
        and scale.is_contiguous()
    )
    return kernels() if fits else None


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()  # a view of the same memory
