"""fp8 on the CPU by numba's kernels (weights/formats/fp8_cpu.py): torch's own conversions, bit for bit, where
they serve (one thread, outside torch.compile), and the torch path everywhere else or without them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections import Counter

import pytest
import torch
from numba import njit

from wanlora.logs import NOTICE
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.tiny import tiny_transformer
from wanlora.weights import formats
from wanlora.weights.formats import fp8_cpu, fp8_cpu_kernels
from wanlora.weights.formats.fp8 import Fp8Linear, dequantize_into, quantize_rows, quantize_rows_into
from wanlora.weights.spread import single_threaded_ops

from .builders import write_lora
from .lora_helpers import merge
from .test_fp8 import bits, fp8_tiny

DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
NAMES = {torch.float8_e4m3fn: "e4m3fn", torch.float8_e5m2: "e5m2"}
CODE_OF = {torch.float8_e4m3fn: fp8_cpu_kernels.e4m3fn_code, torch.float8_e5m2: fp8_cpu_kernels.e5m2_code}
SATURATE = {torch.float8_e4m3fn: 464.0, torch.float8_e5m2: 61440.0}  # from here on: 448 (e4m3fn), infinity (e5m2)


@pytest.fixture
def one_thread():
    """torch's ops on one thread, as inside a merge: where the kernels serve."""
    with single_threaded_ops():
        yield


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """How often each kernel ran."""
    counted: Counter = Counter()
    compiled = fp8_cpu.kernels()
    assert compiled is not None

    def counting(name):
        def run(*args):
            counted[name] += 1
            return compiled[name](*args)

        return run

    monkeypatch.setattr(fp8_cpu, "kernels", lambda: {name: counting(name) for name in compiled})
    return counted


def use_torch_path(monkeypatch) -> None:
    """fp8.py's torch path from here on, as where numba is missing: the kernels answer "not here"."""
    monkeypatch.setattr(fp8_cpu, "kernels", lambda: None)


# ------------------------------------------------------------------ the conversions, value by value


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


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
def test_a_value_rounds_to_the_code_torch_gives_it_in_every_rounding_case(dtype):
    values = fp32_cases()
    codes = kernel_codes(values, dtype)
    below = values.abs() < SATURATE[dtype]  # torch's answers past the largest value changed in 2.12
    assert below.sum() > 100_000
    assert torch.equal(codes[below], values[below].to(dtype).view(torch.uint8))
    past = values.abs() >= SATURATE[dtype]  # c10's rule from torch 2.12: e4m3fn saturates, e5m2 overflows
    top = 0x7E if dtype == torch.float8_e4m3fn else 0x7C
    assert torch.equal(codes[past].int(), top | torch.where(values[past] < 0, 0x80, 0))
    assert (codes[values.isnan()] & 0x7F).unique().tolist() == [0x7F]


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
def test_every_code_widens_to_its_value_times_the_scale_as_torch_computes_it(dtype, one_thread):
    codes = torch.arange(256, dtype=torch.uint8).repeat(6, 1)
    scale = torch.tensor([1.0, 0.37, 3e-20, torch.finfo(torch.float32).tiny, 1e30, 3.4e38])
    out = torch.empty(codes.shape)
    assert fp8_cpu.dequantize_into(out, codes.view(dtype), scale)
    want = codes.view(dtype).float() * scale[:, None]
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32))  # -0.0 too


def test_the_torch_path_widens_large_scales_without_overflowing(monkeypatch):
    """Its fp16 trick reads e4m3fn as 2^-8 of the value: the 256 must not be folded into a scale from 2^120."""
    use_torch_path(monkeypatch)
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).repeat(2, 1)  # every finite code
    scale = torch.tensor([1.4e36, 3e38])
    want = codes.float() * scale[:, None]
    assert torch.equal(dequantize_into(torch.empty(codes.shape), codes, scale), want)


# ------------------------------------------------------------------ rows and merges: the kernels against the torch path


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


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES.get)
def test_quantizing_rows_gives_the_torch_paths_codes_and_scales(dtype, one_thread, calls, monkeypatch):
    fast, slow = quantized_both_ways(awkward_rows(torch.Generator().manual_seed(3)), dtype, monkeypatch)
    assert calls == {f"narrow_{NAMES[dtype]}": 1, f"widen_{NAMES[dtype]}": 1}
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_rows_with_infinity_or_nan_round_as_the_torch_path_rounds_them(one_thread, calls, monkeypatch):
    rows = torch.ones(3, 32)
    rows[0, 3] = float("inf")
    rows[1, 4] = float("nan")
    rows[2, 5] = -float("inf")
    fast, slow = quantized_both_ways(rows, torch.float8_e4m3fn, monkeypatch)
    assert calls["narrow_e4m3fn"] == 1
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1].isnan(), slow[1].isnan()) and torch.equal(fast[1].nan_to_num(), slow[1].nan_to_num())


def test_a_merge_of_fp8_weights_gives_the_same_bits_with_the_kernels_and_without(
    tmp_path, one_thread, calls, monkeypatch
):
    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "original", seed=7)
    lora = read_lora(tmp_path / "a.safetensors")
    base = bits(fp8_tiny())
    merged = []
    for _ in range(2):
        model = fp8_tiny()
        merge(LoraMerger(model), [(lora, 0.8)])
        merged.append(bits(model))
        use_torch_path(monkeypatch)
    assert calls["widen_e4m3fn"] > 10 and calls["narrow_e4m3fn"] > 10  # the merge's own chunks
    assert any(not torch.equal(now, base[name]) for name, now in merged[0].items())  # the LoRA changed fp8 rows
    assert all(torch.equal(now, merged[1][name]) for name, now in merged[0].items())


# ------------------------------------------------------------------ where the kernels serve, and where they do not


def test_tensors_the_kernels_do_not_take_go_the_torch_path(one_thread, monkeypatch):
    rows = torch.randn(64, 48)
    want, want_scale = quantize_rows(rows)

    def refuse(*args):
        raise AssertionError("a kernel was handed tensors it does not take")

    monkeypatch.setattr(fp8_cpu, "kernels", lambda: dict.fromkeys(fp8_cpu_kernels.KERNELS, refuse))
    column_major = torch.empty(48, 64, dtype=torch.float8_e4m3fn).t()
    assert torch.equal(quantize_rows_into(rows.clone(), column_major), want_scale)
    assert torch.equal(column_major.contiguous().view(torch.uint8), want.view(torch.uint8))
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48, dtype=torch.float64), want, want_scale)
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48), want, want_scale[:32])
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48), want.t().contiguous().t(), want_scale)
    assert not fp8_cpu.dequantize_into(torch.empty(64, 48, device="meta"), want.to("meta"), want_scale.to("meta"))


def test_ops_torch_runs_on_several_threads_keep_the_torch_path(calls):
    with single_threaded_ops():
        torch.set_num_threads(2)  # a forward pass, or quantizing at load, in a process with two threads
        quantize_rows(torch.randn(8, 32))
        torch.set_num_threads(1)
        quantize_rows(torch.randn(8, 32))
    assert calls == {"narrow_e4m3fn": 1}


def test_fp8_layers_compile_whole_graphs_on_the_cpu(one_thread, calls):
    """dynamo cannot trace into numba: inside a compiled graph the torch path serves, and fullgraph holds."""
    layer = Fp8Linear.of(torch.nn.Linear(64, 32), "weight-only")
    x = torch.randn(3, 64)
    calls.clear()  # quantizing the layer's weight ran one
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))
    assert calls == {"widen_e4m3fn": 1}  # the eager call only


# ------------------------------------------------------------------ when numba cannot serve


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fp8_cpu.__name__ and r.levelno == NOTICE]


def fresh_load(monkeypatch) -> None:
    monkeypatch.setattr(fp8_cpu, "_loaded", [])


def test_without_numba_the_torch_path_serves_and_a_notice_says_why_once(one_thread, monkeypatch, caplog):
    rows = torch.randn(8, 32)
    want, want_scale = quantize_rows(rows)
    monkeypatch.setitem(sys.modules, "numba", None)  # as where numba is not installed
    monkeypatch.delitem(sys.modules, fp8_cpu_kernels.__name__)
    monkeypatch.delattr(formats, "fp8_cpu_kernels")  # imported once already: the package holds it too
    fresh_load(monkeypatch)
    with caplog.at_level(logging.INFO, logger=fp8_cpu.__name__):
        for _ in range(3):
            codes = torch.empty(rows.shape, dtype=torch.float8_e4m3fn)
            assert torch.equal(quantize_rows_into(rows.clone(), codes), want_scale)
            assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))
    assert fp8_cpu.kernels() is None
    said = notices(caplog)
    assert len(said) == 1 and "numba" in said[0] and "torch's slower path" in said[0], said


def test_kernels_that_give_wrong_answers_never_serve(one_thread, monkeypatch, caplog):
    """As a numba that miscompiles them would: here e5m2 rows rounded as e4m3fn."""
    compiled = fp8_cpu_kernels.compile_kernels(cache=True)
    wrong = {**compiled, "narrow_e5m2": compiled["narrow_e4m3fn"]}
    monkeypatch.setattr(fp8_cpu_kernels, "compile_kernels", lambda cache: wrong)
    fresh_load(monkeypatch)
    with caplog.at_level(logging.INFO, logger=fp8_cpu.__name__):
        assert fp8_cpu.kernels() is None
    assert len(notices(caplog)) == 1
    rows = torch.randn(8, 32)
    codes = torch.empty(rows.shape, dtype=torch.float8_e5m2)
    scale = quantize_rows_into(rows.clone(), codes)
    assert torch.equal(codes.view(torch.uint8), (rows / scale[:, None]).to(codes.dtype).view(torch.uint8))


def quantize_in_a_process(env: dict[str, str]) -> tuple[list[str], str]:
    """(whether the kernels served, the largest code's value) from a fresh process, and what it logged."""
    script = (
        "import logging, torch; from wanlora.weights.formats import fp8, fp8_cpu; logging.basicConfig(level=25); "
        "torch.set_num_threads(1); q, s = fp8.quantize_rows(torch.ones(2, 16)); "
        "print(fp8_cpu.kernels() is not None, q.float().max().item())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]  # never an abort (LLVM's, for a symbol it cannot link)
    return done.stdout.split(), done.stderr


def test_with_numbas_jit_turned_off_the_torch_path_serves():
    """NUMBA_DISABLE_JIT=1 runs numba's functions as Python, where the kernels' intrinsics raise."""
    served, said = quantize_in_a_process({"NUMBA_DISABLE_JIT": "1"})
    assert served == ["False", "448.0"]
    assert "numba's kernels are unavailable" in said


def test_the_kernels_compile_for_any_x86_64_cpu(tmp_path):
    """numba's portable target: no float16 conversion (without F16C, LLVM's helper for it aborts the process)."""
    served, said = quantize_in_a_process(
        {"NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "", "NUMBA_CACHE_DIR": str(tmp_path)}
    )
    assert served == ["True", "448.0"], said


def test_where_numba_cannot_keep_its_cache_the_kernels_are_compiled_for_the_process(one_thread, monkeypatch, caplog):
    compile_kernels = fp8_cpu_kernels.compile_kernels
    asked = []

    def nowhere_to_cache(cache: bool):
        asked.append(cache)
        if cache:  # numba's words, for a read-only install without a writable home
            raise RuntimeError("cannot cache function 'widen_e4m3fn': no locator available for file 'x.py'")
        return compile_kernels(cache)

    monkeypatch.setattr(fp8_cpu_kernels, "compile_kernels", nowhere_to_cache)
    fresh_load(monkeypatch)
    with caplog.at_level(logging.INFO, logger=fp8_cpu.__name__):
        assert fp8_cpu.kernels() is not None
    assert asked == [True, False] and notices(caplog) == []


def test_the_kernels_release_the_gil_so_the_merges_threads_run_side_by_side(one_thread):
    compiled = fp8_cpu.kernels()
    assert compiled is not None and compiled.keys() == fp8_cpu_kernels.KERNELS.keys()
    for kernel in compiled.values():
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
