"""Single-file transformers as ComfyUI and Kijai publish them: full precision, fp8 and scaled fp8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.checkpoint import FileTensor
from wanlora.fp8 import FP8_MAX, Fp8Linear, dequantize, fp8_layers
from wanlora.lora.formats import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.tiny import tiny_transformer

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


def test_a_full_precision_file_is_the_transformer_it_holds(tmp_path):
    path = write_checkpoint(tmp_path / "wan2.1_t2v_tiny_fp32.safetensors", "full", "model.diffusion_model.")
    pipe = WanLoraPipeline.from_pretrained("tiny", transformer=path)
    assert not fp8_layers(pipe.transformer) and pipe.quantize is None
    assert_same_bits(pipe.transformer, bits(tiny_transformer()))
    same = WanLoraPipeline.from_pretrained("tiny").generate("a fox", seed=4, **SMALL)
    assert np.array_equal(pipe.generate("a fox", seed=4, **SMALL).frames, same.frames)


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
