"""W0 read back from the memory-mapped checkpoint: exact where used, refused where it cannot be."""

from __future__ import annotations

import os

import pytest
import torch

from wanlora import WanLoraPipeline
from wanlora.checkpoint import Checkpoint, CheckpointChanged, FileTensor
from wanlora.fp8 import fp8_layers, quantize_rows
from wanlora.lora.pristine import HostCopy
from wanlora.tiny import tiny_transformer, write_tiny_model

from .builders import write_lora
from .test_fp8 import assert_same_bits, bits

SHARD = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tmp_path):
    return write_tiny_model(tmp_path / "tiny")


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    made = tmp_path_factory.mktemp("ckpt-loras")
    for name, layout, seed in (("a", "original", 1), ("b", "loha", 2)):
        write_lora(made / f"{name}.safetensors", tiny_transformer(), layout, seed=seed)
    return {name: str(made / f"{name}.safetensors") for name in "ab"}


def host_copies_only(monkeypatch):
    monkeypatch.setattr(Checkpoint, "of_folder", classmethod(lambda cls, folder, dtype: None))


@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_merges_read_w0_from_the_checkpoint_and_come_off_bitwise(folder, loras, quantize, monkeypatch):
    """In full precision, exactly what host copies give. In fp8, W0 from the file is the full-precision
    weight, one rounding better than the fp8 base a host copy holds (see the next test)."""
    pipe = WanLoraPipeline.from_pretrained(str(folder), quantize=quantize)
    loaded = bits(pipe.transformer)
    history = [[(loras["a"], 0.7)], [(loras["a"], -1.0), (loras["b"], 2.0)], [(loras["b"], 0.3)]]
    for loras_now in history:
        pipe.set_loras(loras_now)
    merger = pipe.experts[0].loras.merger
    assert merger.pristine and all(isinstance(p, FileTensor) for p in merger.pristine.values())

    if quantize is None:
        with monkeypatch.context() as patched:
            host_copies_only(patched)
            copied = WanLoraPipeline.from_pretrained(str(folder))
        copied.set_loras(history[-1])
        assert all(isinstance(p, HostCopy) for p in copied.experts[0].loras.merger.pristine.values())
        assert_same_bits(pipe.transformer, bits(copied.transformer))
    pipe.set_loras([])
    assert_same_bits(pipe.transformer, loaded)


def test_fp8_merges_quantize_the_checkpoints_own_weights_plus_the_deltas(folder, loras):
    """W0 is the checkpoint's weight, not its fp8 rounding: merged = quantize(W0 + s * delta), one rounding."""
    from safetensors.torch import load_file

    stored = load_file(folder / SHARD)
    pipe = WanLoraPipeline.from_pretrained(str(folder), quantize="fp8")
    pipe.set_loras([(loras["a"], 0.7)])
    reference = WanLoraPipeline.from_pretrained(str(folder))  # full precision, merged the same way
    reference.set_loras([(loras["a"], 0.7)])
    full = dict(reference.transformer.named_parameters())
    changed = 0
    for name, layer in fp8_layers(pipe.transformer).items():
        quantized, scale = quantize_rows(full[name].detach())  # the fp32 merge is W0 + s * delta, rounded once
        assert torch.equal(layer.weight.view(torch.uint8), quantized.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, scale), name
        changed += not torch.equal(full[name], stored[name])
    assert changed > 0


def test_a_checkpoint_rewritten_in_place_is_refused_before_anything_changes(folder, loras):
    pipe = WanLoraPipeline.from_pretrained(str(folder))
    for param in pipe.transformer.parameters():  # in memory of its own, as on a GPU: on a CPU, diffusers may
        param.data = param.data.clone()  # leave weights mapped to the file, and the rewrite would reach them too
    pipe.set_loras([(loras["a"], 1.0)])
    merged, active = bits(pipe.transformer), pipe.active_loras
    path = folder / SHARD
    with path.open("r+b") as handle:  # the same inode, other bytes: what an in-place save does
        handle.seek(-64, os.SEEK_END)
        handle.write(bytes(64))
    with pytest.raises(CheckpointChanged, match="was rewritten since the model was loaded from it"):
        pipe.set_loras([(loras["b"], 1.0)])
    assert_same_bits(pipe.transformer, merged)
    assert pipe.active_loras == active


def test_a_checkpoint_replaced_on_disk_still_gives_the_weights_it_was_loaded_with(folder, loras, monkeypatch):
    pipe = WanLoraPipeline.from_pretrained(str(folder))
    loaded = bits(pipe.transformer)
    pipe.set_loras([(loras["a"], 1.0)])
    other = write_tiny_model(folder.parent / "other", seed=7)
    os.replace(other / SHARD, folder / SHARD)  # a new download renamed into place: our mapping keeps the old file
    pipe.set_loras([(loras["b"], 0.5)])
    pipe.set_loras([])
    assert_same_bits(pipe.transformer, loaded)


def test_a_weight_the_file_does_not_give_back_keeps_a_host_copy(folder, loras):
    pipe = WanLoraPipeline.from_pretrained(str(folder))
    with torch.no_grad():
        pipe.transformer.blocks[0].attn1.to_q.weight.mul_(1.5)  # changed after loading: W0 is no longer the file's
    pipe.set_loras([(loras["a"], 1.0)])
    pristine = pipe.experts[0].loras.merger.pristine
    assert isinstance(pristine["blocks.0.attn1.to_q.weight"], HostCopy)
    assert isinstance(pristine["blocks.0.attn1.to_k.weight"], FileTensor)
