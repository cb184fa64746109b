"""GgufLinear: a linear layer over GGML blocks, with unfused LoRA terms beside its matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wanlora.weights.gguf import qtypes
from wanlora.weights.gguf.dequant import dequantize
from wanlora.weights.gguf.linear import GgufLinear, LoraTerm
from wanlora.weights.gguf.quantize import quantize

OUT, IN = 64, 512


def layer(qtype: qtypes.QType, seed: int = 0, bias: bool = True) -> GgufLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=generator) * 0.02
    return GgufLinear(quantize(weight, qtype), qtype, torch.randn(OUT, generator=generator) if bias else None)


def terms(seed: int = 1) -> list[LoraTerm]:
    generator = torch.Generator().manual_seed(seed)
    return [
        LoraTerm(torch.randn(OUT, 8, generator=generator), torch.randn(8, IN, generator=generator) * 0.1, 0.7),
        LoraTerm(torch.randn(OUT, 4, generator=generator), torch.randn(4, IN, generator=generator) * 0.1, -1.5),
        LoraTerm(torch.randn(OUT, IN, generator=generator) * 0.01, None, 0.5),  # a full delta
    ]


@pytest.mark.parametrize("qtype", [qtypes.Q4_K, qtypes.Q6_K, qtypes.Q8_0, qtypes.Q5_1, qtypes.F16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_is_the_dequantized_weights_matmul_in_the_inputs_dtype(qtype, dtype):
    linear = layer(qtype)
    x = torch.randn(3, 5, IN).to(dtype)
    want = F.linear(x, dequantize(linear.weight_blocks, qtype).to(dtype), linear.bias.to(dtype))
    got = linear(x)
    assert got.dtype == dtype and torch.equal(got, want)
    assert linear.in_features == IN and linear.out_features == OUT


def test_lora_terms_run_beside_the_matmul_exactly_and_clear_to_the_files_layer():
    linear = layer(qtypes.Q4_K)
    blocks = linear.weight_blocks.clone()
    x = torch.randn(7, IN, dtype=torch.float64).float()
    plain = linear(x)
    linear.set_lora_terms(terms())
    got = linear(x)
    # the LoRA's part, against fp64: nothing of it is lost to W0's rounding
    exact = sum(
        term.scale
        * (
            x.double() @ term.up.double().t()
            if term.down is None
            else x.double() @ term.down.double().t() @ term.up.double().t()
        )
        for term in terms()
    )
    assert torch.allclose((got - plain).double(), exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(linear.weight_blocks, blocks)  # the blocks untouched
    linear.clear_lora_terms()
    assert torch.equal(linear(x), plain) and linear.lora_terms() == []


def test_terms_are_checked_before_any_is_held():
    linear = layer(qtypes.Q8_0)
    linear.set_lora_terms(terms()[:1])
    wrong = LoraTerm(torch.zeros(OUT, 4), torch.zeros(4, IN + 32), 1.0)
    with pytest.raises(ValueError, match=r"down \(4, 512\) and up \(64, 4\)"):
        linear.set_lora_terms([terms()[1], wrong])
    with pytest.raises(ValueError, match="a full delta of"):
        linear.set_lora_terms([LoraTerm(torch.zeros(OUT, IN + 1), None, 1.0)])
    held = linear.lora_terms()
    assert len(held) == 1 and torch.equal(held[0].up, terms()[0].up)  # the held term untouched
    with pytest.raises(ValueError, match="whole blocks of 34 bytes"):
        GgufLinear(torch.zeros(OUT, 33, dtype=torch.uint8), qtypes.Q8_0)
    with pytest.raises(ValueError, match="a bias of 64 values"):
        GgufLinear(linear.weight_blocks, qtypes.Q8_0, torch.zeros(3))


def test_blocks_and_terms_move_with_the_module_and_only_the_blocks_are_state():
    linear = layer(qtypes.Q5_K)
    linear.set_lora_terms(terms())
    assert set(linear.state_dict()) == {"weight_blocks", "bias"}
    linear.to(torch.bfloat16)  # the blocks are bytes: a dtype cast leaves them alone
    assert linear.weight_blocks.dtype == torch.uint8 and linear.lora_terms()[0].up.dtype == torch.bfloat16
    linear.to("meta")
    assert linear.weight_blocks.is_meta and all(term.up.is_meta for term in linear.lora_terms())


def test_it_reports_its_bytes():
    linear = layer(qtypes.Q4_K)
    assert linear.weight_bytes == OUT * IN // 256 * 144  # 4.5 bits a weight
    assert linear.nbytes == linear.weight_bytes + OUT * 4
    linear.set_lora_terms(terms())
    assert linear.lora_bytes == 4 * (OUT * 8 + 8 * IN + OUT * 4 + 4 * IN + OUT * IN)
    assert linear.nbytes == linear.weight_bytes + OUT * 4 + linear.lora_bytes
    assert "Q4_K, 3 LoRA terms" in repr(linear)
    assert qtypes.Q4_K.bytes_per_weight == 4.5 / 8
