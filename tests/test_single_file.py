"""Single-file transformers as ComfyUI and Kijai publish them: full precision, fp8 and scaled fp8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.tiny import tiny_transformer
from wanlora.weights.checkpoint import FileTensor
from wanlora.weights.formats.fp8 import FP8_MAX, Fp8Linear, dequantize, fp8_layers

from .builders import CHECKPOINT_LAYOUTS, original_param_name, wan_checkpoint, write_lora
from .conftest import SMALL, recorded
from .lora_helpers import merge
from .test_fp8 import assert_same_bits, bits


def test_the_published_names_cover_every_parameter_of_every_wan21_transformer():
    from wanlora.models import CATALOGUE, tiny_architecture

    for variant in ("t2v-14b", "i2v-14b-480p", "flf2v-14b"):
        model = tiny_transformer(tiny_architecture(CATALOGUE[variant].arch))
        names = [original_param_name(name) for name in model.state_dict()]
        assert len(set(names)) == len(names)


@pytest.fixture(scope="module")
def style(tmp_path_factory):
    path = tmp_path_factory.mktemp("single-lora") / "style.safetensors"
    deltas = write_lora(path, tiny_transformer(), "original", seed=5)
    return str(path), deltas


def write_checkpoint(path, layout: str, prefix: str = "", seed: int = 0):
    save_file(wan_checkpoint(tiny_transformer(seed=seed), layout, prefix), str(path))
    return path


@pytest.mark.slow
def test_a_full_precision_file_is_the_transformer_it_holds(tmp_path):
    path = write_checkpoint(tmp_path / "wan2.1_t2v_tiny_fp32.safetensors", "full", "model.diffusion_model.")
    pipe = WanLoraPipeline.from_pretrained("tiny", transformer=path)
    assert not fp8_layers(pipe.transformer) and pipe.quantize is None
    assert_same_bits(pipe.transformer, bits(tiny_transformer()))
    same = WanLoraPipeline.from_pretrained("tiny").generate("a fox", seed=4, **SMALL)
    assert np.array_equal(pipe.generate("a fox", seed=4, **SMALL).frames, same.frames)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [layout for layout in CHECKPOINT_LAYOUTS if layout != "full"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["kijai-names", "comfy-names"])
def test_an_fp8_file_stays_fp8_and_loras_merge_onto_its_own_weights(tmp_path, style, layout, prefix):
    from safetensors.torch import load_file

    path = write_checkpoint(tmp_path / "t2v_tiny_fp8.safetensors", layout, prefix)
    stored = load_file(path)
    pipe = WanLoraPipeline.from_pretrained("tiny", transformer=path)
    assert pipe.quantize == "fp8"
    layers = fp8_layers(pipe.transformer)
    for name, layer in layers.items():
        key = prefix + original_param_name(name)
        assert torch.equal(layer.weight.view(torch.uint8), stored[key].view(torch.uint8)), name
        scale_key = next((k for k in (key[:-7] + ".scale_weight", key[:-7] + ".weight_scale") if k in stored), None)
        want = stored[scale_key].float() if scale_key else torch.tensor(1.0)
        assert torch.equal(layer.weight_scale, want.expand(layer.out_features)), name
    loaded = bits(pipe.transformer)

    pipe.set_loras([(style[0], 0.8)])
    merger = pipe.experts[0].loras.merger
    assert all(isinstance(merger.pristine[name], FileTensor) for name in layers if name in merger.pristine)
    reference = tiny_transformer()  # the same fp8 rows, W0 held in memory: the rule, by another path
    for name, layer in layers.items():
        module = name.removesuffix(".weight")
        parent, _, child = module.rpartition(".")
        original = reference.get_submodule(module)
        copy = Fp8Linear(loaded[name].view(torch.float8_e4m3fn).view(layer.weight.shape).clone(),
                         layer_scale(loaded, name), original.bias.detach(), "weight-only")  # fmt: skip
        setattr(reference.get_submodule(parent), child, copy)
    merge(LoraMerger(reference), [(read_lora(style[0]), 0.8)])
    assert_same_bits(pipe.transformer, bits(reference))
    for name, layer in layers.items():  # and it is quantize(dequantize(W0) + s * delta), rounded once
        if name in style[1]:
            w0 = dequantize(loaded[name].view(torch.float8_e4m3fn).view(layer.weight.shape), layer_scale(loaded, name))
            exact = w0.double() + 0.8 * style[1][name].double()
            assert torch.allclose(layer.weight_scale.double(), exact.abs().amax(dim=1) / FP8_MAX, rtol=1e-6)

    pipe.set_loras([])
    assert_same_bits(pipe.transformer, loaded)
    assert pipe.generate("a fox", seed=1, **SMALL).metadata["weights"] == "fp8"


def layer_scale(state_bits: dict[str, torch.Tensor], weight_name: str) -> torch.Tensor:
    return state_bits[weight_name.removesuffix("weight") + "weight_scale"].view(torch.float32).clone()


def test_a_wan22_pair_of_files_loads_each_expert(tmp_path):
    folder = tmp_path / "Wan2.2-T2V-A14B-fp8"
    folder.mkdir()
    write_checkpoint(folder / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "fp8-scaled", seed=0)
    write_checkpoint(folder / "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "fp8-scaled", seed=1)
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b", transformer=folder)
    high, low = (fp8_layers(expert.module)["blocks.0.attn1.to_q.weight"] for expert in pipe.experts)
    assert not torch.equal(high.weight.view(torch.uint8), low.weight.view(torch.uint8))
    assert pipe.generate("a fox", num_frames=5, num_inference_steps=2, seed=1, width=64, height=64).frames.std() > 0
    with pytest.raises(InvalidInput, match="the high-noise and the low-noise expert's files"):
        WanLoraPipeline.from_pretrained("tiny-t2v-a14b", transformer=next(folder.iterdir()))


def test_a_file_for_another_model_or_no_file_is_named(tmp_path):
    from wanlora.models import CATALOGUE, tiny_architecture

    other = tiny_transformer(tiny_architecture(CATALOGUE["ti2v-5b"].arch))
    path = tmp_path / "ti2v.safetensors"
    save_file(wan_checkpoint(other, "fp8-scaled"), str(path))
    with pytest.raises(InvalidInput, match=r"a tiny transformer file.*patch_embedding.weight"):
        WanLoraPipeline.from_pretrained("tiny", transformer=path)
    with pytest.raises(InvalidInput, match="a .safetensors transformer file, a folder holding one"):
        WanLoraPipeline.from_pretrained("tiny", transformer=tmp_path / "nowhere.safetensors")


def test_the_cli_takes_a_transformer_file(cli, tmp_path):
    path = write_checkpoint(tmp_path / "t2v_fp8.safetensors", "fp8-scaled", "model.diffusion_model.")
    out = tmp_path / "fp8.mp4"
    result = cli("generate", "a fox", "--model", "tiny", "--transformer", str(path), "--frames", "5", "--steps", "2",
                 "--width", "64", "--height", "64", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert recorded(out)["weights"] == "fp8"


# ------------------------------------------------------------------ numbers not taken on their word


def scaled_file(tmp_path, layout: str = "fp8-scaled", edit=None, name: str = "wan_fp8_scaled.safetensors"):
    """A tiny scaled-fp8 file (`layout` of tests/builders.py), its tensors changed by `edit(tensors)` first."""
    tensors = wan_checkpoint(tiny_transformer(), layout)
    if edit is not None:
        edit(tensors)
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


Q = "blocks.0.self_attn.q"


def per_row(tensors, key: str = f"{Q}.scale_weight", value: float | None = None, row: int = 3) -> None:
    """The scale of `key`'s weight as one per row (its own value each), row `row` set to `value` when given."""
    rows = tensors[key.rsplit(".", 1)[0] + ".weight"].shape[0]
    scales = tensors[key].float().expand(rows).clone()
    if value is not None:
        scales[row] = value
    tensors[key] = scales


BAD_NUMBERS = {
    "one-scale-missing": (lambda t: t.pop(f"{Q}.scale_weight"), f"{Q}.weight is torch.float8_e4m3fn with no scale"),
    "marked-no-scales": (
        lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".scale_weight")]],
        "marked scaled_fp8 .* but holds no scale_weight",
    ),
    "nan": (lambda t: t.__setitem__(f"{Q}.scale_weight", torch.tensor(float("nan"))), f"{Q}.scale_weight is NaN"),
    "zero": (lambda t: t.__setitem__(f"{Q}.scale_weight", torch.tensor(0.0)), f"{Q}.scale_weight is zero"),
    "negative": (lambda t: t.__setitem__(f"{Q}.scale_weight", torch.tensor(-0.01)), f"{Q}.scale_weight is negative"),
    "infinite": (lambda t: t.__setitem__(f"{Q}.scale_weight", torch.tensor(float("inf"))), "is infinite"),
    "per-row-nan": (lambda t: per_row(t, value=float("nan")), f"{Q}.scale_weight is NaN"),
    "per-row-zero": (lambda t: per_row(t, value=0.0), f"{Q}.scale_weight is zero"),
    "per-row-negative": (lambda t: per_row(t, value=-1.0), f"{Q}.scale_weight is negative"),
    "wrong-count": (
        lambda t: t.__setitem__(f"{Q}.scale_weight", torch.ones(5)),
        f"{Q}.scale_weight has 5 values, for a weight of 24 rows",
    ),
    "per-column-shape": (  # (1, rows) holds one value per row, but torch's broadcast would scale columns
        lambda t: t.__setitem__(f"{Q}.scale_weight", torch.ones(1, 24)),
        f"{Q}.scale_weight has shape \\[1, 24\\]: one per row of its weight is \\[24\\] or \\[24, 1\\]",
    ),
    "integer-scale": (
        lambda t: t.__setitem__(f"{Q}.scale_weight", torch.tensor(1, dtype=torch.int32)),
        f"{Q}.scale_weight is I32, not a floating-point scale",
    ),
    "integer-weight": (
        lambda t: t.__setitem__("blocks.1.ffn.2.weight", t["blocks.1.ffn.2.weight"].view(torch.uint8).clone()),
        "blocks.1.ffn.2.weight holds U8 values",
    ),
    "fp8-nan-code": (
        lambda t: t[f"{Q}.weight"].view(torch.uint8).__setitem__((2, 5), 0x7F),
        f"{Q}.weight holds fp8 NaN codes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_an_fp8_file_whose_numbers_are_wrong_is_refused_naming_the_tensor(tmp_path, case):
    edit, words = BAD_NUMBERS[case]
    path = scaled_file(tmp_path, edit=edit)
    with pytest.raises(InvalidInput, match=f"transformer=.* is not allowed: a file whose numbers load right.*{words}"):
        WanLoraPipeline.from_pretrained("tiny", transformer=path)


def test_a_comfy_quant_file_in_a_format_wanlora_does_not_read_is_refused_naming_it(tmp_path):
    import json

    def nvfp4(tensors):
        tensors[f"{Q}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)

    path = scaled_file(tmp_path, "fp8-comfy-quant", nvfp4)
    with pytest.raises(InvalidInput, match=f"{Q}.comfy_quant names the 'nvfp4' quantization, which wanlora does not"):
        WanLoraPipeline.from_pretrained("tiny", transformer=path)


@pytest.mark.parametrize(
    "entry, words",
    [
        (b"[" * 4000, "is not ComfyUI's JSON quantization entry"),  # nested past the parser's recursion limit
        (b" " * 5000, "is 5000 bytes, not ComfyUI's JSON quantization entry"),  # a header may say gigabytes
    ],
)
def test_a_comfy_quant_entry_that_is_not_a_small_json_object_is_refused_naming_it(tmp_path, entry, words):
    def comfy_quant(tensors):
        tensors[f"{Q}.comfy_quant"] = torch.frombuffer(bytearray(entry), dtype=torch.uint8)

    path = scaled_file(tmp_path, "fp8-comfy-quant", comfy_quant)
    with pytest.raises(InvalidInput, match=f"{Q}.comfy_quant {words}"):
        WanLoraPipeline.from_pretrained("tiny", transformer=path)


def test_per_row_scales_load_row_by_row(tmp_path):
    """lightx2v-style per-channel scales: each row is its stored values times its own scale."""
    from safetensors.torch import load_file

    def rows(tensors):
        weight = tensors[f"{Q}.weight"]
        tensors[f"{Q}.scale_weight"] = torch.linspace(1e-4, 3e-3, weight.shape[0])

    path = scaled_file(tmp_path, edit=rows)
    stored = load_file(path)
    layer = fp8_layers(WanLoraPipeline.from_pretrained("tiny", transformer=path).transformer)[
        "blocks.0.attn1.to_q.weight"
    ]
    assert torch.equal(layer.weight_scale, stored[f"{Q}.scale_weight"])
    assert torch.equal(layer.weight.view(torch.uint8), stored[f"{Q}.weight"].view(torch.uint8))


# ------------------------------------------------------------------ Kijai's e5m2 files, and files of mixed precision


@pytest.mark.slow
def test_an_e5m2_file_runs_as_stored_and_loras_merge_onto_it(tmp_path, style, caplog):
    """Kijai's `_fp8_e5m2` files: block linears cast to float8_e5m2. They stay e5m2, at a byte a weight."""
    import logging

    full = tiny_transformer()
    tensors = wan_checkpoint(full, "full")
    for key in [k for k in tensors if k.startswith("blocks.") and k.endswith(".weight") and tensors[k].dim() == 2]:
        tensors[key] = tensors[key].to(torch.float8_e5m2)
    path = tmp_path / "Wan2_1-T2V-tiny_fp8_e5m2.safetensors"
    save_file(tensors, str(path))
    caplog.set_level(logging.INFO, logger="wanlora")
    pipe = WanLoraPipeline.from_pretrained("tiny", transformer=path)
    layers = fp8_layers(pipe.transformer)
    assert layers and all(layer.weight.dtype == torch.float8_e5m2 for layer in layers.values())
    assert pipe.quantize == "fp8" and "block linears in float8_e5m2" in caplog.text
    for name, layer in layers.items():
        assert torch.equal(layer.weight.view(torch.uint8), tensors[original_param_name(name)].view(torch.uint8))
    linear_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())
    assert linear_bytes == sum(layer.weight.numel() for layer in layers.values())  # one byte a weight, not four
    loaded = bits(pipe.transformer)
    video = pipe.generate("a fox", seed=4, **SMALL)
    reference = WanLoraPipeline.from_pretrained("tiny").generate("a fox", seed=4, **SMALL)
    error = np.mean((video.frames.astype(float) - reference.frames.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / max(error, 1e-12)) > 25  # e5m2's 2 mantissa bits: near, not equal

    pipe.set_loras([(style[0], 0.8)])
    changed = [
        name
        for name, layer in layers.items()
        if not torch.equal(layer.weight.view(torch.uint8).flatten(), loaded[name])
    ]
    assert changed and all(layers[name].weight.dtype == torch.float8_e5m2 for name in changed)
    for name in changed:  # quantize(W0 + s * delta) in e5m2: scales from the sum's amax over e5m2's maximum
        w0 = tensors[original_param_name(name)].float()
        exact = w0.double() + 0.8 * style[1][name].double()
        assert torch.allclose(layers[name].weight_scale.double(), exact.abs().amax(dim=1) / 57344.0, rtol=1e-6)
    pipe.set_loras([])
    assert_same_bits(pipe.transformer, loaded)


def test_block_linears_an_author_left_in_bf16_keep_their_dtype_unless_asked(tmp_path):
    tensors = wan_checkpoint(tiny_transformer(), "fp8-scaled")
    kept = "blocks.1.ffn.0.weight"  # left in full precision on purpose, as some published files do
    reference = wan_checkpoint(tiny_transformer(), "full")
    tensors[kept] = reference[kept].to(torch.bfloat16)
    tensors.pop("blocks.1.ffn.0.scale_weight")
    path = tmp_path / "mixed_fp8_scaled.safetensors"
    save_file(tensors, str(path))
    pipe = WanLoraPipeline.from_pretrained("tiny", transformer=path)
    layer = pipe.transformer.blocks[1].ffn.net[0].proj
    assert type(layer) is torch.nn.Linear and torch.equal(layer.weight, reference[kept].to(torch.bfloat16).float())
    assert "blocks.0.attn1.to_q.weight" in fp8_layers(pipe.transformer)
    asked = WanLoraPipeline.from_pretrained("tiny", transformer=path, quantize="fp8")
    assert "blocks.1.ffn.net.0.proj.weight" in fp8_layers(asked.transformer)
