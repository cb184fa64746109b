"""fp8 on the CPU by numba's kernels (weights/formats/fp8_cpu.py): torch's own conversions, bit for bit, or the
torch path where the kernels cannot serve."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import torch
from numba import njit

from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.tiny import tiny_transformer
from wanlora.weights import formats
from wanlora.weights.formats import fp8_cpu, fp8_cpu_kernels
from wanlora.weights.formats.fp8 import dequantize_into, quantize_rows, quantize_rows_into

from .builders import write_lora
from .lora_helpers import merge
from .test_fp8 import bits, fp8_tiny

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
CODE_OF = {torch.float8_e4m3fn: fp8_cpu_kernels.e4m3fn_code, torch.float8_e5m2: fp8_cpu_kernels.e5m2_code}
SATURATE = {torch.float8_e4m3fn: 464.0, torch.float8_e5m2: 61440.0}  # from here on: 448 (e4m3fn), infinity (e5m2)


def use_torch_path(monkeypatch) -> None:
    """fp8.py's torch path from here on, as where numba is missing: the kernels answer "not here"."""
    monkeypatch.setattr(fp8_cpu, "kernels", lambda: None)


def fp32_cases() -> torch.Tensor:
    """Every float32 sign, exponent and top 7 mantissa bits, each with the bits below them zero, one, just under
    a half, a half, just over, and all ones: every value's rounding case for fp8's 2 or 3 mantissa bits."""
    high = torch.arange(1 << 16, dtype=torch.int64)[:, None] << 16
    low = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)[None, :]
    words = (high | low).flatten()
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).view(torch.float32)


@njit
def _codes(values, out, code):
    for i in range(values.shape[0]):
        out[i] = code(values[i])


def kernel_codes(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(values.shape, dtype=torch.uint8)
    _codes(values.numpy(), out.numpy(), CODE_OF[dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["e4m3fn", "e5m2"])
def test_a_value_rounds_to_the_code_torch_gives_it_in_every_rounding_case(dtype):
    values = fp32_cases()
    codes = kernel_codes(values, dtype)
    below = values.abs() < SATURATE[dtype]  # torch's answers past the largest value changed across versions
    assert below.sum() > 100_000
    want = values[below].to(dtype).view(torch.uint8)
    assert torch.equal(codes[below], want)
    past = values.abs() >= SATURATE[dtype]  # c10's rule in torch 2.13: e4m3fn saturates, e5m2 overflows
    top = 0x7E if dtype == torch.float8_e4m3fn else 0x7C
    sign = torch.where(values[past] < 0, 0x80, 0)
    assert torch.equal(codes[past].int(), top | sign)
    nan = values.isnan()
    assert (codes[nan] & 0x7F).unique().tolist() == [0x7F]


@pytest.mark.parametrize("dtype", DTYPES, ids=["e4m3fn", "e5m2"])
def test_every_code_widens_to_its_value_times_the_scale_as_torch_computes_it(dtype):
    codes = torch.arange(256, dtype=torch.uint8).repeat(6, 1)
    scale = torch.tensor([1.0, 0.37, 3e-20, torch.finfo(torch.float32).tiny, 1e30, 3.4e38])
    out = torch.empty(codes.shape)
    assert fp8_cpu.dequantize_into(out, codes.view(dtype), scale)
    want = codes.view(dtype).float() * scale[:, None]
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32))  # -0.0 too


def awkward_rows(generator: torch.Generator) -> torch.Tensor:
    """Rows as merges make them, and the edges: zeros, -0.0, values far below and above 1, fp32 subnormals."""
    rows = torch.randn(40, 272, generator=generator) * 0.02
    rows[1] = 0.0
    rows[2] = -0.0
    rows[3, :100] = 0.0
    rows[4] *= 1e-30  # a scale below 2^-126 x max: clamped to the smallest normal
    rows[5] = torch.randn(272, generator=generator) * 1e-41  # fp32 subnormals
    rows[6] *= 1e30
    rows[7, 5] = 448.0 * 3  # one large value: the rest of its row rounds to subnormal codes
    rows[8] = torch.tensor([2.0**k for k in range(-20, 252)]).clamp(max=3e38)
    return rows


def quantized_both_ways(rows: torch.Tensor, dtype: torch.dtype, monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """(codes, scales, codes widened back) by the kernels, then by the torch path."""
    results = []
    for _ in range(2):
        codes = torch.empty(rows.shape, dtype=dtype)
        scale = quantize_rows_into(rows.clone(), codes)
        back = dequantize_into(torch.empty(rows.shape), codes, scale)
        results.append((codes.view(torch.uint8), scale, back))
        use_torch_path(monkeypatch)
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=["e4m3fn", "e5m2"])
def test_quantizing_rows_gives_the_torch_paths_codes_and_scales(dtype, monkeypatch):
    fast, slow = quantized_both_ways(awkward_rows(torch.Generator().manual_seed(3)), dtype, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_rows_with_infinity_or_nan_round_as_the_torch_path_rounds_them(monkeypatch):
    rows = torch.ones(3, 32)
    rows[0, 3] = float("inf")
    rows[1, 4] = float("nan")
    rows[2, 5] = -float("inf")
    fast, slow = quantized_both_ways(rows, torch.float8_e4m3fn, monkeypatch)
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1].isnan(), slow[1].isnan()) and torch.equal(fast[1].nan_to_num(), slow[1].nan_to_num())


def test_a_merge_of_fp8_weights_gives_the_same_bits_with_the_kernels_and_without(tmp_path, monkeypatch):
    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "original", seed=7)
    lora = read_lora(tmp_path / "a.safetensors")
    base = bits(fp8_tiny())
    merged = []
    for _ in range(2):
        model = fp8_tiny()
        merge(LoraMerger(model), [(lora, 0.8)])
        merged.append(bits(model))
        use_torch_path(monkeypatch)
    assert any(not torch.equal(now, base[name]) for name, now in merged[0].items())  # the LoRA changed fp8 rows
    assert all(torch.equal(now, merged[1][name]) for name, now in merged[0].items())


def test_tensors_the_kernels_do_not_take_go_the_torch_path(monkeypatch):
    rows = torch.randn(64, 48)
    want, want_scale = quantize_rows(rows)

    def refuse(*args):
        raise AssertionError("a kernel was handed tensors it does not take")

    for name in ("narrow_e4m3fn", "widen_e4m3fn"):
        monkeypatch.setattr(fp8_cpu_kernels, name, refuse)
    column_major = torch.empty(48, 64, dtype=torch.float8_e4m3fn).t()
    assert torch.equal(quantize_rows_into(rows.clone(), column_major), want_scale)
    assert torch.equal(column_major.contiguous().view(torch.uint8), want.view(torch.uint8))
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48, dtype=torch.float64), want, want_scale)
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48), want, want_scale[:32])
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48), want.t().contiguous().t(), want_scale)


def test_without_numba_the_torch_path_serves_and_the_log_says_why_once(monkeypatch, caplog):
    rows = torch.randn(8, 32)
    want, want_scale = quantize_rows(rows)
    monkeypatch.setitem(sys.modules, "numba", None)  # as where numba is not installed
    monkeypatch.delitem(sys.modules, fp8_cpu_kernels.__name__)
    monkeypatch.delattr(formats, "fp8_cpu_kernels")  # imported once already: the package holds it too
    monkeypatch.setattr(fp8_cpu, "_loaded", [])
    with caplog.at_level(logging.INFO, logger=fp8_cpu.__name__):
        for _ in range(3):
            codes = torch.empty(rows.shape, dtype=torch.float8_e4m3fn)
            assert torch.equal(quantize_rows_into(rows.clone(), codes), want_scale)
            assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))
    assert fp8_cpu.kernels() is None
    said = [record.getMessage() for record in caplog.records if record.name == fp8_cpu.__name__]
    assert len(said) == 1 and "numba" in said[0] and "torch's conversions" in said[0], said


def test_the_kernels_release_the_gil_so_the_merges_threads_run_side_by_side():
    compiled = fp8_cpu.kernels()
    assert compiled is not None
    for kernel in (compiled.widen_e4m3fn, compiled.widen_e5m2, compiled.narrow_e4m3fn, compiled.narrow_e5m2):
        assert kernel.targetoptions["nogil"] is True
        assert len(kernel.signatures) == 1  # compiled once, for the one layout fp8_cpu hands it
    rows = torch.randn(256, 1024)
    want, want_scale = quantize_rows(rows)
    codes = [torch.empty(rows.shape, dtype=torch.float8_e4m3fn) for _ in range(4)]
    scales = [torch.empty(256) for _ in range(4)]
    jobs = [
        threading.Thread(target=fp8_cpu.quantize_rows_into, args=(rows, *pair))
        for pair in zip(codes, scales, strict=True)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert all(torch.equal(c.view(torch.uint8), want.view(torch.uint8)) for c in codes)
    assert all(torch.equal(s, want_scale) for s in scales)
