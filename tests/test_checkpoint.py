"""W0 read back from the memory-mapped checkpoint: exact where used, refused where it cannot be."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from wanlora import WanLoraPipeline
from wanlora.errors import WeightsPartlyMerged
from wanlora.tiny import tiny_transformer, write_tiny_model
from wanlora.weights.checkpoint import Checkpoint, FileTensor
from wanlora.weights.formats.fp8 import fp8_layers, quantize_rows
from wanlora.weights.held_file import CheckpointChanged
from wanlora.weights.pristine import HostCopy

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


@pytest.mark.slow
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


def test_a_checkpoint_cut_short_during_a_merge_leaves_a_model_that_refuses_every_request(folder, loras, monkeypatch):
    """Checked before the merge, the file is cut short half-way through it: W0 is gone, so the merge can be neither
    finished nor undone, and the weights mix two sets. The model must refuse to run on them, the old set too."""
    pipe = WanLoraPipeline.from_pretrained(str(folder))
    for param in pipe.transformer.parameters():  # in memory of its own, as on a GPU (see above)
        param.data = param.data.clone()
    pipe.set_loras([(loras["a"], 1.0)])
    read, reads = FileTensor.fill, []

    def fill(self, out, start, stop):
        reads.append(self.key)
        if len(reads) == 5:  # some weights rewritten already
            os.truncate(folder / SHARD, os.path.getsize(folder / SHARD) // 2)
        return read(self, out, start, stop)

    monkeypatch.setattr(FileTensor, "fill", fill)
    with pytest.raises(WeightsPartlyMerged, match="merge stopped half-way and could not be undone .*was rewritten"):
        pipe.set_loras([(loras["b"], 1.0)])
    for again in ([(loras["a"], 1.0)], []):  # the set the model still says it holds, and none
        with pytest.raises(WeightsPartlyMerged, match="refuses every request; load the model again"):
            pipe.generate("a cat", loras=again, width=64, height=48, num_frames=5, num_inference_steps=1)


@pytest.mark.parametrize("fault", ["rewritten", "cut short mid-merge"])
def test_a_resident_model_that_cannot_go_on_is_loaded_again_for_the_next_request(folder, loras, monkeypatch, fault):
    """The service, a batch and the CLI hold one model (ResidentModel): after CheckpointChanged or
    WeightsPartlyMerged the request fails, and the next one runs on the model loaded afresh from the file."""
    from wanlora.options import GenerationOptions
    from wanlora.resident import ResidentModel, prepare

    def request(lora: str):
        options = GenerationOptions("a cat", loras=[(lora, 1.0)], width=64, height=48, num_frames=5)
        return prepare(str(folder), replace(options, num_inference_steps=1))

    resident = ResidentModel()
    resident.run(request(loras["a"]), progress=False)
    for param in resident.pipe.transformer.parameters():  # in memory of its own (see above)
        param.data = param.data.clone()
    path = folder / SHARD
    if fault == "rewritten":
        with path.open("r+b") as handle:
            handle.seek(-64, os.SEEK_END)
            handle.write(bytes(64))
    else:
        read, reads = FileTensor.fill, []

        def fill(self, out, start, stop):
            reads.append(self.key)
            if len(reads) == 5:
                os.truncate(path, os.path.getsize(path) // 2)
            return read(self, out, start, stop)

        monkeypatch.setattr(FileTensor, "fill", fill)
    with pytest.raises(CheckpointChanged if fault == "rewritten" else WeightsPartlyMerged):
        resident.run(request(loras["b"]), progress=False)
    monkeypatch.undo()
    if fault != "rewritten":
        write_tiny_model(folder)  # the file whole again, as the operator's fresh copy
    video = resident.run(request(loras["b"]), progress=False)
    assert video is not None and len(video.frames) == 5
    assert resident.loads == [str(folder), str(folder)]


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


# ------------------------------------------------------------------ dtypes the reader did not know


@pytest.mark.parametrize("stored", [torch.float64, torch.int32])
def test_a_checkpoint_holding_other_dtypes_still_merges(folder, loras, stored):
    """An F64 or integer tensor in the folder: diffusers casts it at load, and merges read W0 back or copy it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / SHARD)
    for key in ("blocks.0.attn1.to_q.weight", "blocks.1.ffn.net.2.weight"):
        tensors[key] = (tensors[key] * 64).round().to(stored)  # whole numbers: an integer file holds them exactly
    save_file(tensors, folder / SHARD)
    pipe = WanLoraPipeline.from_pretrained(str(folder))
    loaded = bits(pipe.transformer)
    pipe.set_loras([(loras["a"], 0.7)])
    with pytest.MonkeyPatch.context() as patched:
        host_copies_only(patched)
        copied = WanLoraPipeline.from_pretrained(str(folder))
    copied.set_loras([(loras["a"], 0.7)])
    assert_same_bits(pipe.transformer, bits(copied.transformer))
    pipe.set_loras([])
    assert_same_bits(pipe.transformer, loaded)


# ------------------------------------------------------------------ files cut short under a running model


def file_mapped(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> bool:
    return any(start <= tensor.data_ptr() < stop for start, stop in mappings)


def file_mappings() -> list[tuple[int, int]]:
    """This process's mappings of files (not anonymous memory, not the libraries it runs)."""
    found = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            start, stop = (int(x, 16) for x in parts[0].split("-"))
            found.append((start, stop))
    return found


def test_no_weight_on_the_cpu_is_a_view_of_a_file(folder, tmp_path):
    from safetensors.torch import save_file

    from .builders import wan_checkpoint

    single = tmp_path / "wan_fp32.safetensors"
    save_file(wan_checkpoint(tiny_transformer(), "full"), str(single))
    for pipe in (
        WanLoraPipeline.from_pretrained(str(folder)),
        WanLoraPipeline.from_pretrained("tiny", transformer=single),
    ):
        mappings = file_mappings()
        for name, component in pipe.diffusers_pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                mapped = [n for n, t in component.state_dict().items() if file_mapped(t, mappings)]
                assert not mapped, f"{name}: {mapped[:3]} live in a file's mapping"


TRUNCATE_THEN_RUN = """
import sys
from pathlib import Path
from wanlora import WanLoraPipeline
from wanlora.weights.held_file import CheckpointChanged

folder, single, first, second = sys.argv[1:5]
pipes = [WanLoraPipeline.from_pretrained(folder), WanLoraPipeline.from_pretrained("tiny", transformer=single)]
for pipe in pipes:
    pipe.set_loras([(first, 1.0)])
for path in [*Path(folder).rglob("*.safetensors"), Path(single)]:
    with open(path, "r+b") as handle:  # what `cp` over a file does first
        handle.truncate(64)
for pipe in pipes:  # every weight touched, mid-generation as it were: text encoder, transformer, VAE
    pipe.diffusers_pipeline("a fox", width=64, height=48, num_frames=5, num_inference_steps=2, output_type="np")
    pipe.generate("a fox", width=64, height=48, num_frames=5, num_inference_steps=2, seed=1)  # the same LoRAs
    try:
        pipe.set_loras([(second, 1.0)])
    except CheckpointChanged as exc:
        print("refused:", exc)
    else:
        sys.exit("a merge read from a file cut short")
print("clean")
"""


def test_files_cut_short_under_a_running_model_end_in_a_clear_error_not_a_signal(folder, loras, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    from .builders import wan_checkpoint

    single = tmp_path / "wan_fp32.safetensors"
    save_file(wan_checkpoint(tiny_transformer(), "full"), str(single))
    run = subprocess.run(
        [sys.executable, "-c", TRUNCATE_THEN_RUN, str(folder), str(single), loras["a"], loras["b"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, f"exit {run.returncode} (negative: killed by that signal): {run.stderr[-2000:]}"
    assert run.stdout.count("was rewritten since the model was loaded from it") == 2 and "clean" in run.stdout


# ------------------------------------------------------------------ proving W0 cheaply


def test_w0_is_proven_by_comparing_bytes_in_large_chunks_without_converting(folder, monkeypatch):
    """The first LoRA on a 14B proves 400 weights: raw bytes against raw bytes where the file holds the loaded
    dtype, a CHUNK_BYTES read at a time, no fp32 copy; and a single differing bit is still found."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from wanlora.weights import checkpoint
    from wanlora.weights.formats.dense import FORMAT as full_precision

    pipe = WanLoraPipeline.from_pretrained(str(folder))
    source = pipe.experts[0].loras.merger.checkpoint
    name = "blocks.0.ffn.net.0.proj.weight"
    weight = dict(pipe.transformer.named_parameters())[name].detach()
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", weight[0].numel() * 4 * 8)  # 8 rows a read: several chunks

    class Traced(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Traced() as traced:
        assert source.pristine(name, full_precision.weight(weight)) is not None
    assert not any(op.startswith(("_to_copy", "copy")) for op in traced.ops), traced.ops
    assert traced.ops.count("equal.default") == -(-weight.shape[0] // 8)
    changed = weight.clone()
    changed.view(torch.int32)[weight.shape[0] - 1, 3] ^= 1  # one bit, in the last chunk
    assert source.pristine(name, full_precision.weight(changed)) is None
