"""The memory plan held to traced peaks: every variant x GPU size x weight dtype, every stage, on `meta`.

Each step's activations are traced at the variant's real shapes as diffusers runs them
(tests/tracing.py), and each stated peak must cover its trace plus the weights it says are on the
GPU; the weights are counted again here from full-depth `meta` models. Tiled VAE steps are traced
at the real width and height with 5 frames (two latent frames: the tiles' steady working set; a
full 81-frame tiled trace takes a minute on `meta`), where the plan's formula is evaluated too.
"""

from __future__ import annotations

import json

import pytest
import torch

from wanlora.runtime.memory import (
    CATALOGUE,
    GPU_SIZES_GB,
    HELD_BYTES,
    WEIGHT_DTYPES,
    catalogue_plans,
    catalogue_sizes,
    plan_memory,
    step_activations,
)

from .tracing import (
    bytes_of,
    meta_image_encoder,
    meta_text_encoder,
    meta_transformer,
    meta_vae,
    trace_step,
    traced_peak,
    transformer_inputs,
)

GIB = 2**30
TILED_FRAMES = 5


@pytest.mark.slow
def test_every_stated_peak_covers_its_trace_and_the_weights_on_the_gpu():
    plans = catalogue_plans()
    assert len(plans) == len(CATALOGUE) * len(GPU_SIZES_GB) * len(WEIGHT_DTYPES)
    for plan in plans:
        spec = CATALOGUE[plan.variant]
        sizes = catalogue_sizes(spec, plan.weights)
        assert plan.fits, plan.as_dict()
        for step in plan.steps:
            where = f"{plan.variant} {plan.weights} {plan.gpu_bytes // GIB} GB {plan.mode} {step.name}"
            streamed = {"text_encoder": sizes.text_leaf_window if plan.mode == "group" else sizes.text_window}
            streamed |= {"transformer": sizes.transformer_window, "transformer_2": sizes.transformer_window}
            weights = sum(sizes.weights[c] for c in step.resident) + sum(streamed[c] for c in step.streamed)
            assert step.weight_bytes == weights, where
            tiled = plan.vae_tiling and step.name in ("vae-encode", "decode")
            size = (*plan.size[:2], TILED_FRAMES) if tiled else plan.size
            stated = step_activations(spec, step.name, size, plan.weights, tiled)
            traced = trace_step(spec, step.name, size, plan.weights, tiled)
            assert traced <= stated <= 1.25 * traced + 2**28, f"{where}: stated {stated}, traced {traced}"
            if not tiled:
                assert step.activation_bytes == stated and step.peak_bytes >= step.weight_bytes + traced, where
            assert step.peak_bytes <= plan.budget_bytes, where


@pytest.mark.slow
def test_component_sizes_are_the_full_models_on_meta():
    """The plan counts a transformer from one block (they are all alike): here, every block, and the windows
    streaming keeps on the GPU, from the models' own attributes."""
    for name in ("t2v-14b", "i2v-14b-480p", "ti2v-5b", "t2v-1.3b"):
        spec = CATALOGUE[name]
        for weights in WEIGHT_DTYPES:
            sizes = catalogue_sizes(spec, weights)
            model = meta_transformer(spec, weights)
            block = bytes_of(model.blocks[0])
            assert sizes.weights["transformer"] == bytes_of(model)
            assert sizes.transformer_window == bytes_of(model) - len(model.blocks) * block + 2 * block
        assert sizes.weights["vae"] == bytes_of(meta_vae(spec.vae_scale))
        assert sizes.weights.get("image_encoder") == (bytes_of(meta_image_encoder()) if spec.arch.image_dim else None)
    text = meta_text_encoder()
    blocks = text.encoder.block
    assert sizes.weights["text_encoder"] == bytes_of(text) == 11_361_820_672  # UMT5-XXL in bf16
    assert sizes.text_window == bytes_of(text) - sum(bytes_of(b) for b in blocks) + max(bytes_of(b) for b in blocks)


def test_the_transformer_peaks_in_one_block():
    """The traces run two blocks: the full depth peaks the same, as nothing but the hidden states outlives a block."""
    spec = CATALOGUE["t2v-14b"]
    inputs = transformer_inputs(spec, 832, 480, 81)
    full, two = (meta_transformer(spec, "bf16", layers) for layers in (None, 2))
    assert traced_peak(lambda: full(**inputs, return_dict=False)) == traced_peak(
        lambda: two(**inputs, return_dict=False)
    )


@pytest.mark.parametrize(("variant", "weights"), [("t2v-14b", "fp8"), ("ti2v-5b", "bf16")])
def test_the_cards_that_crashed_at_the_first_prompt_get_a_plan_that_fits(variant, weights):
    """14B fp8 and TI2V-5B bf16 on a 24 GB card: the old "encoder" mode brought the whole 11.4 GB text encoder
    in beside the resident transformer (~26.8 and ~25.1 GB). Now it streams a block at a time."""
    spec = CATALOGUE[variant]
    plan = plan_memory(spec, 24 * GIB, weights)
    sizes = catalogue_sizes(spec, weights)
    assert plan.fits and plan.mode == "encoder" and plan.vae_tiling
    (text,) = [step for step in plan.steps if step.name == "text"]
    assert text.streamed == ("text_encoder",)
    whole = sizes.weights["transformer"] + sizes.weights["text_encoder"] + sizes.weights["vae"]
    traced = trace_step(spec, "text", plan.size, weights, False)
    assert whole + traced > plan.budget_bytes  # what the old plan put on the card does not fit it
    assert text.peak_bytes <= plan.budget_bytes


def test_auto_takes_the_fastest_mode_whose_every_stage_fits():
    a14b, t2v14b, small = CATALOGUE["t2v-a14b"], CATALOGUE["t2v-14b"], CATALOGUE["t2v-1.3b"]
    assert plan_memory(a14b, 80 * GIB, "fp8").mode == "none"  # both fp8 experts resident: no switch
    resident = plan_memory(a14b, 80 * GIB, "bf16")
    assert (resident.mode, resident.vae_tiling) == ("encoder", False)  # 57.3 GB of experts + decode: no text encoder
    assert plan_memory(a14b, 48 * GIB, "bf16").mode == "experts"
    assert plan_memory(t2v14b, 24 * GIB, "bf16").mode == "group"
    assert plan_memory(small, 48 * GIB, "bf16").mode == "none"
    starved = plan_memory(a14b, 4 * GIB, "fp8")
    assert starved.mode == "group" and not starved.fits
    assert "peak 6.6 of 3.9 GB usable (denoise, 832x480, 81 frames)" in starved.why()
    untiled = plan_memory(t2v14b, 48 * GIB, "bf16")  # the text encoder streams before the VAE tiles
    assert (untiled.mode, untiled.vae_tiling) == ("encoder", False)


def test_host_memory_is_what_the_weights_hold():
    spec = CATALOGUE["t2v-a14b"]
    sizes = catalogue_sizes(spec, "bf16")
    experts = plan_memory(spec, 48 * GIB, "bf16")
    assert experts.mode == "experts"
    # each expert keeps its host copy, the text encoder its own: exactly their bytes, no power-of-two rounding
    expected = 2 * sizes.weights["transformer"] + sizes.weights["text_encoder"]
    assert (experts.pinned_bytes, experts.pageable_bytes) == (expected, 0)
    i2v = CATALOGUE["i2v-14b-480p"]
    model = plan_memory(i2v, 24 * GIB, "fp8")  # every component moves to the host between uses: pageable
    assert model.mode == "model" and model.pinned_bytes == 0
    assert model.pageable_bytes == sum(catalogue_sizes(i2v, "fp8").weights.values())


def test_the_memory_json_lists_every_variant_size_and_dtype(cli):
    run = cli("models", "--memory", "--json")
    assert run.returncode == 0, run.stderr
    entries = json.loads(run.stdout)
    assert {(e["variant"], e["gpu_bytes"] // GIB, e["weights"]) for e in entries} == {
        (v, gb, w) for v in CATALOGUE for gb in GPU_SIZES_GB for w in WEIGHT_DTYPES
    }
    names = {"transformer", "transformer_2", "text_encoder", "image_encoder", "vae"}
    for entry in entries:
        assert entry["mode"] in ("none", "encoder", "experts", "model", "group")
        assert set(entry["stages"]) == {"encode", "denoise", "decode"}
        for stage in entry["stages"].values():
            assert set(stage["components"]) <= names and stage["peak_bytes"] <= entry["budget_bytes"]
            assert stage["peak_bytes"] == max(step["peak_bytes"] for step in stage["steps"])
            assert all(
                s["peak_bytes"] == s["weight_bytes"] + s["activation_bytes"] + HELD_BYTES for s in stage["steps"]
            )
        assert set(entry["host"]) == {"pinned_bytes", "pageable_bytes"}
    one = next(e for e in entries if (e["variant"], e["gpu_bytes"] // GIB, e["weights"]) == ("t2v-a14b", 48, "bf16"))
    assert one["stages"]["denoise"]["components"] == ["transformer", "transformer_2", "vae"]  # one expert at a time
    assert [s["components"] for s in one["stages"]["denoise"]["steps"]] == [
        ["transformer", "vae"],
        ["transformer_2", "vae"],
    ]
    assert cli("models", "--json").returncode == 2


def test_pinned_buffers_cost_what_they_hold():
    """One plain allocation registered with CUDA once, of the tensors' bytes (aligned to 512): not the caching
    host allocator's power-of-two blocks. The registration is a stand-in here, the allocation plan real."""
    from wanlora.weights.host_memory import ARENA_ALIGN, HostArena, caching_allocator_bytes

    tensors = {
        "a": torch.randn(3000, 700).to(torch.bfloat16),
        "b": torch.randn(5000),
        "c": torch.randn(1000, 50).to(torch.float8_e4m3fn),
    }
    registered, released = [], []
    arena = HostArena(
        tensors, pin=True, register=lambda ptr, size: registered.append((ptr, size)), unregister=released.append
    )
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    assert registered == [(arena.storage.data_ptr(), arena.nbytes)]
    assert held <= arena.nbytes < held + len(tensors) * ARENA_ALIGN
    assert caching_allocator_bytes(tensors) > 1.2 * arena.nbytes  # what pin_memory=True would have taken
    for name, tensor in tensors.items():
        assert arena.views[name].dtype == tensor.dtype and torch.equal(arena.views[name].float(), tensor.float())
        assert arena.views[name].untyped_storage().data_ptr() == arena.storage.data_ptr()
    pointer = arena.storage.data_ptr()
    del arena
    assert released == [pointer]
    # a 14B expert: its 1,095 tensors would take 43.8 GB as pinned blocks, 34.4 GB as one; the arena 28.6
    expert = {
        name: torch.empty(p.shape, dtype=p.dtype, device="meta")
        for name, p in meta_transformer(CATALOGUE["t2v-14b"]).named_parameters()
    }
    assert caching_allocator_bytes(expert) / 1e9 == pytest.approx(43.8, abs=0.1)
    from wanlora.weights.host_memory import arena_layout

    assert arena_layout(expert)[1] / 1e9 == pytest.approx(28.6, abs=0.05)


@pytest.mark.parametrize(("error", "raised"), [(2, "OutOfMemory"), (1, "RuntimeError")])
def test_pinning_past_the_systems_locked_memory_limit_is_out_of_memory_not_a_bug(monkeypatch, error, raised):
    """cudaHostRegister answers cudaErrorMemoryAllocation (2) when the pages CUDA may lock run out (`ulimit -l`, a
    full host): the machine's limit, said as OutOfMemory with what to do; any other code stays a bug's error."""
    from types import SimpleNamespace

    from wanlora.errors import OutOfMemory
    from wanlora.weights.host_memory import HostArena

    runtime = SimpleNamespace(cudaHostRegister=lambda pointer, size, flags: error)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: runtime)
    with pytest.raises(OutOfMemory if raised == "OutOfMemory" else RuntimeError) as caught:
        HostArena({"w": torch.randn(64, 64)}, pin=True)
    assert type(caught.value).__name__ == raised
    if raised == "OutOfMemory":
        assert "could not pin 0.0 GB more host memory" in str(caught.value) and "ulimit -l" in str(caught.value)


def test_a_merges_host_copy_of_w0_is_pinned_at_its_exact_size(monkeypatch):
    """Where no checkpoint gives W0 back, a merge keeps a host copy of the weight (an fp8 one: rows and scales);
    pinned through the caching host allocator a 13824x5120 bf16 weight would take 268 MB for its 142 MB."""
    import gc

    from wanlora.weights import formats, host_memory
    from wanlora.weights.formats.base import Stored
    from wanlora.weights.formats.fp8 import quantize_rows
    from wanlora.weights.host_memory import arena_layout, caching_allocator_bytes
    from wanlora.weights.pristine import HostCopy

    registered, released = [], []
    monkeypatch.setattr(host_memory, "cuda_register", lambda ptr, size: registered.append((ptr, size)))
    monkeypatch.setattr(host_memory, "cuda_unregister", released.append)
    rows, scale = quantize_rows(torch.randn(1536, 700))
    stored = Stored(formats.get("fp8"), (rows, scale))
    copy = HostCopy(stored, pin=True)
    held = {"rows": rows, "scale": scale}
    assert registered == [(copy.arena.storage.data_ptr(), arena_layout(held)[1])]
    assert caching_allocator_bytes(held) > 1.5 * arena_layout(held)[1]
    assert all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(copy.tensors, stored.data, strict=True)
    )
    rows.zero_()  # a merge writes the weight: the copy is its own
    assert not torch.equal(copy.tensors[0].view(torch.uint8), rows.view(torch.uint8))
    assert copy.restore(stored) and torch.equal(rows.view(torch.uint8), copy.tensors[0].view(torch.uint8))
    pointer = copy.arena.storage.data_ptr()
    del copy
    gc.collect()
    assert released == [pointer]
    bf16 = {"w": torch.empty(13824, 5120, dtype=torch.bfloat16, device="meta")}
    assert (caching_allocator_bytes(bf16), arena_layout(bf16)[1]) == (268_435_456, 141_557_760)


@pytest.mark.slow
def test_the_text_encoder_streams_from_its_host_arena_and_is_never_copied_back():
    """ "encoder" and "experts" modes: the weights live in one pinned arena; each call brings the embedding for
    the call and the blocks one at a time, and leaving drops the GPU copies (the weights never change)."""
    import numpy as np

    from wanlora import WanLoraPipeline
    from wanlora.runtime.placement import EncoderStream

    from .conftest import SMALL

    pipe = WanLoraPipeline.from_pretrained("tiny")
    before = pipe.generate("a fox", seed=5, **SMALL).frames
    encoder = pipe.diffusers_pipeline.text_encoder
    stream = EncoderStream.of(encoder, torch.device("cpu"))
    assert EncoderStream.of(encoder, torch.device("cpu")) is stream  # a pipeline sharing the encoder reuses it
    order = []
    for index, block in enumerate(encoder.encoder.block):
        block.register_forward_pre_hook(lambda *_, index=index: order.append(index))
    assert np.array_equal(pipe.generate("a fox", seed=5, **SMALL).frames, before)
    held = sum(p.numel() * p.element_size() for p in encoder.parameters())
    assert stream.moved == 2 * held  # the prompt and the negative prompt: every weight once per call
    assert order == [0, 1, 0, 1]
    assert all(p.untyped_storage().data_ptr() == stream.arena.storage.data_ptr() for p in encoder.parameters())
    stream.close(encoder)
    assert np.array_equal(pipe.generate("a fox", seed=5, **SMALL).frames, before) and stream.moved == 2 * held
