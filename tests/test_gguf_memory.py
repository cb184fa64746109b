"""Memory plans for GGUF files' types: bytes from each layer's own type, a decoded weight per call, held to
traced peaks on `meta`; Wan2.1 14B Q4_K_M with a rank-32 LoRA on every block linear fits a 16 GB card."""

from __future__ import annotations

import pytest
import torch

from wanlora.models import CATALOGUE
from wanlora.runtime.memory import (
    GPU_SIZES_GB,
    HELD_BYTES,
    Sizes,
    blocks_of_one,
    catalogue_sizes,
    default_size,
    format_plans,
    plan_memory,
    step_activations,
    tensor_bytes,
)
from wanlora.weights import formats
from wanlora.weights.formats.gguf import FORMAT
from wanlora.weights.gguf.linear import GgufLinear, LoraTerm

from .tracing import meta_transformer, traced_peak, transformer_inputs

GIB = 2**30
RANK = 32


def with_lora(model: torch.nn.Module, rank: int = RANK) -> torch.nn.Module:
    """Every GGUF block linear with an unfused rank-`rank` LoRA term in bf16, on `meta`."""
    for layer in FORMAT.layers(model).values():
        assert isinstance(layer, GgufLinear)
        up = torch.empty(layer.out_features, rank, dtype=torch.bfloat16, device="meta")
        down = torch.empty(rank, layer.in_features, dtype=torch.bfloat16, device="meta")
        layer.set_lora_terms([LoraTerm(up, down, 1.0)])
    return model


def test_a_gguf_plans_bytes_are_each_layers_own_type():
    """t2v-14b Q4_K_M: Q4_K everywhere but the v projections and the FFN's second linear (Q6_K); every other
    tensor decoded to bf16. Counted from the full-depth model on `meta`."""
    spec = CATALOGUE["t2v-14b"]
    sizes = catalogue_sizes(spec, "gguf-Q4_K_M")
    model = meta_transformer(spec, "gguf-Q4_K_M")
    layers = FORMAT.layers(model)
    assert len(layers) == 400
    kinds = {str(layer.qtype) for name, layer in layers.items() if ".to_v." in name or ".ffn.net.2." in name}
    assert kinds == {"Q6_K"} and {str(layer.qtype) for layer in layers.values()} == {"Q4_K", "Q6_K"}
    assert sizes.weights["transformer"] == tensor_bytes(model)
    linears = sum(layer.weight_blocks.numel() for layer in layers.values())
    weights = sum(layer.in_features * layer.out_features for layer in layers.values())
    assert 0.56 < linears / weights < 0.66  # 4.5 bits a weight, 6.56 for the Q6_K ones
    assert 9.5e9 < sizes.weights["transformer"] < 9.9e9  # the published t2v-14b Q4_K_M: 9.66 GB


def test_every_gguf_plan_is_made_for_the_smaller_cards_too():
    plans = format_plans("gguf")
    entry = formats.BY_NAME["gguf"]
    assert len(plans) == len(CATALOGUE) * len(entry.plans) * (len(GPU_SIZES_GB) + 2)
    assert {p.gpu_bytes // GIB for p in plans} == {12, 16, *GPU_SIZES_GB}
    fits_16 = {(p.variant, p.weights) for p in plans if p.gpu_bytes == 16 * GIB and p.fits}
    assert {(v, "gguf-Q4_K_M") for v in CATALOGUE} <= fits_16


@pytest.mark.parametrize(("variant", "plan"), [("t2v-14b", "gguf-Q4_K_M"), ("ti2v-5b", "gguf-Q8_0")])
def test_the_denoise_steps_stated_activations_cover_its_trace_with_a_lora_beside_every_linear(variant, plan):
    """Two blocks at the real width, the default size: the decoded weight of each call and the LoRA terms'
    activations are within what the plan states (a block's peak is the transformer's: tests/test_memory_plan)."""
    spec = CATALOGUE[variant]
    size = default_size(spec)
    model = with_lora(meta_transformer(spec, plan, num_layers=2))
    inputs = transformer_inputs(spec, *size)
    traced = traced_peak(lambda: model(**inputs, return_dict=False))
    stated = step_activations(spec, "denoise", size, plan, False)
    assert traced <= stated <= 1.25 * traced + 2**28, (traced, stated)


def test_wan21_14b_q4_k_m_with_a_rank_32_lora_on_every_block_linear_fits_a_16_gb_card():
    """The weights with the LoRA's terms counted on the GPU (0.3 GB in bf16), every stage within 90% of 16 GB."""
    spec = CATALOGUE["t2v-14b"]
    plain = catalogue_sizes(spec, "gguf-Q4_K_M")
    one_block = with_lora(meta_transformer(spec, "gguf-Q4_K_M", num_layers=1))
    lora_per_block = sum(layer.lora_bytes for layer in FORMAT.layers(blocks_of_one(one_block)).values())
    assert 7.5e6 < lora_per_block < 7.9e6  # 32 x (8 x (5120 + 5120) + 2 x (5120 + 13824)) x 2 bytes
    lora = spec.arch.num_layers * lora_per_block
    sizes = Sizes(
        {**plain.weights, "transformer": plain.weights["transformer"] + lora},
        plain.text_window,
        plain.text_leaf_window,
        plain.transformer_window + 2 * lora_per_block,
    )
    plan = plan_memory(spec, 16 * GIB, "gguf-Q4_K_M", sizes)
    assert plan.fits, plan.as_dict()
    for stage in ("encode", "denoise", "decode"):
        assert max(step.peak_bytes for step in plan.stage(stage)) <= plan.budget_bytes, stage
    denoise = next(step for step in plan.steps if step.name == "denoise")
    assert denoise.peak_bytes == denoise.weight_bytes + denoise.activation_bytes + HELD_BYTES
    assert "transformer" in denoise.resident and denoise.weight_bytes >= sizes.weights["transformer"]
    assert plan_memory(spec, 16 * GIB, "bf16").mode not in ("none", "encoder")  # bf16 must stream its blocks


def test_the_cli_prints_the_gguf_plans_on_their_own_and_only_with_memory(cli):
    run = cli("models", "--memory", "--format", "gguf")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("| variant | weights | GB | 12 GB GPU | 16 GB GPU | 24 GB GPU")
    assert len(lines) == 2 + len(CATALOGUE) * len(formats.BY_NAME["gguf"].plans)
    row = next(line for line in lines if line.startswith("| `t2v-14b` | gguf-Q4_K_M |"))
    assert "does not fit" not in row.split("|")[5]  # the 16 GB card
    assert cli("models", "--format", "gguf").returncode == 2
