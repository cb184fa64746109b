"""Every layout of docs/lora-formats.md, read and merged exactly; diffusers as the oracle where it works."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from wanlora.errors import LoraFormatError, LoraMismatch
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.lora.metadata import trigger_words
from wanlora.tiny import tiny_pipeline, tiny_transformer

from .builders import ALL_LAYOUTS, PREFIX_VARIANTS, block_linears, lora_tensors, write_lora
from .lora_helpers import assert_weights, fetch_lora, merge, snapshot


@pytest.fixture
def model():
    return tiny_transformer()


def shapes_of(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_every_layout_merges_to_the_math(model, tmp_path, layout):
    base = snapshot(model)
    expected = write_lora(tmp_path / "l.safetensors", model, layout)
    lora = read_lora(tmp_path / "l.safetensors")
    assert set(lora.deltas) == set(expected)
    merge(LoraMerger(model), [(lora, -0.6)])
    assert_weights(model, base, [(expected, -0.6)])


@pytest.mark.parametrize("prefix", PREFIX_VARIANTS)
def test_prefix_variants_mean_the_same(model, tmp_path, prefix):
    tensors, expected = lora_tensors(shapes_of(model), "original", prefix=prefix)
    save_file(tensors, tmp_path / "l.safetensors")
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    assert_weights(model, base, [(expected, 1.0)])


def test_lycoris_on_diffusers_names(model, tmp_path):
    tensors, expected = lora_tensors(shapes_of(model), "loha")
    renamed = {}
    for key, value in tensors.items():
        renamed[
            key.replace("self_attn_q", "attn1_to_q")
            .replace("self_attn_k", "attn1_to_k")
            .replace("self_attn_v", "attn1_to_v")
            .replace("self_attn_o", "attn1_to_out_0")
            .replace("cross_attn_q", "attn2_to_q")
            .replace("cross_attn_k", "attn2_to_k")
            .replace("cross_attn_v", "attn2_to_v")
            .replace("cross_attn_o", "attn2_to_out_0")
            .replace("ffn_0", "ffn_net_0_proj")
            .replace("ffn_2", "ffn_net_2")
        ] = value
    save_file(renamed, tmp_path / "l.safetensors")
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    assert_weights(model, base, [(expected, 1.0)])


@pytest.mark.parametrize("layout", ["original", "original-peft", "kohya", "diffusers"])
def test_matches_diffusers_fuse_lora_where_diffusers_loads(tmp_path, layout):
    ours, theirs = tiny_pipeline(), tiny_pipeline()
    write_lora(tmp_path / "l.safetensors", ours.transformer, layout, seed=3)
    merge(LoraMerger(ours.transformer), [(read_lora(tmp_path / "l.safetensors"), 0.8)])
    theirs.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="style")
    theirs.fuse_lora(lora_scale=0.8, components=["transformer"])
    theirs.unload_lora_weights()
    reference = dict(theirs.transformer.named_parameters())
    for name, param in ours.transformer.named_parameters():
        torch.testing.assert_close(param, reference[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("layout", ["diffsynth", "bare-peft"])
def test_diffusers_silently_ignores_what_we_apply(tmp_path, layout):
    """DiffSynth `.default` and bare PEFT keys: diffusers warns and changes nothing."""
    pipe = tiny_pipeline()
    base = snapshot(pipe.transformer)
    write_lora(tmp_path / "l.safetensors", pipe.transformer, layout)
    pipe.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="style")
    pipe.fuse_lora(lora_scale=1.0, components=["transformer"])
    pipe.unload_lora_weights()
    assert all(torch.equal(p, base[n]) for n, p in pipe.transformer.named_parameters())
    assert len(read_lora(tmp_path / "l.safetensors").deltas) == 20


def test_partial_loras_touch_only_their_modules(model, tmp_path):
    shapes = shapes_of(model)
    attention_only = [m for m in block_linears(shapes, blocks=[1]) if ".attn1." in m]
    expected = write_lora(tmp_path / "l.safetensors", model, "kohya", targets=attention_only)
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    assert_weights(model, base, [(expected, 1.0)])
    assert len(expected) == 4


def test_peft_metadata_alpha_is_honoured(model, tmp_path):
    tensors, expected = lora_tensors(shapes_of(model), "diffusers")
    config = {"r": 4, "lora_alpha": 8, "use_rslora": False}
    save_file(tensors, tmp_path / "l.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    assert_weights(model, base, [({k: 2 * v for k, v in expected.items()}, 1.0)])


def test_peft_alpha_pattern_gives_a_module_its_own_alpha(model, tmp_path):
    tensors, expected = lora_tensors(shapes_of(model), "diffusers")
    target = sorted(expected)[0].removesuffix(".weight")  # blocks.0.attn1.to_k, say: 16 for it, 8 for the rest
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {target: 16}}
    save_file(tensors, tmp_path / "l.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    scaled = {k: (4 if k == f"{target}.weight" else 2) * v for k, v in expected.items()}
    assert_weights(model, base, [(scaled, 1.0)])


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"r": 4, "lora_alpha": 8, "alpha_pattern": {"(a+)+$": 16}}, "alpha_pattern"),  # would backtrack for ages
        ({"r": 4, "lora_alpha": 8, "use_rslora": "false"}, "use_rslora"),  # text that would read as true
    ],
    ids=["a regex", "text for a flag"],
)
def test_peft_metadata_is_checked_before_it_is_used(model, tmp_path, config, named):
    tensors, _ = lora_tensors(shapes_of(model), "diffusers")
    save_file(tensors, tmp_path / "l.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})
    with pytest.raises(LoraFormatError, match=named):
        read_lora(tmp_path / "l.safetensors")


def test_the_peft_config_diffusers_save_lora_weights_writes_is_honoured(tmp_path):
    """WanPipeline.save_lora_weights stores the config under `transformer.`-prefixed keys
    ({"transformer.lora_alpha": 16, ...}), not nested: its alpha is the file's, as diffusers reads it."""
    from diffusers import WanPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    trained, ours, theirs = tiny_pipeline(), tiny_pipeline(), tiny_pipeline()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "ffn.net.2"], init_lora_weights=False)
    trained.transformer.add_adapter(config)
    layers = get_peft_model_state_dict(trained.transformer)
    WanPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict()
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    merge(LoraMerger(ours.transformer), [(read_lora(path), 0.5)])
    theirs.load_lora_weights(str(path), adapter_name="style")
    theirs.fuse_lora(lora_scale=0.5, components=["transformer"])
    theirs.unload_lora_weights()
    reference = dict(theirs.transformer.named_parameters())
    for name, param in ours.transformer.named_parameters():
        torch.testing.assert_close(param, reference[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.lora_A.weight"),
        (
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
            "model.diffusion_model.blocks.0.self_attn.q.lora_down.weight",
        ),
        ("blocks.0.self_attn.q.lora_A.weight", "blocks.0.self_attn.q.lora_A.default.weight"),
    ],
    ids=["factor-names", "prefixes", "peft-adapter-name"],
)
def test_one_factor_under_two_names_is_refused_naming_both(tmp_path, first, second):
    """Two spellings of one key strip to the same factor: keeping either one silently drops the other."""
    up = first.replace("lora_down", "lora_up").replace("lora_A", "lora_B")
    save_file(
        {first: torch.randn(4, 24), second: torch.randn(4, 24), up: torch.randn(24, 4)}, tmp_path / "l.safetensors"
    )
    with pytest.raises(LoraFormatError, match="holds one factor twice") as caught:
        read_lora(tmp_path / "l.safetensors")
    assert first in str(caught.value) and second in str(caught.value)


TEXT_ENCODER_KEYS = (
    "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",  # kohya
    "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha",
    "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight",  # diffusers / PEFT
    "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight",  # ComfyUI
)


def test_text_encoder_keys_are_skipped_with_a_warning_and_the_rest_merges(model, tmp_path, caplog):
    tensors, expected = lora_tensors(shapes_of(model), "kohya", targets=["blocks.0.attn1.to_q", "blocks.1.ffn.net.2"])
    text_encoder = {key: torch.randn(4, 32) for key in TEXT_ENCODER_KEYS}
    save_file(tensors | text_encoder, tmp_path / "l.safetensors")
    base = snapshot(model)
    lora = read_lora(tmp_path / "l.safetensors")
    assert "skipping its 4 text-encoder tensors" in caplog.text and TEXT_ENCODER_KEYS[0] in caplog.text
    merge(LoraMerger(model), [(lora, 0.7)])
    assert_weights(model, base, [(expected, 0.7)])


def test_a_file_of_text_encoder_keys_only_is_refused_by_name(tmp_path):
    save_file({key: torch.randn(4, 32) for key in TEXT_ENCODER_KEYS}, tmp_path / "te.safetensors")
    with pytest.raises(LoraFormatError, match=r"te.safetensors holds only text-encoder keys .*: lora_te"):
        read_lora(tmp_path / "te.safetensors")


def test_unknown_keys_are_listed_up_to_ten(tmp_path):
    junk = {f"diffusion_model.blocks.{i}.self_attn.q.lora_down.weight": torch.zeros(4, 24) for i in range(12)}
    junk |= {f"diffusion_model.blocks.{i}.self_attn.q.lora_up.weight": torch.zeros(24, 4) for i in range(12)}
    junk["diffusion_model.blocks.0.weird_layer.lora_down.weight"] = torch.zeros(4, 24)
    junk["diffusion_model.blocks.0.weird_layer.lora_up.weight"] = torch.zeros(24, 4)
    save_file(junk, tmp_path / "l.safetensors")
    with pytest.raises(LoraFormatError, match="does not have: blocks.0.weird_layer"):
        read_lora(tmp_path / "l.safetensors")
    save_file({f"something_else_{i}": torch.zeros(1) for i in range(13)}, tmp_path / "m.safetensors")
    with pytest.raises(LoraFormatError, match="not LoRA factors: .* and 3 more"):
        read_lora(tmp_path / "m.safetensors")


def test_missing_factor_and_unsupported_kinds_are_explained(tmp_path):
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 24)}, tmp_path / "a.safetensors")
    with pytest.raises(LoraFormatError, match=r"lacks \['up'\]"):
        read_lora(tmp_path / "a.safetensors")
    save_file({"diffusion_model.blocks.0.self_attn.q.dora_scale": torch.zeros(1, 24)}, tmp_path / "b.safetensors")
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_lora(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"<html>login</html>")
    with pytest.raises(LoraFormatError, match="not a readable safetensors"):
        read_lora(tmp_path / "c.safetensors")


def test_a_14b_lora_on_the_small_model_names_its_base(model, tmp_path):
    shapes = {"blocks.0.attn1.to_q.weight": (5120, 5120), "blocks.0.attn1.to_k.weight": (5120, 5120)}
    tensors, _ = lora_tensors(shapes, "original", rank=2)
    save_file(tensors, tmp_path / "big.safetensors")
    with pytest.raises(LoraMismatch, match=r"Wan2.1 14B or Wan2.2 A14B \(dim 5120\).*dim 24"):
        merge(LoraMerger(model), [(read_lora(tmp_path / "big.safetensors"), 1.0)])


def test_i2v_parts_on_a_t2v_model_are_skipped_with_a_warning(model, tmp_path, caplog):
    shapes = shapes_of(model) | {
        "blocks.0.attn2.add_k_proj.weight": (24, 32),
        "condition_embedder.image_embedder.ff.net.0.proj.weight": (32, 32),
    }
    targets = ["blocks.0.attn1.to_q", "blocks.0.attn2.add_k_proj", "condition_embedder.image_embedder.ff.net.0.proj"]
    tensors, expected = lora_tensors(shapes, "original", targets=targets)
    save_file(tensors, tmp_path / "i2v.safetensors")
    lora = read_lora(tmp_path / "i2v.safetensors")
    assert lora.is_i2v and "image-to-video" in lora.base_model_hint()
    base = snapshot(model)
    merge(LoraMerger(model), [(lora, 1.0)])
    assert_weights(model, base, [({"blocks.0.attn1.to_q.weight": expected["blocks.0.attn1.to_q.weight"]}, 1.0)])
    assert "blocks.0.attn2.add_k_proj.weight" in caplog.text and "has no image branch" in caplog.text


def test_trigger_words_from_metadata():
    assert trigger_words({"modelspec.trigger_phrase": "sks dog, in style"}) == ["sks dog", "in style"]
    freq = json.dumps({"10_set": {"wanstyle": 30, "a dog": 2, "blue": 5}})
    assert trigger_words({"ss_tag_frequency": freq}) == ["wanstyle", "blue", "a dog"]
    assert trigger_words({"ss_tag_frequency": "not json"}) == []
    huge = "x" * 100_000  # a file's header may hold 100 MiB: a "word" that long would fill every log line it is in
    assert trigger_words({"trigger_phrase": f"{huge}, sks dog"}) == ["sks dog"]
    assert trigger_words({"ss_tag_frequency": json.dumps({"set": {huge: 9, "wanstyle": 1}})}) == ["wanstyle"]


def test_lightx2v_head_modulation_maps_to_the_top_level_table(model, tmp_path):
    """lightx2v's extractor turns `.modulation` into `.diff_m`, the head's included."""
    delta = torch.randn(1, 2, 24) * 0.01
    save_file({"diffusion_model.head.diff_m": delta}, tmp_path / "l.safetensors")
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.5)])
    assert_weights(model, base, [({"scale_shift_table": delta}, 1.5)])


def _with_header(path, header: bytes, data: bytes = b"\0" * 16) -> str:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return str(path)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": "ab"}}', "malformed data offsets"),
        (b'{"a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}', "malformed shape"),
        (b'{"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}', "unknown dtype"),
        (b'{"a": [1, 2]}', "malformed header entry"),
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    ],
    ids=["offsets", "shape", "dtype", "entry", "deep"],
)
def test_malformed_safetensors_headers_are_one_clear_error(tmp_path, header, words):
    path = _with_header(tmp_path / "bad.safetensors", header)
    with pytest.raises(LoraFormatError, match=words):
        fetch_lora(path)
