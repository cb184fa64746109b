"""GGUF as a weight format: `.gguf` transformers load into GgufLinear layers, and take LoRAs unfused,
requantized or promoted, each swapped back to the file's own weights exactly."""

from __future__ import annotations

import pytest
import torch

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.models import tiny_spec
from wanlora.pairs import expert_of
from wanlora.tiny import tiny_transformer
from wanlora.weights.formats.gguf import FORMAT
from wanlora.weights.gguf.dequant import dequantize
from wanlora.weights.gguf.linear import GgufLinear
from wanlora.weights.gguf.quantize import quantize
from wanlora.weights.gguf.reader import read_transformer

from .builders import write_lora
from .conftest import SMALL
from .gguf_files import file_name, write_pair, write_transformer

SPEC = tiny_spec(kind="t2v", wide=True)
STEP = {**SMALL, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny wide model's folder, its transformer as city96's Q4_K_M file, and two LoRAs for it."""
    from wanlora.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("gguf-format")
    folder = write_tiny_model(root / "wide", kind="t2v", wide=True)
    model = tiny_transformer(SPEC.arch, seed=3)
    gguf = write_transformer(root / file_name("Q4_K_M"), model, "Q4_K_M")
    a = write_lora(root / "a.safetensors", model, "original", seed=1)
    b = write_lora(root / "b.safetensors", model, "full-deltas", seed=2)
    return {"folder": folder, "gguf": gguf, "a": root / "a.safetensors", "b": root / "b.safetensors", "da": a, "db": b}


def load(files, **options) -> WanLoraPipeline:
    return WanLoraPipeline.from_pretrained(str(files["folder"]), transformer=str(files["gguf"]), **options)


def blocks(pipe) -> dict[str, torch.Tensor]:
    return {name: layer.weight_blocks.clone() for name, layer in FORMAT.layers(pipe.transformer).items()}


def forward(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 2, 4, 4, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "return_dict": False,
    }
    with torch.no_grad():
        return pipe.transformer(**inputs)[0]


def test_a_gguf_transformer_loads_its_blocks_as_the_file_holds_them_and_generates(files):
    pipe = load(files)
    read = read_transformer(files["gguf"], SPEC)
    layers = FORMAT.layers(pipe.transformer)
    assert len(layers) == 20 and all(isinstance(layer, GgufLinear) for layer in layers.values())
    for name, layer in layers.items():
        assert torch.equal(layer.weight_blocks, read.tensors[name].data), name
    assert {str(layer.qtype) for layer in layers.values()} == {"Q4_K", "Q6_K"}  # Q4_K_M's mix
    assert pipe.quantize == "gguf"
    video = pipe.generate("a fox", seed=1, **STEP)
    assert video.frames.shape == (9, 48, 64, 3) and video.metadata["weights"] == "gguf"


def test_loras_are_unfused_by_default_exact_beside_the_blocks_and_come_off_bitwise(files):
    pipe = load(files)
    before, out = blocks(pipe), forward(pipe)
    pipe.set_loras([(str(files["a"]), 0.7), (str(files["b"]), -0.5)])
    layers = FORMAT.layers(pipe.transformer)
    assert all(torch.equal(layers[n].weight_blocks, w) for n, w in before.items())  # the blocks untouched
    touched = set(files["da"]) | set(files["db"])
    assert any(layers[n].lora_terms() for n in layers) and all(
        bool(layers[n].lora_terms()) == (n in touched) for n in layers
    )
    name = next(n for n in files["da"] if n in layers and n in files["db"])
    layer = layers[name]
    x = torch.randn(3, layer.in_features)
    w0 = dequantize(layer.weight_blocks, layer.qtype)
    want = x @ (w0 + 0.7 * files["da"][name] - 0.5 * files["db"][name]).T + layer.bias
    assert torch.allclose(layer(x), want, atol=1e-5)  # y = x W0^T + sum s x dW^T: the LoRA's part exact
    assert not torch.equal(forward(pipe), out)
    pipe.set_loras([])
    assert torch.equal(forward(pipe), out) and not any(layer.lora_terms() for layer in layers.values())


@pytest.mark.parametrize("extra", [(-1,), (0,)], ids=["trailing", "leading"])
def test_an_unfused_full_delta_with_an_axis_of_one_applies_at_its_weights_shape(files, tmp_path, extra):
    """A delta that fits give or take dimensions of 1 goes beside the matmul at W's shape, not its own."""
    from safetensors.torch import save_file

    pipe = load(files)
    layer = FORMAT.layers(pipe.transformer)["blocks.0.ffn.net.0.proj.weight"]
    delta = torch.randn(layer.out_features, layer.in_features) * 0.01
    save_file({"diffusion_model.blocks.0.ffn.0.diff": delta.unsqueeze(extra[0])}, tmp_path / "d.safetensors")
    pipe.set_loras([(str(tmp_path / "d.safetensors"), 0.5)])
    x = torch.randn(3, layer.in_features)
    want = x @ (dequantize(layer.weight_blocks, layer.qtype) + 0.5 * delta).T + layer.bias
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_requantize_merges_into_each_tensors_own_type_history_free(files):
    from wanlora.lora.layouts import read_lora

    pipe = load(files, lora_mode="requantize")
    file_blocks = blocks(pipe)
    pipe.set_loras([(str(files["b"]), 1.0)])
    pipe.set_loras([(str(files["a"]), 0.7)])
    layers = FORMAT.layers(pipe.transformer)
    deltas = read_lora(files["a"]).deltas
    for name, layer in layers.items():
        if name not in deltas:
            assert torch.equal(layer.weight_blocks, file_blocks[name]), name  # untouched: the file's bytes
            continue
        summed = dequantize(file_blocks[name], layer.qtype)  # from the file's own bytes, whatever came before
        deltas[name].row_adder(summed.shape, summed.device)(summed, 0, summed.shape[0], 0.7)  # the merge's sum
        assert torch.equal(layer.weight_blocks, quantize(summed, layer.qtype)), name  # rounded once, its own type
        assert not layer.lora_terms() and layer.promoted is None
        w0 = dequantize(file_blocks[name], layer.qtype)
        kept = dequantize(layer.weight_blocks, layer.qtype) - w0
        assert torch.sum(kept * files["da"][name]) > 0  # the LoRA's change is there, as far as Q4_K/Q6_K keep it
    pipe.set_loras([])
    assert all(torch.equal(layers[n].weight_blocks, w) for n, w in file_blocks.items())


def test_promote_computes_touched_layers_in_bf16_and_restores_the_blocks(files):
    pipe = load(files, lora_mode="promote")
    file_blocks, out = blocks(pipe), forward(pipe)
    pipe.set_loras([(str(files["a"]), 0.7)])
    layers = FORMAT.layers(pipe.transformer)
    for name, layer in layers.items():
        assert torch.equal(layer.weight_blocks, file_blocks[name]), name
        if name not in files["da"]:
            assert layer.promoted is None, name
            continue
        want = (dequantize(layer.weight_blocks, layer.qtype) + 0.7 * files["da"][name]).to(torch.bfloat16)
        assert layer.promoted.dtype == torch.bfloat16
        assert (layer.promoted.float() - want.float()).abs().max() <= want.float().abs().max() * 2**-8, name
    pipe.set_loras([])
    assert all(layer.promoted is None for layer in layers.values()) and torch.equal(forward(pipe), out)


def test_an_unknown_or_unoffered_lora_mode_is_refused_before_loading(files):
    with pytest.raises(InvalidInput, match=r"lora_mode='fused' is not allowed: one of requantize, unfused, promote"):
        load(files, lora_mode="fused")
    with pytest.raises(InvalidInput, match="lora_mode='unfused' is not allowed: a model whose weights offer it"):
        WanLoraPipeline.from_pretrained(str(files["folder"]), lora_mode="unfused")


def test_a_quantstack_wan22_pair_of_gguf_files_loads_as_its_two_experts(tmp_path):
    from wanlora.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / "a14b", kind="t2v-a14b", wide=True)
    spec = tiny_spec(kind="t2v-a14b", wide=True)
    high, low = tiny_transformer(spec.arch, seed=4), tiny_transformer(spec.arch, seed=5)
    written = write_pair(tmp_path / "pair", high, low, "Q8_0", kind="t2v")
    assert [expert_of(path.name) for path in written.values()] == ["high", "low"]  # -HighNoise-, -LowNoise-
    pipe = WanLoraPipeline.from_pretrained(str(folder), transformer=str(tmp_path / "pair"))
    for expert, path in zip(pipe.experts, (written["high"], written["low"]), strict=True):
        read = read_transformer(path, spec)
        layers = FORMAT.layers(expert.module)
        assert layers and all(torch.equal(layer.weight_blocks, read.tensors[n].data) for n, layer in layers.items())


def test_the_cli_takes_a_gguf_transformer(files, cli, tmp_path):
    out = tmp_path / "v.mp4"
    run = cli(
        "generate", "a fox", "--model", str(files["folder"]), "--transformer", str(files["gguf"]),
        "--lora", f"{files['a']}:0.5", "--lora-mode", "requantize", "--width", "64", "--height", "48",
        "--frames", "9", "--steps", "1", "-o", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    ("kind", "ftype", "publisher"), [("i2v", "Q4_K_S", "city96"), ("ti2v-5b", "Q8_0", "quantstack")]
)
def test_image_to_video_and_ti2v_5b_gguf_files_generate_with_an_image_and_a_lora(tmp_path, kind, ftype, publisher):
    """Wan2.1 I2V (its image branch's k_img and v_img quantized too) and TI2V-5B (QuantStack's F16 small tensors)."""
    import numpy as np

    from wanlora.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / kind, kind=kind, wide=True)
    spec = tiny_spec(kind=kind, wide=True)
    model = tiny_transformer(spec.arch, seed=6)
    gguf = write_transformer(tmp_path / f"{kind}-{ftype}.gguf", model, ftype, publisher)
    deltas = write_lora(tmp_path / "a.safetensors", model, "original", seed=7)
    pipe = WanLoraPipeline.from_pretrained(str(folder), transformer=str(gguf))
    layers = FORMAT.layers(pipe.transformer)
    read = read_transformer(gguf, spec)
    quantized = {n for n, value in read.tensors.items() if hasattr(value, "qtype") and n.startswith("blocks.")}
    assert set(layers) == quantized and any(".add_k_proj." in n for n in layers) == (kind == "i2v")
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    size = {**STEP, "width": 64, "height": 64}  # TI2V-5B takes sides in multiples of 32
    video = pipe.generate("a fox", image=image, loras=[(str(tmp_path / "a.safetensors"), 0.5)], seed=1, **size)
    assert video.frames.shape[1:] == (64, 64, 3)
    assert any(layers[n].lora_terms() for n in deltas if n in layers)


PUBLISHED = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S")  # city96's, QuantStack's


@pytest.mark.slow  # three loads a type
@pytest.mark.parametrize("ftype", PUBLISHED)
def test_every_published_type_generates_and_takes_loras_each_way_and_gives_the_file_back(files, tmp_path, ftype):
    gguf = write_transformer(tmp_path / file_name(ftype), tiny_transformer(SPEC.arch, seed=3), ftype)
    lora = [(str(files["a"]), 0.7)]
    for mode in ("unfused", "requantize", "promote"):
        pipe = WanLoraPipeline.from_pretrained(str(files["folder"]), transformer=str(gguf), lora_mode=mode)
        file_blocks, out = blocks(pipe), forward(pipe)
        pipe.set_loras(lora)
        assert not torch.equal(forward(pipe), out), mode  # the LoRA is felt
        if mode == "requantize":  # history-free: another LoRA first changes nothing of the result
            merged = blocks(pipe)
            pipe.set_loras([(str(files["b"]), 1.0)])
            pipe.set_loras(lora)
            assert all(torch.equal(w, merged[n]) for n, w in blocks(pipe).items()), mode
        video = pipe.generate("a fox", seed=1, loras=lora, **STEP)
        assert video.frames.shape == (9, 48, 64, 3)
        pipe.set_loras([])
        assert all(torch.equal(w, file_blocks[n]) for n, w in blocks(pipe).items()), mode
        assert torch.equal(forward(pipe), out), mode  # the file's own model again, bitwise


def test_a_gguf_model_is_not_saved_merged_and_the_refusal_says_why(files, tmp_path):
    with pytest.raises(InvalidInput, match="stored as gguf; load it in full precision"):
        load(files).save_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())
