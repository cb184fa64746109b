"""GGML blocks <-> fp32 in torch: dequantization bit for bit as gguf-py's, quantization as gguf-py's (legacy
types) and as ggml's reference K-quantizers (held to tests/gguf_reference.py, a scalar transcription)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from wanlora.weights.gguf import qtypes
from wanlora.weights.gguf.dequant import dequantize, dequantize_into
from wanlora.weights.gguf.quantize import quantize

from .gguf_reference import quantize_q4_k, quantize_reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf-py's numpy, on extreme and NaN blocks

ALL = list(qtypes.READ_TYPES.values())
QUANTIZED = [qtype for qtype in ALL if qtype.quantized]


def gguf_type(qtype: qtypes.QType):
    return gguf.GGMLQuantizationType[qtype.name]


def bits(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, np.float32).view(np.uint32)


def random_blocks(qtype: qtypes.QType, count: int, seed: int) -> np.ndarray:
    """Random bytes for `count` blocks, with finite fp16 scales from 2^-24 (subnormal) to 2^15 (near the top)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(count, qtype.type_size), dtype=np.uint8)
    for offset in qtype.scale_offsets:
        exponent = rng.integers(-24, 16, count).astype(np.float32)
        scale = (rng.standard_normal(count) * np.float32(2.0) ** exponent).astype(np.float16)
        scale[:4] = [np.float16(65504), np.float16(-65504), np.float16(2**-24), np.float16(0)]  # extremes
        raw[:, offset : offset + 2] = scale.view(np.uint8).reshape(count, 2)
    if qtype == qtypes.F16:  # NaN codes hold no weight (and numpy keeps a signalling NaN's payload, torch quiets it)
        codes = raw.view(np.uint16)
        codes[(codes & 0x7C00) == 0x7C00] &= 0xBFFF
    return raw


def weights(rows: int, columns: int, seed: int) -> np.ndarray:
    """Rows whose blocks cover what real weights and merges hold: normal ones, heavy tails, outliers, zeros,
    constant blocks, tiny and huge scales, exact ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, columns)).astype(np.float32) * 0.02
    flat = x.reshape(-1, 256)
    n = flat.shape[0]
    kinds = [
        lambda b: b,
        lambda b: rng.standard_t(3, 256).astype(np.float32) * 0.01,
        lambda b: np.where(rng.random(256) < 0.02, b * 40, b),
        lambda b: np.zeros(256, np.float32),
        lambda b: np.full(256, -0.5, np.float32),
        lambda b: np.full(256, 0.25, np.float32),
        lambda b: np.concatenate([np.zeros(16, np.float32), b[16:]]),
        lambda b: np.concatenate([np.full(32, 1e-20, np.float32), b[32:]]),
        lambda b: b * np.float32(1e-6),
        lambda b: b * np.float32(3e4),
        lambda b: (rng.integers(-3, 4, 256) * 0.01).astype(np.float32),
        lambda b: np.abs(b),
    ]
    for i in range(n):
        flat[i] = kinds[i % len(kinds)](flat[i])
    return x


@pytest.mark.parametrize("qtype", ALL, ids=str)
def test_dequantize_is_gguf_py_bit_for_bit(qtype):
    raw = random_blocks(qtype, 4096, seed=qtype.id).reshape(32, -1)
    want = gguf.quants.dequantize(raw, gguf_type(qtype))
    got = dequantize(torch.from_numpy(raw), qtype)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert np.array_equal(bits(got.numpy()), bits(want))


def test_dequantize_into_goes_a_chunk_of_rows_at_a_time_into_any_dtype(monkeypatch):
    import wanlora.weights.gguf.dequant as dequant

    raw = torch.from_numpy(random_blocks(qtypes.Q4_K, 64, seed=3).reshape(8, -1))
    whole = dequantize(raw, qtypes.Q4_K)
    monkeypatch.setattr(dequant, "CHUNK_WEIGHTS", 3 * 2048)  # 3 rows a chunk: the last one short
    out = torch.empty(8, 2048, dtype=torch.bfloat16)
    assert dequantize_into(out, raw, qtypes.Q4_K) is out
    assert torch.equal(out, whole.to(torch.bfloat16))
    with pytest.raises(ValueError, match="whole blocks of 144 bytes"):
        dequantize(raw[:, :100], qtypes.Q4_K)


@pytest.mark.parametrize("qtype", [qtypes.Q8_0, qtypes.Q4_0, qtypes.Q4_1, qtypes.Q5_0, qtypes.Q5_1], ids=str)
def test_legacy_quantizers_are_gguf_py_bit_for_bit_and_give_a_file_its_bytes_back(qtype):
    x = weights(24, 1024, seed=qtype.id)
    want = gguf.quants.quantize(x, gguf_type(qtype))
    got = quantize(torch.from_numpy(x), qtype).numpy()
    assert np.array_equal(got, want)
    # a file's weights sit on the grid: quantizing them again gives the same bytes (where d is a normal fp16;
    # the 1e-6 blocks' d underflows to 0 as stored)
    normal = torch.randn(16, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    stored = quantize(normal, qtype)
    assert torch.equal(quantize(dequantize(stored, qtype), qtype), stored)


@pytest.mark.parametrize("qtype", [qtypes.F32, qtypes.F16, qtypes.BF16], ids=str)
def test_float_types_round_as_gguf_writes_them(qtype):
    x = weights(4, 512, seed=1)
    x[0, :4] = [np.nan, np.inf, -np.inf, 3.0e38]
    got = quantize(torch.from_numpy(x), qtype).numpy()
    want = gguf.quants.quantize(x, gguf_type(qtype)) if qtype != qtypes.F32 else x
    assert np.array_equal(got, np.ascontiguousarray(want).view(np.uint8).reshape(got.shape))


@pytest.mark.parametrize("qtype", qtypes.K_TYPES, ids=str)
def test_k_quantizers_are_the_reference_bit_for_bit(qtype):
    """The reference follows ggml's *_ref step by step, the min of make_qkx2_quants' best fit so far included
    (a fit from the first min alone differs in most blocks)."""
    x = weights(6, 2048, seed=100 + qtype.id)  # 48 super-blocks, every kind of block 4 times
    got = quantize(torch.from_numpy(x), qtype).numpy()
    assert got.shape == (6, 2048 // 256 * qtype.type_size)
    want = quantize_reference(x, qtype.name)
    differ = np.nonzero((got.reshape(-1, qtype.type_size) != want.reshape(-1, qtype.type_size)).any(axis=1))[0]
    assert differ.size == 0, f"blocks {differ.tolist()} differ from the reference"


def test_the_reference_tests_would_see_the_trap_of_the_first_min():
    """Tries from the range's min alone, not the best fit's so far, change most Q4_K blocks on plain weights:
    the bit-for-bit test above would fail on that mistake."""
    x = np.random.default_rng(5).standard_normal((2, 2048)).astype(np.float32) * 0.02
    got = quantize(torch.from_numpy(x), qtypes.Q4_K).numpy().reshape(-1, 144)
    trapped = np.stack([np.frombuffer(quantize_q4_k(list(block), True), np.uint8) for block in x.reshape(-1, 256)])
    assert (got != trapped).any(axis=1).mean() > 0.25


@pytest.mark.parametrize("qtype", QUANTIZED, ids=str)
def test_quantizing_is_deterministic_row_wise_and_close(qtype):
    x = torch.from_numpy(weights(16, 1024, seed=7)) * torch.linspace(0.5, 2.0, 16)[:, None]
    whole = quantize(x, qtype)
    assert torch.equal(quantize(x.clone(), qtype), whole)
    assert torch.equal(quantize(x[5:9], qtype), whole[5:9])  # a chunk of rows alone: the same bytes
    assert torch.equal(quantize(x.view(2, 8, 1024), qtype).view(16, -1), whole)
    back = dequantize(whole, qtype)
    # the error of a block is bounded by its own spread: weights there, not noise
    normal = x.view(-1, 256)[0::12].contiguous()  # the plain normal blocks
    error = (back.view(-1, 256)[0::12] - normal).norm() / normal.norm()
    bound = {"Q8_0": 0.01, "Q6_K": 0.02, "Q5_K": 0.04, "Q5_0": 0.05, "Q5_1": 0.04, "Q4_K": 0.08}
    bound |= {"Q4_0": 0.1, "Q4_1": 0.09, "Q3_K": 0.2, "Q2_K": 0.4}
    assert float(error) < bound[qtype.name]


def test_quantize_refuses_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="whole blocks of 256"):
        quantize(torch.zeros(2, 96), qtypes.Q4_K)
    with pytest.raises(ValueError, match="not a GGML type wanlora reads"):
        quantize(torch.zeros(2, 256), "IQ4_XS")
