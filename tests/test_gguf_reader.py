"""GGUF Wan transformers as city96 and QuantStack publish them: read, checked, and never left in a file mapping."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wanlora.errors import InvalidInput, ModelNotFound
from wanlora.models import tiny_spec
from wanlora.tiny import tiny_transformer
from wanlora.weights.gguf import qtypes
from wanlora.weights.gguf.reader import QuantizedTensor, read_transformer
from wanlora.weights.held_file import CheckpointChanged

from .gguf_files import FTYPES, encode, file_name, gguf_tensors, set_tensor_type, write_gguf, write_pair
from .gguf_files import write_transformer as write_file

SPEC = tiny_spec(kind="t2v", wide=True)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(SPEC.arch)


def diffusers_of(original: str) -> str:
    from wanlora.weights.gguf.reader import diffusers_names

    return {key: name for name, key in diffusers_names(None, [original]).items()}[original]


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_every_published_ftype_reads_with_each_tensor_in_its_own_type_and_bytes(tmp_path, model, ftype):
    path = write_file(tmp_path / file_name(ftype), model, ftype)
    written = gguf_tensors(model, ftype)
    read = read_transformer(path, SPEC)
    assert set(read.tensors) == set(dict(model.named_parameters()))
    for key, value, kind in written:
        name = diffusers_of(key)
        got = read.tensors[name]
        assert read.sources[name].name == key and read.sources[name].type_name() == kind
        want = np.ascontiguousarray(encode(value, kind))
        if isinstance(got, QuantizedTensor):
            assert got.qtype.name == kind and got.shape == tuple(value.shape)
            assert np.array_equal(got.data.numpy(), want.reshape(got.data.shape)), key
            assert got.dequantize().shape == value.shape
        else:
            assert (
                str(got.dtype).removeprefix("torch.") == {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[kind]
            )
            assert np.array_equal(got.view(-1).view(torch.uint8).numpy(), want.view(np.uint8).reshape(-1)), key
    assert read.tensors["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)  # F32, its 5 dimensions
    assert read.sources["patch_embedding.weight"].type_name() == "F32"
    assert read.tensors["blocks.0.scale_shift_table"].shape == (1, 6, 256)


def test_the_type_mix_is_per_tensor_as_llama_quantize_makes_it(tmp_path, model):
    read = read_transformer(write_file(tmp_path / "wan2.1-t2v-14b-Q4_K_S.gguf", model, "Q4_K_S"), SPEC)
    kinds = {name: info.type_name() for name, info in read.sources.items()}
    assert kinds["blocks.0.attn1.to_q.weight"] == "Q4_K" and kinds["blocks.1.ffn.net.2.weight"] == "Q5_K"
    assert [kinds[f"blocks.{b}.{a}.to_v.weight"] for b in (0, 1) for a in ("attn1", "attn2")] == ["Q5_K"] * 4
    assert kinds["condition_embedder.text_embedder.linear_1.weight"] == "F16" and kinds["proj_out.weight"] == "F16"
    assert kinds["blocks.0.norm2.weight"] == "F32" and kinds["scale_shift_table"] == "F32"
    assert read.types() == {"F32": 43, "F16": 6, "Q4_K": 14, "Q5_K": 6}


def test_a_quantstack_wan22_pair_reads_each_expert(tmp_path):
    spec = tiny_spec(kind="i2v-a14b", wide=True)
    high, low = tiny_transformer(spec.arch, seed=1), tiny_transformer(spec.arch, seed=2)
    paths = write_pair(tmp_path, high, low, "Q4_K_M")
    assert paths["high"].relative_to(tmp_path).as_posix() == "HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf"
    assert paths["low"].relative_to(tmp_path).as_posix() == "LowNoise/Wan2.2-I2V-A14B-LowNoise-Q4_K_M.gguf"
    for expert, model in (("high", high), ("low", low)):
        read = read_transformer(paths[expert], spec)
        assert read.sources["blocks.0.scale_shift_table"].type_name() == "F16"  # QuantStack: 2-byte small tensors
        assert torch.equal(read.tensors["blocks.0.norm2.bias"], model.blocks[0].norm2.bias.half())
        weight = read.tensors["blocks.1.attn1.to_k.weight"]
        assert isinstance(weight, QuantizedTensor) and weight.qtype == qtypes.Q4_K
        error = (weight.dequantize() - model.blocks[1].attn1.to_k.weight.detach()).norm() / weight.dequantize().norm()
        assert float(error) < 0.1


def test_wan21_image_to_video_and_ti2v_5b_files_read(tmp_path):
    i2v = tiny_spec(kind="i2v", wide=True)
    read = read_transformer(
        write_file(tmp_path / "wan2.1-i2v-14b-480p-Q4_K_M.gguf", tiny_transformer(i2v.arch), "Q4_K_M"), i2v
    )
    kinds = {name: info.type_name() for name, info in read.sources.items()}
    assert kinds["blocks.0.attn2.add_v_proj.weight"] == "Q4_K"  # v_img is not a `.v.weight`: the default type
    assert kinds["blocks.0.attn2.to_v.weight"] == "Q6_K"
    assert kinds["condition_embedder.image_embedder.ff.net.0.proj.weight"] in ("F16", "F32")
    ti2v = tiny_spec(kind="ti2v-5b", wide=True)
    path = write_file(tmp_path / file_name("Q8_0", "quantstack"), tiny_transformer(ti2v.arch), "Q8_0", "quantstack")
    assert path.name == "Wan2.2-TI2V-5B-Q8_0.gguf"
    assert read_transformer(path, ti2v).tensors["patch_embedding.weight"].shape == (256, 48, 1, 2, 2)


def test_other_converters_names_and_flat_modulations_read(tmp_path, model):
    path = write_file(tmp_path / "sdcpp.gguf", model, "Q8_0", flat_modulation=True, prefix="model.diffusion_model.")
    read = read_transformer(path, SPEC)
    assert read.sources["blocks.0.scale_shift_table"].shape == (6, 256)
    assert torch.equal(read.tensors["blocks.0.scale_shift_table"], model.blocks[0].scale_shift_table.detach())


def test_the_wide_tiny_folder_is_known_by_its_config(tmp_path):
    from wanlora.models import resolve_model
    from wanlora.tiny import write_tiny_model

    folder = write_tiny_model(tmp_path / "wide", kind="t2v", wide=True)
    spec = resolve_model(str(folder))
    assert spec.name == "tiny-wide" and spec.arch == SPEC.arch and spec.arch.dim == 256 and spec.arch.ffn_dim == 256


# ------------------------------------------------------------------------------------ files refused


def refused(path, spec=SPEC) -> str:
    with pytest.raises(InvalidInput) as caught:
        read_transformer(path, spec)
    assert str(path) in str(caught.value)
    return str(caught.value)


def test_a_file_for_another_architecture_or_none_is_refused(tmp_path, model):
    tensors = gguf_tensors(model, "Q8_0")
    assert "architecture 'flux'" in refused(write_gguf(tmp_path / "flux.gguf", tensors, 7, "flux"))
    assert "no general.architecture" in refused(write_gguf(tmp_path / "none.gguf", tensors, 7, None))
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "not a GGUF file" in refused(other)
    with pytest.raises(ModelNotFound, match="cannot read"):
        read_transformer(tmp_path / "missing.gguf", SPEC)


def test_a_cut_short_file_is_refused_naming_the_tensors_past_its_end(tmp_path, model):
    path = write_file(tmp_path / "cut.gguf", model, "Q4_K_M")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 70_000])
    message = refused(path)
    assert "past the file's end" in message and "proj_out.weight" not in message and "head.head.weight" in message
    path.write_bytes(whole[:300])  # inside the header
    assert "header" in refused(path)


def test_a_type_wanlora_does_not_read_is_refused_naming_the_tensor(tmp_path, model):
    path = write_file(tmp_path / "odd.gguf", model, "Q8_0")
    set_tensor_type(path, "blocks.1.ffn.0.weight", 99)
    assert "blocks.1.ffn.0.weight is type id 99, which wanlora does not read" in refused(path)
    set_tensor_type(path, "blocks.1.ffn.0.weight", 23)
    assert "blocks.1.ffn.0.weight is IQ4_XS, which wanlora does not read (it reads F32, F16" in refused(path)


def test_a_file_for_another_model_says_which_model_it_is_for(tmp_path, model):
    path = write_file(tmp_path / "tiny.gguf", model, "Q8_0")
    assert "a tiny transformer file; its width is 256, or another --model" in refused(path, tiny_spec())
    # a 1.3B file, cut to two tensors (the real one is 2.8 GB): its shapes name it
    q = torch.randn(1536, 1536) * 0.02
    patch = torch.randn(1536, 16, 1, 2, 2) * 0.02
    real = write_gguf(
        tmp_path / "wan2.1-t2v-1.3b-Q8_0.gguf",
        [("blocks.0.self_attn.q.weight", q, "Q8_0"), ("patch_embedding.weight", patch, "F32")],
        7,
    )
    message = refused(real, tiny_spec())
    assert (
        "by its shapes (width 1536) it is a Wan2.1 1.3B text-to-video one" in message
        and "(1536, 1536) vs (24, 24)" in message
    )


def test_a_parameter_held_twice_under_two_names_is_refused(tmp_path, model):
    tensors = gguf_tensors(model, "Q8_0")
    twice = [*tensors, ("model.diffusion_model." + tensors[-1][0], tensors[-1][1], tensors[-1][2])]
    assert "unexpected" in refused(write_gguf(tmp_path / "twice.gguf", twice, 7))


def test_a_file_without_the_5d_patch_embedding_says_so(tmp_path, model):
    tensors = [t for t in gguf_tensors(model, "Q8_0") if t[0] != "patch_embedding.weight"]
    message = refused(write_gguf(tmp_path / "unfixed.gguf", tensors, 7))
    assert "missing patch_embedding.weight (Wan's 5-D patch embedding" in message and "fix_5d_tensors" in message


def test_quantized_tensors_with_or_without_leading_ones_load_at_the_models_shapes(tmp_path, model):
    from wanlora.weights.formats.gguf import load_transformer
    from wanlora.weights.gguf.linear import GgufLinear

    tensors = []
    for name, value, kind in gguf_tensors(model, "Q8_0"):
        if name.startswith("blocks.") and name.endswith(".modulation"):  # (1, 6, dim), quantized without its 1
            value, kind = value.reshape(6, -1), "Q8_0"
        elif name == "blocks.0.self_attn.q.weight":  # a block linear given a leading 1
            value = value.unsqueeze(0)
        tensors.append((name, value, kind))
    loaded, _, _ = load_transformer(write_gguf(tmp_path / "odd.gguf", tensors, 7), SPEC, torch.float32)
    modulation = loaded.blocks[1].scale_shift_table
    blocks = torch.from_numpy(encode(model.blocks[1].scale_shift_table[0], "Q8_0"))
    want = QuantizedTensor(qtypes.Q8_0, (6, 256), blocks)
    assert modulation.shape == (1, 6, 256) and torch.equal(modulation[0], want.dequantize())
    query = loaded.blocks[0].attn1.to_q
    assert isinstance(query, GgufLinear) and (query.out_features, query.in_features) == (256, 256)


def test_a_block_scale_that_is_not_finite_is_refused_naming_the_tensor(tmp_path, model):
    path = write_file(tmp_path / "nan.gguf", model, "Q4_K_M")
    read = read_transformer(path, SPEC)
    info = read.sources["blocks.0.ffn.net.0.proj.weight"]
    data = bytearray(path.read_bytes())
    data[info.offset + 144 * 3 : info.offset + 144 * 3 + 2] = np.float16(np.inf).tobytes()  # block 3's d
    path.write_bytes(bytes(data))
    assert "blocks.0.ffn.0.weight holds NaN or infinite Q4_K block scales" in refused(path)


# ------------------------------------------------------------------------------------ W0 read back


def test_w0_reads_back_by_rows_and_a_rewritten_file_is_refused(tmp_path, model):
    path = write_file(tmp_path / "w0.gguf", model, "Q5_K_M")
    read = read_transformer(path, SPEC)
    loaded = read.tensors["blocks.1.ffn.net.2.weight"]
    rows = read.read_back("blocks.1.ffn.net.2.weight", 100, 164)
    assert isinstance(rows, QuantizedTensor) and rows.qtype == qtypes.Q6_K and rows.shape == (64, 256)
    assert torch.equal(rows.data, loaded.data[100:164])
    bias = read.read_back("blocks.1.ffn.net.2.bias")
    assert torch.equal(bias, read.tensors["blocks.1.ffn.net.2.bias"])
    bias.zero_()  # a copy of its own
    assert read.tensors["blocks.1.ffn.net.2.bias"].abs().sum() > 0
    with open(path, "r+b") as handle:  # rewritten in place: same size, new contents
        handle.write(b"GGUF")
    with pytest.raises(CheckpointChanged, match="was rewritten since the model was loaded"):
        read.read_back("blocks.1.ffn.net.2.weight")


CUT_UNDER_A_RUNNING_MODEL = """
import sys
from wanlora.models import tiny_spec
from wanlora.weights.held_file import CheckpointChanged
from wanlora.weights.gguf.reader import QuantizedTensor, read_transformer

path = sys.argv[1]
read = read_transformer(path, tiny_spec(kind="t2v", wide=True))
mapped = [line for line in open("/proc/self/maps") if line.rstrip().endswith(path)]
assert not mapped, mapped  # the reader's mapping is gone once the file is read
with open(path, "r+b") as handle:  # what `cp` over a file does first
    handle.truncate(64)
total = 0.0
for name, value in read.tensors.items():  # every loaded tensor touched: a mapped one would raise SIGBUS here
    total += float((value.dequantize() if isinstance(value, QuantizedTensor) else value.float()).sum())
try:
    read.read_back("blocks.0.attn1.to_q.weight")
except CheckpointChanged as exc:
    print("refused:", exc)
print("clean")
"""


def test_a_file_cut_short_under_a_running_model_ends_in_a_clear_error_not_a_signal(tmp_path, model):
    path = write_file(tmp_path / "running.gguf", model, "Q4_K_M")
    run = subprocess.run(
        [sys.executable, "-c", CUT_UNDER_A_RUNNING_MODEL, str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"exit {run.returncode} (negative: killed by that signal): {run.stderr[-2000:]}"
    assert "was rewritten since the model was loaded from it" in run.stdout and "clean" in run.stdout


WITHOUT_GGUF = """
import sys
sys.modules["gguf"] = None  # the GPU image has no gguf package: `import gguf` fails
import torch
from wanlora.errors import ModelNotFound
from wanlora.models import tiny_spec
from wanlora.weights.gguf.linear import GgufLinear
from wanlora.weights.gguf.quantize import quantize
from wanlora.weights.gguf.reader import read_transformer

layer = GgufLinear(quantize(torch.randn(8, 256), "Q4_K"), "Q4_K")
assert layer(torch.randn(2, 256)).shape == (2, 8)
try:
    read_transformer(sys.argv[1], tiny_spec(kind="t2v", wide=True))
except ModelNotFound as exc:
    print(exc)
"""


def test_without_the_gguf_package_only_reading_a_file_needs_it(tmp_path, model):
    path = write_file(tmp_path / "any.gguf", model, "Q8_0")
    run = subprocess.run([sys.executable, "-c", WITHOUT_GGUF, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "reading GGUF files needs the gguf package: pip install 'wanlora[gguf]'" in run.stdout
