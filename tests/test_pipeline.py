import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from wanlora import InvalidInput, ModelNotFound, WanLoraPipeline
from wanlora.runtime.sampling import WanFlowUniPC

from .conftest import SMALL, assert_frames_agree, probe


@pytest.mark.slow
def test_generate_returns_uint8_video_that_saves_as_mp4(tiny_pipe, tmp_path):
    video = tiny_pipe.generate("a fox in the snow", seed=7, **SMALL)
    assert video.frames.shape == (9, 48, 64, 3) and video.frames.dtype == np.uint8
    assert (video.fps, video.seed) == (12, 7)
    assert video.metadata["prompt"] == "a fox in the snow" and video.metadata["model"] == "tiny"
    assert video.frames.std() > 1  # not a blank video
    got = probe(video.save(tmp_path / "fox.mp4"))
    assert (got.codec, got.pix_fmt, got.width, got.height, got.fps, len(got.frames)) == (
        "h264",
        "yuv420p",
        64,
        48,
        12.0,
        9,
    )


@pytest.mark.slow
def test_same_seed_same_frames_other_seed_other_frames(tiny_pipe):
    first = tiny_pipe.generate("a fox", seed=3, **SMALL).frames
    again = tiny_pipe.generate("a fox", seed=3, **SMALL).frames
    other = tiny_pipe.generate("a fox", seed=4, **SMALL).frames
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.slow
def test_random_seed_is_reported_and_reproduces(tiny_pipe):
    video = tiny_pipe.generate("a fox", **SMALL)
    assert np.array_equal(tiny_pipe.generate("a fox", seed=video.seed, **SMALL).frames, video.frames)


def test_validation_happens_before_any_work(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "diffusers_pipeline", None)  # any denoising attempt would crash
    with pytest.raises(InvalidInput, match="num_frames=10"):
        tiny_pipe.generate("a fox", **{**SMALL, "num_frames": 10})


@pytest.mark.slow
def test_local_folder_loads_the_same_model_as_tiny(tiny_pipe, tiny_dir):
    """The weights are bitwise the same; the frames agree within a level (a memory-mapped file may take
    other CPU kernels than tensors made in memory), and each load path repeats itself bitwise."""
    from_folder = WanLoraPipeline.from_pretrained(str(tiny_dir))
    assert from_folder.spec.name == "tiny"
    in_memory = dict(tiny_pipe.transformer.named_parameters())
    assert all(torch.equal(p, in_memory[n]) for n, p in from_folder.transformer.named_parameters())
    folder_frames = from_folder.generate("a fox", seed=5, **SMALL).frames
    memory_frames = tiny_pipe.generate("a fox", seed=5, **SMALL).frames
    assert_frames_agree(folder_frames, memory_frames)
    assert np.array_equal(from_folder.generate("a fox", seed=5, **SMALL).frames, folder_frames)
    assert np.array_equal(tiny_pipe.generate("a fox", seed=5, **SMALL).frames, memory_frames)


def test_cpu_loads_fp32_and_bf16_keeps_diffusers_fp32_modules(tiny_pipe, tiny_dir):
    assert tiny_pipe.transformer.dtype == torch.float32
    half = WanLoraPipeline.from_pretrained(str(tiny_dir), dtype=torch.bfloat16)
    transformer = half.transformer
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert transformer.scale_shift_table.dtype == torch.float32
    assert transformer.blocks[0].scale_shift_table.dtype == torch.float32
    assert half.diffusers_pipeline.vae.dtype == torch.float32
    tiny_half = WanLoraPipeline.from_pretrained("tiny", dtype=torch.bfloat16).transformer
    assert {n: p.dtype for n, p in tiny_half.named_parameters()} == {
        n: p.dtype for n, p in transformer.named_parameters()
    }


def test_catalogue_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFound, match="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        WanLoraPipeline.from_pretrained("t2v-1.3b", device="cpu")


def test_unavailable_attention_backend_is_a_clear_error():
    with pytest.raises(InvalidInput, match="needs a CUDA GPU"):
        WanLoraPipeline.from_pretrained("tiny", attention="xformers")
    with pytest.raises(InvalidInput, match="one of auto"):
        WanLoraPipeline.from_pretrained("tiny", attention="fastest")


def test_a_half_precision_attention_kernel_is_refused_for_a_model_computing_in_fp32():
    """Flash, cuDNN and Sage attention take bf16 and fp16 only (diffusers' own constraint, checked by it only when
    DIFFUSERS_ATTN_CHECKS is set; else CUDA's "No available kernel" at the first step): with dtype=torch.float32
    on a GPU they are refused by name when the pipeline is made."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _AttentionBackendRegistry,
        _check_qkv_dtype_bf16_or_fp16,
    )

    from wanlora.models import tiny_spec
    from wanlora.runtime.attention import BACKENDS, choose_backend
    from wanlora.tiny import tiny_pipeline

    for name, backend in BACKENDS.items():
        constraints = _AttentionBackendRegistry._constraints[AttentionBackendName(backend.dispatcher_name)]
        assert backend.half_only == (_check_qkv_dtype_bf16_or_fp16 in constraints), name
    cuda = torch.device("cuda")  # a name here: nothing asks CUDA
    assert choose_backend("sdpa-flash", cuda, dtype=torch.bfloat16) == "sdpa-flash"
    assert choose_backend("sdpa-efficient", cuda, dtype=torch.float32) == "sdpa-efficient"
    with pytest.raises(InvalidInput, match="sdpa-cudnn.*take bf16 or fp16 and the model computes in float32"):
        choose_backend("sdpa-cudnn", cuda, dtype=torch.float32)
    with pytest.raises(InvalidInput, match="sdpa-flash.*take bf16 or fp16 and the model computes in float32"):
        WanLoraPipeline(tiny_pipeline(), tiny_spec(), cuda, attention="sdpa-flash")  # the tiny model is fp32


@pytest.mark.slow
def test_fast_mode_skips_block_work_and_off_is_bit_identical(fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    runs = {"n": 0}
    pipe.transformer.blocks[1].ffn.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))
    settings = {**SMALL, "num_inference_steps": 8, "seed": 3}
    counts, frames = {}, {}
    for mode in ("off", "balanced", "fast", "off"):
        runs["n"] = 0
        frames[mode] = pipe.generate("a fox", fast_mode=mode, **settings).frames
        counts[mode] = runs["n"]
    assert counts["off"] == 16  # 8 steps x (cond + uncond)
    assert counts["fast"] < counts["balanced"] < counts["off"]
    runs["n"] = 0
    plain = WanLoraPipeline.from_pretrained("tiny").generate("a fox", **settings).frames
    assert np.array_equal(frames["off"], plain)  # after fast runs, "off" leaves no trace
    with pytest.raises(InvalidInput, match="fast_mode"):
        pipe.generate("a fox", fast_mode="turbo", **settings)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-i2v"])
def test_cfg_batch_runs_one_forward_per_step_with_the_same_result(model):
    pipe = WanLoraPipeline.from_pretrained(model)
    image = {"image": np.full((48, 64, 3), 90, np.uint8)} if model == "tiny-i2v" else {}
    forwards = {"n": 0}
    pipe.transformer.blocks[0].register_forward_hook(lambda *_: forwards.__setitem__("n", forwards["n"] + 1))

    def run(**options):
        forwards["n"] = 0
        frames = pipe.generate("a fox", seed=3, **SMALL, **image, **options).frames
        return frames, forwards["n"]

    two_passes, two_count = run()
    batched, batched_count = run(cfg_batch=True)
    assert (two_count, batched_count) == (2 * SMALL["num_inference_steps"], SMALL["num_inference_steps"])
    assert np.abs(batched.astype(int) - two_passes.astype(int)).max() <= 1  # matmul order may differ
    assert np.array_equal(run()[0], two_passes)  # the hook leaves no trace when off
    unguided, unguided_count = run(guidance_scale=1.0, cfg_batch=True)
    assert unguided_count == SMALL["num_inference_steps"] and np.array_equal(unguided, run(guidance_scale=1.0)[0])
    with pytest.raises(InvalidInput, match="cfg_batch"):
        pipe.generate("a fox", cfg_batch="yes", **SMALL, **image)


@pytest.mark.slow
def test_fast_mode_runs_the_first_tenth_of_the_steps_in_full(fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    pipe.spec = replace(pipe.spec, fast_thresholds=(1e9, 1e9))  # skip whatever may be skipped
    runs = {"n": 0}
    pipe.transformer.blocks[1].ffn.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))
    for steps, full_steps in ((8, 1), (20, 2), (25, 3)):
        runs["n"] = 0
        pipe.generate("a fox", fast_mode="fast", **{**SMALL, "num_inference_steps": steps, "seed": 3})
        assert runs["n"] == 2 * full_steps, steps  # cond and uncond each


def test_fast_mode_restarts_after_a_schedule_changes_the_weights_mid_run(fresh_tiny_pipe, tmp_path):
    """A residual cached before a strength schedule's re-merge is another model's: the step after runs in full."""
    from .builders import write_lora

    pipe = fresh_tiny_pipe
    pipe.spec = replace(pipe.spec, fast_thresholds=(1e9, 1e9))  # skip whatever may be skipped
    style = tmp_path / "style.safetensors"
    write_lora(style, pipe.transformer, "original", seed=1)
    full = []
    pipe.transformer.blocks[1].ffn.register_forward_hook(
        lambda *_: full.append(pipe.diffusers_pipeline._current_timestep)
    )
    pipe.generate("a fox", fast_mode="fast", loras=[(str(style), [1.0, 0.0])], **{**SMALL, "num_inference_steps": 8})
    timesteps = pipe.diffusers_pipeline.scheduler.timesteps.tolist()
    # steps 1 and 5 (the schedule's second half) in full, cond and uncond each; none other
    assert [float(t) for t in full] == [timesteps[0]] * 2 + [timesteps[4]] * 2


def test_after_a_run_a_schedules_first_value_holds_again(tmp_path):
    """Outside generate a schedule's first value applies: after a run that ended on another, the weights are
    what set_loras gives at the first value (what save_merged would write); after an interrupted run, the set from
    before it, at its first value, never a value from the middle of either schedule."""
    from .builders import write_lora
    from .lora_helpers import assert_bitwise, snapshot

    pipe = WanLoraPipeline.from_pretrained("tiny")
    style = tmp_path / "style.safetensors"
    write_lora(style, pipe.transformer, "original", seed=1)
    reference = WanLoraPipeline.from_pretrained("tiny")
    reference.set_loras([(str(style), 1.0)])
    pipe.generate("a fox", loras=[(str(style), [1.0, 0.0])], **{**SMALL, "num_inference_steps": 4})
    assert_bitwise(pipe.transformer, snapshot(reference.transformer))

    calls = []

    def interrupt(module, args):
        calls.append(1)
        if len(calls) == 5:  # the third step's first pass (two a step: guided), merged at the schedule's 0.5
            raise KeyboardInterrupt

    hook = pipe.transformer.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipe.generate("a fox", loras=[(str(style), [0.0, 0.5, 0.0])], **{**SMALL, "num_inference_steps": 6})
    hook.remove()
    assert_bitwise(pipe.transformer, snapshot(reference.transformer))  # the set before, [1.0, 0.0], at its 1.0


def test_a_generate_that_fails_mid_run_leaves_the_lora_set_it_found(tmp_path):
    """A failure changes nothing: after a generate that stopped in the middle of its denoising, a generate without
    `loras` keeps the set from before it (none here), frames and tags as on a pipeline that never ran it."""
    from wanlora import InternalError

    from .builders import write_lora

    pipe = WanLoraPipeline.from_pretrained("tiny")
    style = tmp_path / "style.safetensors"
    write_lora(style, pipe.transformer, "original", seed=1)
    calls = []

    def fail(module, args):
        calls.append(1)
        if len(calls) == 3:  # the second step's first pass
            raise RuntimeError("a fault in the middle of the denoising")

    hook = pipe.transformer.register_forward_pre_hook(fail)
    with pytest.raises(InternalError, match="a fault in the middle"):
        pipe.generate("a bird", loras=[(str(style), [1.0, 0.5])], fast_mode="fast", cfg_batch=True, **SMALL)
    hook.remove()
    after = pipe.generate("a fox", seed=5, **SMALL)
    alone = WanLoraPipeline.from_pretrained("tiny").generate("a fox", seed=5, **SMALL)
    assert after.metadata == alone.metadata
    assert np.array_equal(after.frames, alone.frames)


def test_offloaded_components_go_home_after_a_failed_call_and_after_an_images_twin(monkeypatch):
    """diffusers returns model-offloaded components to the host (`maybe_free_model_hooks`) at the end of a call that
    ends well, and on the pipeline that enabled the offload only: after a failure, or a call on the per-request
    twin TI2V-5B uses for an image, the transformer or the VAE stayed on the GPU beside the next request's."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    from wanlora import InternalError

    freed = []
    free = DiffusionPipeline.maybe_free_model_hooks
    monkeypatch.setattr(DiffusionPipeline, "maybe_free_model_hooks", lambda self: (freed.append(self), free(self)))
    pipe = WanLoraPipeline.from_pretrained("tiny")
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: 1 / 0)
    with pytest.raises(InternalError, match="ZeroDivisionError"):
        pipe.generate("a bird", **SMALL)
    hook.remove()
    assert freed == [pipe.diffusers_pipeline]
    five = WanLoraPipeline.from_pretrained("tiny-ti2v-5b")
    freed.clear()
    five.generate("a bird", image=Image.new("RGB", (64, 64), "red"), **{**SMALL, "height": 64})  # its 32 px grid
    assert five.diffusers_pipeline in freed


def test_a_hub_repo_outside_the_catalogue_is_identified_by_its_config(fake_hub):
    import json

    from wanlora.hub import model_configs
    from wanlora.models import identify_model, resolve_model, tiny_spec

    from .servers import HubRepo

    flf2v = {**tiny_spec(kind="i2v").arch.transformer_config(), "pos_embed_seq_len": 34}
    index = {"_class_name": "WanImageToVideoPipeline"}
    fake_hub.repos["someone/wan-flf2v"] = HubRepo(
        {"transformer/config.json": json.dumps(flf2v).encode(), "model_index.json": json.dumps(index).encode()}
    )
    assert not resolve_model("someone/wan-flf2v").identified
    spec = identify_model("someone/wan-flf2v")
    assert spec.task.name == "i2v" and spec.arch.takes_last_image and spec.identified
    with pytest.raises(ModelNotFound, match="not a Hub repo you can read"):
        model_configs("someone/missing")


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "fp8"])
def test_compiled_blocks_do_not_recompile_on_lora_swaps(tmp_path, quantize):
    from torch._dynamo.utils import counters

    from wanlora.tiny import tiny_transformer

    from .builders import write_lora

    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "original", seed=1)
    write_lora(tmp_path / "b.safetensors", tiny_transformer(), "loha", seed=2)
    a, b = (str(tmp_path / "a.safetensors"), 1.0), (str(tmp_path / "b.safetensors"), -0.5)
    counters.clear()
    compiled = WanLoraPipeline.from_pretrained("tiny", compile="aot_eager", quantize=quantize)
    first = compiled.generate("a fox", loras=[a], seed=1, **SMALL).frames
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    compiled.generate("a fox", loras=[b], seed=1, **SMALL)
    again = compiled.generate("a fox", loras=[a], seed=1, **SMALL).frames
    assert counters["stats"]["unique_graphs"] == graphs  # weights changed in place: no new graph
    assert np.array_equal(first, again)
    eager = WanLoraPipeline.from_pretrained("tiny", quantize=quantize).generate("a fox", loras=[a], seed=1, **SMALL)
    eager = eager.frames
    assert np.abs(eager.astype(int) - first.astype(int)).max() <= 1


@pytest.mark.slow
def test_compile_and_fast_mode_work_together(tiny_pipe):
    """First Block Cache's hooks run around the compiled blocks, not inside one graph (which dynamo refuses)."""
    from torch._dynamo.utils import counters

    options = {**SMALL, "num_inference_steps": 6, "seed": 3}
    torch._dynamo.reset()  # the blocks' code may be compiled already, by another test
    counters.clear()
    compiled = WanLoraPipeline.from_pretrained("tiny", compile="aot_eager")
    fast = compiled.generate("a fox", fast_mode="fast", **options).frames
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, every block
    assert np.array_equal(compiled.generate("a fox", fast_mode="fast", **options).frames, fast)
    assert counters["stats"]["unique_graphs"] == 1  # and no recompiling between generations
    eager = tiny_pipe.generate("a fox", fast_mode="fast", **options).frames
    full = tiny_pipe.generate("a fox", fast_mode="off", **options).frames
    assert_frames_agree(fast, eager)
    assert np.abs(fast.astype(int) - full.astype(int)).max() > 1  # blocks were skipped


@pytest.mark.slow
def test_offload_needs_a_gpu_and_the_vae_tiles_only_where_memory_requires(tiny_pipe, monkeypatch, caplog):
    from wanlora.runtime.memory import plan_memory

    for mode in ("encoder", "model"):
        with pytest.raises(InvalidInput, match="offloading moves weights to a GPU"):
            WanLoraPipeline.from_pretrained("tiny", offload=mode)
    with pytest.raises(InvalidInput, match="one of auto, none, encoder, experts, model, group"):
        WanLoraPipeline.from_pretrained("tiny", offload="disk")
    untiled = tiny_pipe.generate("a fox", seed=2, **SMALL)
    assert not tiny_pipe.diffusers_pipeline.vae.use_tiling and untiled.metadata["vae_decode"] == "untiled"
    vae = tiny_pipe.diffusers_pipeline.vae
    calls = []
    original = type(vae).tiled_decode
    monkeypatch.setattr(type(vae), "tiled_decode", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    monkeypatch.setattr(vae, "tile_sample_min_height", 32)
    monkeypatch.setattr(vae, "tile_sample_min_width", 32)
    monkeypatch.setattr(vae, "tile_sample_stride_height", 16)
    monkeypatch.setattr(vae, "tile_sample_stride_width", 16)
    roomy = plan_memory(tiny_pipe.spec, 80 * 2**30, "bf16", size=(64, 48, 9))
    monkeypatch.setattr(tiny_pipe, "memory_plan", roomy)  # a GPU with room: the reference's untiled decode
    assert tiny_pipe.generate("a fox", seed=2, **SMALL).metadata["vae_decode"] == "untiled" and not calls
    monkeypatch.setattr(tiny_pipe, "memory_plan", plan_memory(tiny_pipe.spec, 2**28, "bf16", size=(64, 48, 9)))
    with caplog.at_level(logging.INFO, logger="wanlora"):
        tiled = tiny_pipe.generate("a fox", seed=2, **SMALL)
    assert calls and tiny_pipe.diffusers_pipeline.vae.use_tiling
    assert (
        tiled.metadata["vae_decode"].startswith("tiled: untiled it needs")
        and "GB usable" in tiled.metadata["vae_decode"]
    )
    assert "VAE decode tiled: untiled it needs" in caplog.text
    assert np.abs(tiled.frames.astype(int) - untiled.frames.astype(int)).mean() < 8
    monkeypatch.undo()
    tiny_pipe.generate("a fox", seed=2, **SMALL)
    assert not tiny_pipe.diffusers_pipeline.vae.use_tiling


@pytest.mark.slow
def test_accelerator_preset_stacks_its_lora_and_samples_its_timesteps(tiny_pipe, tiny_dir, tmp_path):
    from wanlora.tiny import tiny_transformer

    from .builders import write_lora

    style = tmp_path / "style.safetensors"
    write_lora(style, tiny_transformer(), "original", seed=2)
    distill = tiny_dir / "accelerators" / "lightx2v-4step.safetensors"  # `wanlora tiny-model`'s stand-in
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir))
    passes = {"n": 0}
    pipe.transformer.blocks[0].ffn.register_forward_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))
    video = pipe.generate(
        "a fox", loras=[(str(style), 0.7)], accelerator="lightx2v-4step", width=64, height=48, num_frames=9, seed=1
    )
    assert passes["n"] == 4  # four steps, one pass each: guidance 1 skips the unconditional pass
    assert [round(float(t), 1) for t in pipe.diffusers_pipeline.scheduler.timesteps] == [1000.0, 937.5, 833.3, 625.0]
    assert [(r.ref, r.strength) for r in pipe.active_loras] == [(str(style), 0.7), (str(distill), 1.0)]
    assert (video.metadata["num_inference_steps"], video.metadata["guidance_scale"], video.metadata["accelerator"]) == (
        4,
        1.0,
        "lightx2v-4step",
    )
    with pytest.raises(InvalidInput, match="4 with lightx2v-4step"):
        pipe.generate("a fox", accelerator="lightx2v-4step", num_inference_steps=6, width=64, height=48, num_frames=9)
    with pytest.raises(InvalidInput, match="write it with `wanlora tiny-model DIR --kind t2v`"):
        tiny_pipe.generate("a fox", accelerator="causvid", width=64, height=48, num_frames=9)
    with pytest.raises(InvalidInput, match="one of lightx2v-4step"):
        pipe.generate("a fox", accelerator="turbo", width=64, height=48, num_frames=9)
    plain = pipe.generate("a fox", loras=[], width=64, height=48, num_frames=9, num_inference_steps=2, seed=1)
    assert isinstance(pipe.diffusers_pipeline.scheduler, WanFlowUniPC) and plain.frames.std() > 0
