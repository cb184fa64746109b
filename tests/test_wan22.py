"""Wan2.2: A14B's two experts with a LoRA set each, TI2V-5B, and Wan2.1 LoRAs on Wan2.2.

The tiny stand-ins have the real layouts: two experts and a boundary for A14B (the
high-noise one built with seed 0, the low-noise one with seed 1), Wan2.2's 48-channel VAE
and per-token timesteps for TI2V-5B.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from wanlora import WanLoraPipeline
from wanlora.errors import InternalError, InvalidInput, LoraMismatch, LoraNotFound, OutOfMemory
from wanlora.experts import expert_steps
from wanlora.frontends.service import PredictorInputs
from wanlora.lora.keys import I2V_ONLY
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger, fit_lora
from wanlora.models import CATALOGUE, TINY_ARCH, tiny_spec
from wanlora.pipeline import meta_transformer
from wanlora.runtime.placement import ExpertSwitch
from wanlora.tiny import tiny_transformer
from wanlora.weights.checkpoint import FileTensor

from .builders import lora_tensors, write_lora
from .lora_helpers import assert_bitwise, assert_weights, merge, snapshot
from .servers import HubRepo

FAST = {"num_frames": 5, "num_inference_steps": 4, "seed": 3}
IMAGE = np.full((64, 112, 3), 90, np.uint8)


def expert_base(name: str, arch=TINY_ARCH) -> torch.nn.Module:
    """A fresh copy of a tiny A14B expert as loaded: the high-noise one has seed 0, the low-noise one seed 1."""
    return tiny_transformer(arch, seed=0 if name == "high" else 1)


def experts_of(pipe) -> dict:
    return {expert.name: expert.module for expert in pipe.experts}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Three LoRAs that fit the tiny experts: {name: (path, deltas)}."""
    folder = tmp_path_factory.mktemp("wan22-loras")
    model = tiny_transformer()
    made = {}
    for name, layout, seed in (("a", "original", 11), ("b", "kohya", 12), ("c", "diffusers", 13)):
        path = folder / f"{name}.safetensors"
        made[name] = (str(path), write_lora(path, model, layout, seed=seed))
    return made


def write_pair(folder, high_name="high_noise_model.safetensors", low_name="low_noise_model.safetensors"):
    """A Wan2.2 pair as published: one LoRA file per expert. Returns (high deltas, low deltas)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_transformer()
    return write_lora(folder / high_name, model, "original", seed=21), write_lora(
        folder / low_name, model, "original", seed=22
    )


# ------------------------------------------------------------------ end to end in Python


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "image", "shape"),
    [
        ("tiny-t2v-a14b", None, (5, 64, 112, 3)),
        ("tiny-i2v-a14b", IMAGE, (5, 64, 112, 3)),
        ("tiny-ti2v-5b", None, (5, 64, 128, 3)),
        ("tiny-ti2v-5b", np.full((64, 128, 3), 150, np.uint8), (5, 64, 128, 3)),
    ],
    ids=["t2v-a14b", "i2v-a14b", "ti2v-5b-text", "ti2v-5b-image"],
)
def test_tiny_wan22_models_generate_in_python(model, image, shape):
    pipe = WanLoraPipeline.from_pretrained(model)
    video = pipe.generate("a fox", **FAST, **({} if image is None else {"image": image}))
    assert video.frames.shape == shape and video.frames.std() > 0
    assert video.metadata["model"] == model
    two = model.endswith("a14b")
    assert len(pipe.experts) == (2 if two else 1)
    expected = {"tiny-t2v-a14b": 3.0, "tiny-i2v-a14b": 3.5}.get(model)
    assert video.metadata["guidance_scale_2"] == expected


@pytest.mark.slow
def test_ti2v_conditions_on_its_image_and_i2v_a14b_needs_one():
    pipe = WanLoraPipeline.from_pretrained("tiny-ti2v-5b")
    text = pipe.generate("a fox", **FAST).frames
    red = pipe.generate("a fox", image=np.full((64, 128, 3), (250, 0, 0), np.uint8), **FAST).frames
    assert not np.array_equal(text, red)
    with pytest.raises(InvalidInput, match="tiny-i2v-a14b is image-to-video and needs a start image"):
        WanLoraPipeline.from_pretrained("tiny-i2v-a14b").generate("a fox", **FAST)


# ------------------------------------------------------------------ the expert switch


@pytest.mark.slow
@pytest.mark.parametrize(("model", "steps"), [("tiny-t2v-a14b", 6), ("tiny-i2v-a14b", 5)])
def test_the_experts_switch_at_the_configured_boundary(model, steps):
    """Each expert's forwards, counted: the high-noise one takes every timestep >= boundary x 1000."""
    pipe = WanLoraPipeline.from_pretrained(model)
    boundary = pipe.diffusers_pipeline.config.boundary_ratio * 1000
    assert boundary == {"tiny-t2v-a14b": 875, "tiny-i2v-a14b": 900}[model]
    calls = []
    for expert in pipe.experts:
        expert.module.register_forward_pre_hook(
            lambda module, args, kwargs, name=expert.name: calls.append((name, float(kwargs["timestep"].max()))),
            with_kwargs=True,
        )
    pipe.generate(
        "a fox", num_frames=5, num_inference_steps=steps, seed=1, **({"image": IMAGE} if "i2v" in model else {})
    )
    assert {name for name, _ in calls} == {"high", "low"}
    assert all((name == "high") == (t >= boundary) for name, t in calls)
    names = [name for name, _ in calls]
    high = names.count("high") // 2  # guidance > 1 on both: two forwards a step
    assert names == ["high"] * 2 * high + ["low"] * 2 * (steps - high)
    planned = expert_steps(pipe.diffusers_pipeline.scheduler, steps, pipe.spec.boundary_ratio, pipe.spec.experts)
    assert planned == {"high": range(0, high), "low": range(high, steps)}


@pytest.mark.slow
def test_each_expert_samples_with_its_own_guidance():
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    own = pipe.generate("a fox", guidance_scale=4.0, guidance_scale_2=1.5, **FAST)
    assert (own.metadata["guidance_scale"], own.metadata["guidance_scale_2"]) == (4.0, 1.5)
    same = pipe.generate("a fox", guidance_scale=4.0, **FAST)  # one scale given: both experts use it
    assert same.metadata["guidance_scale_2"] == 4.0
    assert not np.array_equal(own.frames, same.frames)
    with pytest.raises(InvalidInput, match="guidance_scale_2=3.0 is not allowed: at most 1 when guidance_scale"):
        pipe.generate("a fox", guidance_scale=1.0, guidance_scale_2=3.0, **FAST)


# ------------------------------------------------------------------ a LoRA set per expert, exact

TARGETS = st.sampled_from(["both", "high", "low", "split"])
STRENGTHS = st.floats(min_value=-2, max_value=3, allow_nan=False, allow_infinity=False, width=32)
REQUEST = st.tuples(st.sampled_from("abc"), STRENGTHS, STRENGTHS, TARGETS)
SETS = st.lists(REQUEST, max_size=3, unique_by=lambda r: r[0])


@pytest.fixture(scope="module")
def a14b():
    return WanLoraPipeline.from_pretrained("tiny-t2v-a14b")


def as_request(path: str, first: float, second: float, target: str):
    if target == "split":  # the same LoRA at its own strength on each expert, as Lightning is often run
        return (path, {"high": first, "low": second})
    return (path, first, target)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(SETS, min_size=1, max_size=5))
def test_each_expert_holds_its_base_plus_its_own_loras_after_any_history(a14b, loras, history):
    """After any swap history, each expert is bitwise what one merge of its own LoRAs onto its base gives."""
    for requests in history:
        a14b.set_loras([as_request(loras[key][0], s1, s2, target) for key, s1, s2, target in requests])
    for name, module in experts_of(a14b).items():
        own = []
        for key, s1, s2, target in history[-1]:
            if target == "split":
                own.append((read_lora(loras[key][0]), s1 if name == "high" else s2))
            elif target in ("both", name):
                own.append((read_lora(loras[key][0]), s1))
        reference = expert_base(name)
        merge(LoraMerger(reference), own)
        assert_bitwise(module, snapshot(reference))


def test_re_merging_one_expert_never_touches_the_other(a14b, loras, monkeypatch):
    a14b.set_loras([(loras["a"][0], 1.0, "low")])
    high = snapshot(a14b.experts[0].module)
    writers = []
    original = LoraMerger._write

    def spy(self, name, terms):
        writers.append(self)
        return original(self, name, terms)

    monkeypatch.setattr(LoraMerger, "_write", spy)
    a14b.set_loras([(loras["b"][0], 0.5, "low")])
    assert writers and set(map(id, writers)) == {id(a14b.experts[1].loras.merger)}
    assert_bitwise(a14b.experts[0].module, high)


def test_strength_schedules_span_their_own_experts_steps(loras):
    """A schedule on the low-noise expert splits the low-noise steps; the high-noise expert's weights stay put."""
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    path, deltas = loras["a"]
    probe_name = "blocks.0.attn1.to_q.weight"
    seen = []
    for expert in pipe.experts:
        param = dict(expert.module.named_parameters())[probe_name]
        expert.module.register_forward_pre_hook(
            lambda module, args, name=expert.name, p=param: seen.append((name, p.detach().clone()))
        )
    steps = 6
    pipe.generate(
        "a fox",
        num_frames=5,
        num_inference_steps=steps,
        seed=2,
        loras=[(path, {"low": [1.0, 0.0]}), (loras["b"][0], [0.5, 2.0], "high")],
    )
    ranges = expert_steps(pipe.diffusers_pipeline.scheduler, steps, pipe.spec.boundary_ratio, pipe.spec.experts)
    high_steps, low_steps = len(ranges["high"]), len(ranges["low"])
    assert high_steps >= 2 and low_steps >= 2
    base = {name: dict(expert_base(name).named_parameters())[probe_name].detach() for name in ("high", "low")}
    b_delta = loras["b"][1][probe_name]
    expected = []
    for step in range(high_steps):
        strength = 0.5 if step * 2 // high_steps == 0 else 2.0
        expected += [("high", base["high"] + strength * b_delta)] * 2
    for step in range(low_steps):
        strength = 1.0 if step * 2 // low_steps == 0 else 0.0
        expected += [("low", base["low"] + strength * deltas[probe_name])] * 2
    assert [name for name, _ in seen] == [name for name, _ in expected]
    for (_, got), (_, want) in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ pairs


def test_a_local_pair_folder_puts_each_file_on_its_expert(tmp_path, caplog):
    high, low = write_pair(tmp_path / "lightning")
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    bases = {name: snapshot(expert_base(name)) for name in ("high", "low")}
    caplog.set_level(logging.INFO, logger="wanlora")
    pipe.set_loras([(str(tmp_path / "lightning"), 1.0)])
    assert "is a Wan2.2 pair" in caplog.text and "on the high-noise expert" in caplog.text
    assert_weights(pipe.experts[0].module, bases["high"], [(high, 1.0)])
    assert_weights(pipe.experts[1].module, bases["low"], [(low, 1.0)])
    pipe.set_loras([(str(tmp_path / "lightning"), {"high": 3.0, "low": 1.0})])  # each file at its own strength
    assert_weights(pipe.experts[0].module, bases["high"], [(high, 3.0)])
    assert_weights(pipe.experts[1].module, bases["low"], [(low, 1.0)])
    pipe.set_loras([(str(tmp_path / "lightning"), 2.0, "low")])  # aimed at one expert: only its file
    assert_weights(pipe.experts[0].module, bases["high"], [])
    assert_weights(pipe.experts[1].module, bases["low"], [(low, 2.0)])


@pytest.mark.parametrize(
    ("files", "ref"),
    [
        (("high_noise_model.safetensors", "low_noise_model.safetensors"), "alice/wan22-style"),
        (("style_HIGH_e30.safetensors", "style_LOW_e30.safetensors"), "alice/wan22-style"),
        (("T2V-4steps/high_noise_model.safetensors", "T2V-4steps/low_noise_model.safetensors"),
         "alice/wan22-style/T2V-4steps"),
    ],
    ids=["noise-model-names", "HIGH-LOW-names", "folder-in-repo"],
)  # fmt: skip
def test_a_hub_pair_lands_on_the_right_experts(fake_hub, offline_net, tmp_path, files, ref, caplog):
    high, low = write_pair(tmp_path / "pair")
    bodies = {
        files[0]: (tmp_path / "pair" / "high_noise_model.safetensors").read_bytes(),
        files[1]: (tmp_path / "pair" / "low_noise_model.safetensors").read_bytes(),
    }
    if "/" in files[0]:
        bodies["other/unrelated.safetensors"] = bodies[files[0]]  # another folder's files are not the pair's
    fake_hub.repos["alice/wan22-style"] = HubRepo(bodies)
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    caplog.set_level(logging.INFO, logger="wanlora")
    pipe.set_loras([(ref, 0.7)])
    assert f"{ref} is a Wan2.2 pair" in caplog.text
    assert_weights(pipe.experts[0].module, snapshot(expert_base("high")), [(high, 0.7)])
    assert_weights(pipe.experts[1].module, snapshot(expert_base("low")), [(low, 0.7)])


def test_a_file_named_for_one_expert_given_for_both_goes_on_that_expert_only_with_a_log_line(tmp_path, caplog):
    high, _ = write_pair(tmp_path / "pair")
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    caplog.set_level(logging.INFO, logger="wanlora")
    pipe.set_loras([(str(tmp_path / "pair" / "high_noise_model.safetensors"), 1.0)])
    assert "goes on the high-noise expert only: its file name high_noise_model.safetensors says" in caplog.text
    assert_weights(pipe.experts[0].module, snapshot(expert_base("high")), [(high, 1.0)])
    assert_weights(pipe.experts[1].module, snapshot(expert_base("low")), [])


def test_a_pair_on_a_one_transformer_model_is_refused_and_nothing_changes(tmp_path, tiny_pipe):
    write_pair(tmp_path / "pair")
    before = snapshot(tiny_pipe.transformer)
    with pytest.raises(InvalidInput, match="Wan2.2 high/low pair, and this model has one transformer"):
        tiny_pipe.set_loras([(str(tmp_path / "pair"), 1.0)])
    with pytest.raises(InvalidInput, match="tiny has one transformer, not Wan2.2 A14B's two experts"):
        tiny_pipe.set_loras([(str(tmp_path / "pair" / "high_noise_model.safetensors"), 1.0, "high")])
    assert_bitwise(tiny_pipe.transformer, before)


def test_a_folder_of_unrelated_files_asks_which_one(tmp_path):
    from wanlora.lora.fetch import fetch_lora_files

    write_pair(tmp_path / "three")
    write_lora(tmp_path / "three" / "extra.safetensors", tiny_transformer(), "original")
    with pytest.raises(LoraNotFound, match="several .safetensors files and no single high/low pair"):
        fetch_lora_files(str(tmp_path / "three"))


# ------------------------------------------------------------------ Wan2.1 LoRAs on Wan2.2


def test_a_wan21_i2v_lora_on_wan22_i2v_skips_the_image_branch_with_one_warning(tmp_path, caplog):
    i2v_lora = write_lora(
        tmp_path / "i2v.safetensors", tiny_transformer(tiny_spec(kind="i2v").arch), "original", seed=4
    )
    branch = {name for name in i2v_lora if I2V_ONLY.search(name)}
    assert branch  # k_img / v_img
    pipe = WanLoraPipeline.from_pretrained("tiny-i2v-a14b")
    i2v_arch = tiny_spec(kind="i2v-a14b").arch
    bases = {name: snapshot(expert_base(name, i2v_arch)) for name in ("high", "low")}
    caplog.set_level(logging.WARNING, logger="wanlora")
    pipe.set_loras([(str(tmp_path / "i2v.safetensors"), 0.9)])
    warnings = [r.getMessage() for r in caplog.records if "image-branch" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "Wan2.2 A14B image-to-video takes the image through its latents and has no image branch" in warnings[0]
    rest = {name: delta for name, delta in i2v_lora.items() if name not in branch}
    for expert in pipe.experts:
        assert_weights(expert.module, bases[expert.name], [(rest, 0.9)])
    video = pipe.generate("a fox", image=IMAGE, **FAST)
    assert video.frames.shape == (5, 64, 112, 3)


def small_wan21_lora(path, width: int) -> None:
    """Two deltas of a real-width Wan2.1 LoRA (its widths are all the checks read)."""
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, width),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(width, 2),
    }
    save_file(tensors, str(path))


def test_wan21_loras_on_the_real_wan22_shapes(tmp_path):
    """A 14B LoRA fits the A14B experts; 1.3B and 14B ones are refused by TI2V-5B, naming their base."""
    small_wan21_lora(tmp_path / "small.safetensors", 1536)
    small_wan21_lora(tmp_path / "big.safetensors", 5120)
    small, big = read_lora(tmp_path / "small.safetensors"), read_lora(tmp_path / "big.safetensors")
    for name in ("t2v-a14b", "i2v-a14b"):
        params = dict(meta_transformer(CATALOGUE[name]).named_parameters())
        assert set(fit_lora(big, params).deltas) == {"blocks.0.attn1.to_q.weight"}
    ti2v = dict(meta_transformer(CATALOGUE["ti2v-5b"]).named_parameters())
    with pytest.raises(
        LoraMismatch,
        match=r"made for Wan2.1 1.3B \(dim 1536\); this model \(Wan2.2 TI2V-5B text-and-image-to-video\) has dim 3072",
    ):
        fit_lora(small, ti2v)
    with pytest.raises(LoraMismatch, match=r"made for Wan2.1 14B or Wan2.2 A14B \(dim 5120\)"):
        fit_lora(big, ti2v)


def test_a_lora_of_another_width_on_tiny_ti2v_is_refused_and_nothing_changes(tmp_path):
    """The tiny TI2V and a LoRA of another width: nothing is written."""
    pipe = WanLoraPipeline.from_pretrained("tiny-ti2v-5b")
    before = snapshot(pipe.transformer)
    wide = {"blocks.0.attn1.to_q.weight": (48, 48), "blocks.0.attn1.to_k.weight": (48, 48)}
    save_file(lora_tensors(wide, "original", rank=2)[0], str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoraMismatch, match=r"dim 48.*this model \(Wan2.2 TI2V-5B .*\) has dim 24"):
        pipe.set_loras([(str(tmp_path / "wide.safetensors"), 1.0)])
    assert_bitwise(pipe.transformer, before)


# ------------------------------------------------------------------ accelerator and memory


def test_the_lightning_accelerator_puts_its_pair_on_the_experts_and_samples_4_steps(tiny_dir_a14b, caplog):
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b))
    calls = []
    for expert in pipe.experts:
        expert.module.register_forward_pre_hook(lambda module, args, name=expert.name: calls.append(name))
    video = pipe.generate("a fox", num_frames=5, seed=1, accelerator="lightx2v-4step")
    assert video.metadata["num_inference_steps"] == 4 and video.metadata["accelerator"] == "lightx2v-4step"
    assert (video.metadata["guidance_scale"], video.metadata["guidance_scale_2"]) == (1.0, 1.0)
    assert calls == ["high", "high", "low", "low"]  # no unconditional pass; 1000, 937.5 | 833, 625 around 875
    folder = tiny_dir_a14b / "accelerators" / "lightx2v-4step"
    for expert, file in zip(pipe.experts, ("high_noise_model", "low_noise_model"), strict=True):
        (chosen,) = expert.loras.active
        assert chosen.lora.path == str(folder / f"{file}.safetensors")


def test_each_new_a14b_release_runs_on_its_stand_ins_at_its_strengths(tiny_dir_a14b, tmp_path):
    from PIL import Image

    from wanlora.tiny import write_tiny_model

    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b))
    for preset in ("lightning-250928", "lightx2v-1217"):
        video = pipe.generate("a fox", width=64, height=48, num_frames=5, seed=1, accelerator=preset, progress=False)
        assert (video.metadata["accelerator"], video.metadata["num_inference_steps"]) == (preset, 4)
        for expert, file in zip(pipe.experts, ("high_noise_model", "low_noise_model"), strict=True):
            (chosen,) = expert.loras.active
            assert chosen.lora.path == str(tiny_dir_a14b / "accelerators" / preset / f"{file}.safetensors")
    i2v = WanLoraPipeline.from_pretrained(str(write_tiny_model(tmp_path / "i2v", kind="i2v-a14b")))
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    for preset, strengths in (("lightx2v-1022", (1.0, 1.0)), ("lightx2v-moe", (1.0, 1.0)), ("rcm", (4.0, 1.0))):
        small = {"width": 64, "height": 48, "num_frames": 5, "seed": 1, "progress": False}
        video = i2v.generate("a fox", image=image, accelerator=preset, **small)
        assert (video.metadata["accelerator"], video.metadata["num_inference_steps"]) == (preset, 4)
        assert tuple(expert.loras.active[0].request.strength for expert in i2v.experts) == strengths


def test_three_phases_guide_the_first_step_without_the_accelerator_and_switch_experts_at_800(tiny_dir_a14b):
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b))
    high = pipe.experts[0].module
    base = high.blocks[0].attn1.to_q.weight.detach().clone()
    calls, forwards = [], []
    for expert in pipe.experts:
        expert.module.register_forward_pre_hook(
            lambda module, args, kwargs, name=expert.name: calls.append(
                (name, round(float(kwargs["timestep"][0]), 1), torch.equal(high.blocks[0].attn1.to_q.weight, base))
            ),
            with_kwargs=True,
        )
        expert.module.blocks[0].register_forward_hook(
            lambda module, args, output, name=expert.name: forwards.append((name, output.shape[0]))
        )
    small = {"width": 64, "height": 48, "num_frames": 5, "seed": 1, "progress": False}
    video = pipe.generate("a fox", accelerator="lightning-3phase", **small)
    assert calls == [
        ("high", 1000.0, True),  # phase 1: guided (cond and uncond), without the accelerator
        ("high", 1000.0, True),
        ("high", 947.4, False),  # phase 2: the accelerator merged, one pass a step
        ("high", 882.5, False),
        ("high", 800.3, False),
        ("low", 692.8, False),  # phase 3: the low-noise expert from t <= 800, not from the boundary at 875
        ("low", 546.3, False),
        ("low", 334.9, False),
        ("low", 3.0, False),
    ]
    assert video.metadata["phases"] == "phase 1 = steps 1-1, phase 2 = steps 2-4, phase 3 = steps 5-8"
    assert (video.metadata["guidance_scale"], video.metadata["guidance_scale_2"]) == (3.5, 1.0)
    assert pipe.diffusers_pipeline.config.boundary_ratio == 0.875  # the model's own switch, back
    forwards.clear()
    batched = pipe.generate("a fox", accelerator="lightning-3phase", cfg_batch=True, **small)
    assert forwards == [("high", 2)] + [("high", 1)] * 3 + [("low", 1)] * 4  # the guided step as one batch of two
    assert np.abs(batched.frames.astype(int) - video.frames.astype(int)).max() <= 1  # matmul order may differ
    calls.clear()
    after = pipe.generate("a fox", accelerator="lightx2v-4step", **small)
    fresh = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b))
    assert np.array_equal(after.frames, fresh.generate("a fox", accelerator="lightx2v-4step", **small).frames)
    assert [name for name, *_ in calls] == ["high", "high", "low", "low"]  # nothing left of the phases


def test_after_the_three_phase_recipe_a_plain_run_is_the_fresh_models(tiny_dir_a14b, loras):
    """The recipe moves the expert switch, ends guidance after its first phase, samples on Wan2GP's Euler grid and
    stacks a scheduled pair; a plain run after it, and after one stopped in its guided phase with batched
    guidance and fast mode, gets the model's own switch, guidance (4 and 3) and UniPC: the fresh model's video."""
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b))
    small = {"width": 64, "height": 48, "num_frames": 5, "progress": False}
    recipe = {"accelerator": "lightning-3phase", "loras": [(loras["a"][0], [1.0, 0.5], "low")], "seed": 3}
    pipe.generate("a bird", **recipe, **small)
    plain = {"loras": [], "num_inference_steps": 3, "seed": 1, **small}
    after = pipe.generate("a fox", **plain)

    def stop(module, args):
        raise RuntimeError("stopped in the guided phase")

    hook = pipe.experts[0].module.register_forward_pre_hook(stop)
    with pytest.raises(InternalError, match="stopped in the guided phase"):
        pipe.generate("a bird", cfg_batch=True, fast_mode="fast", **recipe, **small)
    hook.remove()
    after_stop = pipe.generate("a fox", **plain)
    alone = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b)).generate("a fox", **plain)
    for video in (after, after_stop):
        assert video.metadata == alone.metadata
        assert (video.metadata["guidance_scale"], video.metadata["guidance_scale_2"]) == (4.0, 3.0)
        assert np.array_equal(video.frames, alone.frames)


def test_your_own_schedule_keeps_its_equal_phases_beside_the_three_phase_accelerator(tiny_dir_a14b, loras):
    """The preset's per-step schedule (4 values on the 4 high-noise steps) and a user's [1.0, 0.5] each split the
    expert's steps by their own length: the user's halves stay halves."""
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b))
    high = pipe.experts[0]
    seen = []
    high.module.register_forward_pre_hook(
        lambda module, args: seen.append(
            tuple(t.strength for t in high.loras.merger.plan.get("blocks.0.attn1.to_q.weight", []))
        )
    )
    style = loras["a"][0]
    small = {"width": 64, "height": 48, "num_frames": 5, "seed": 1, "progress": False}
    pipe.generate("a fox", accelerator="lightning-3phase", loras=[(style, [1.0, 0.5], "high")], **small)
    # (yours, the accelerator's) per high-noise call; the guided first step makes two calls
    assert seen == [(1.0,), (1.0,), (1.0, 1.0), (0.5, 1.0), (0.5, 1.0)]


def test_three_phases_run_on_image_to_video_with_their_own_pair(tmp_path, caplog):
    from PIL import Image

    from wanlora.tiny import write_tiny_model

    i2v = WanLoraPipeline.from_pretrained(str(write_tiny_model(tmp_path / "i2v", kind="i2v-a14b")))
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    small = {"width": 64, "height": 48, "num_frames": 5, "seed": 1, "progress": False}
    with caplog.at_level(logging.INFO):
        video = i2v.generate("a fox", image=image, accelerator="lightning-3phase", **small)
    # the pair's folder is asked for once per expert: each request says the one file it placed, and is applied once
    placed = [r.getMessage().split(": ", 1)[1] for r in caplog.records if "is a Wan2.2 pair" in r.getMessage()]
    assert placed == [
        "high_noise_model.safetensors on the high-noise expert",
        "low_noise_model.safetensors on the low-noise expert",
    ]
    assert sum(r.getMessage().startswith("applied ") for r in caplog.records) == 2
    assert (video.metadata["num_inference_steps"], video.metadata["flow_shift"]) == (8, 5.0)
    assert video.metadata["phases"] == "phase 1 = steps 1-1, phase 2 = steps 2-4, phase 3 = steps 5-8"
    strengths = [(expert.name, [c.request.strength for c in expert.loras.active]) for expert in i2v.experts]
    assert strengths == [("high", [(0.0, 1.0, 1.0, 1.0)]), ("low", [1.0])]


def test_the_cli_and_the_predictor_run_three_phases(tiny_dir_a14b, tmp_path):
    from wanlora.frontends.service import VideoService

    from .conftest import recorded, run_cli
    from .test_cli import fox_with_preset_steps

    fox = fox_with_preset_steps(tiny_dir_a14b)  # the preset's own 8
    result = run_cli(*fox, "--frames", "5", "--accelerator", "lightning-3phase", "-o", str(tmp_path / "cli.mp4"))
    assert result.returncode == 0, result.stderr
    tags = recorded(tmp_path / "cli.mp4")
    assert (tags["accelerator"], tags["num_inference_steps"], tags["guidance_scale"], tags["flow_shift"]) == (
        "lightning-3phase",
        8,
        3.5,
        3.0,
    )
    assert tags["phases"] == "phase 1 = steps 1-1, phase 2 = steps 2-4, phase 3 = steps 5-8"
    refused = run_cli(*fox, "--accelerator", "lightning-3phase", "--guidance-2", "3", "-o", str(tmp_path / "no.mp4"))
    assert refused.returncode == 2 and "the low-noise expert's phase runs unguided" in refused.stderr
    service = VideoService(override=str(tiny_dir_a14b), i2v_override="")
    inputs = PredictorInputs(prompt="a fox", model="2.2-a14b", accelerator="lightning-3phase", num_frames=5, seed=7)
    made = service.generate(inputs, tmp_path)
    assert made.steps == 8 and recorded(made.path)["phases"] == tags["phases"]
    with pytest.raises(InvalidInput, match="sample_guide_scale_2=2.0 is not allowed: left out with lightning-3phase"):
        service.resolve(replace(inputs, sample_guide_scale_2=2.0))


@pytest.fixture(scope="module")
def tiny_dir_a14b(tmp_path_factory):
    from wanlora.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("a14b") / "model", kind="t2v-a14b")


def test_expert_switching_defers_a_merge_to_the_experts_turn_and_changes_nothing(loras):
    """The waiting expert's LoRA change is merged when it comes back; the video is the same as without switching."""
    plain = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    switched = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    switch = ExpertSwitch([(e.module, e.loras) for e in switched.experts], torch.device("cpu"))
    low = switched.experts[1]
    assert low.loras.deferred and not switched.experts[0].loras.deferred
    before = snapshot(low.module)
    request = [(loras["a"][0], 0.8), (loras["b"][0], 1.5, "low")]
    switched.set_loras(request)
    assert low.loras.pending is not None
    assert_bitwise(low.module, before)  # nothing written while it waits in host memory
    assert [c.request.ref for c in low.loras.active] == [loras["a"][0], loras["b"][0]]
    video = switched.generate("a fox", **FAST)
    assert switch.switches == 1  # to the low-noise expert at the boundary
    assert low.loras.pending is None
    reference = expert_base("low")
    merge(LoraMerger(reference), [(read_lora(loras["a"][0]), 0.8), (read_lora(loras["b"][0]), 1.5)])
    assert_bitwise(low.module, snapshot(reference))
    expected = plain.generate("a fox", loras=request, **FAST)
    assert np.array_equal(video.frames, expected.frames)


@pytest.mark.slow
def test_an_expert_leaving_unchanged_copies_nothing_back(loras):
    """Each expert keeps its host copy while it works: leaving, it copies back only the weights a LoRA merge
    changed since it came (28.6 GB a switch on a real 14B expert otherwise), and the videos stay exact."""
    plain = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    switch = ExpertSwitch([(e.module, e.loras) for e in pipe.experts], torch.device("cpu"))
    high, low = pipe.experts
    pipe.generate("a fox", **FAST)  # the first departures (the low-noise expert at load, the high at the boundary)
    copied = switch.bytes_back
    assert copied == sum(arena.nbytes for arena in switch.arenas.values())
    assert np.array_equal(pipe.generate("a fox", **FAST).frames, plain.generate("a fox", **FAST).frames)
    assert switch.bytes_back == copied and switch.switches == 3  # two more switches, nothing copied back
    request = [(loras["a"][0], 0.8)]
    pipe.set_loras(request)  # merged into the low-noise expert now (on the GPU), into the high one on its turn
    video = pipe.generate("a fox", **FAST)
    changed = sum(p.numel() * p.element_size() for n, p in low.module.named_parameters() if n in low.loras.merger.plan)
    assert changed and switch.bytes_back == copied + 2 * changed  # both left with LoRA-changed weights
    assert np.array_equal(video.frames, plain.generate("a fox", loras=request, **FAST).frames)
    copied = switch.bytes_back
    assert np.array_equal(pipe.generate("a fox", **FAST).frames, video.frames) and switch.bytes_back == copied
    pipe.set_loras([])  # and back: the host copies hold the base weights again
    assert np.array_equal(pipe.generate("a fox", **FAST).frames, plain.generate("a fox", loras=[], **FAST).frames)
    assert switch.bytes_back == copied + 2 * changed
    for expert in (high, low):
        assert_bitwise(expert.module, snapshot(expert_base(expert.name)))


def test_a_deferred_merge_that_fails_keeps_the_previous_set(loras, monkeypatch):
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    switch = ExpertSwitch([(e.module, e.loras) for e in pipe.experts], torch.device("cpu"))
    high = pipe.experts[0]
    pipe.set_loras([(loras["a"][0], 1.0)])
    pipe.generate("a fox", **FAST)  # the low-noise expert stays on the GPU after it
    assert high.loras.deferred
    merged = snapshot(high.module)
    pipe.set_loras([(loras["b"][0], 1.0)])  # waits for the high-noise expert's next turn

    write = high.loras.merger._write

    def broken(name, terms):  # writing the new set fails; putting the old one back works
        if any(term.label == loras["b"][0] for term in terms):
            raise RuntimeError("the device failed")
        write(name, terms)

    monkeypatch.setattr(high.loras.merger, "_write", broken)
    with pytest.raises(InternalError, match="RuntimeError inside wanlora .*the device failed"):  # the boundary's
        pipe.generate("a fox", **FAST)
    monkeypatch.undo()
    assert switch.active is high.module and high.loras.pending is None
    assert_bitwise(high.module, merged)
    assert [c.request.ref for c in high.loras.active] == [loras["a"][0]]


class OutOfMemoryAt(TorchFunctionMode):
    """CUDA's out-of-memory error at the `at`-th copy an expert switch makes (`Tensor.to(..., copy=True)`)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.copies, self.at = 0, at

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and kwargs.get("copy"):
            self.copies += 1
            if self.copies == self.at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 MiB")
        return func(*args, **kwargs)


def test_a_switch_stopped_half_way_leaves_the_model_usable():
    """Out of GPU memory (or a cancellation) while the low-noise expert comes in: a clear OutOfMemory, the copies
    made go, and the next generation brings each expert wholly to the GPU before it runs; never does an expert
    compute from its host copy (on a GPU: host weights beside GPU activations, a device error on every run)."""
    plain = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    pipe = WanLoraPipeline.from_pretrained("tiny-t2v-a14b")
    switch = ExpertSwitch([(e.module, e.loras) for e in pipe.experts], torch.device("cpu"))
    from_host = []

    def ran_from_host(module, args):  # after the switch's own pre-hook: the weights the forward reads
        arena = switch.arenas.get(id(module))
        pointers = {p.untyped_storage().data_ptr() for p in module.parameters()}
        from_host.append(arena is not None and arena.storage.data_ptr() in pointers)

    for expert in pipe.experts:
        expert.module.register_forward_pre_hook(ran_from_host)
    with OutOfMemoryAt(3), pytest.raises(OutOfMemory, match="out of memory .*CUDA out of memory"):
        pipe.generate("a fox", **FAST)  # the high-noise expert leaves; the low-noise one fails at its third weight
    low = pipe.experts[1].module
    assert all(p.untyped_storage().data_ptr() == switch.arenas[id(low)].storage.data_ptr() for p in low.parameters())
    from_host.clear()
    video = pipe.generate("a fox", **FAST)
    assert from_host and not any(from_host)
    assert np.array_equal(video.frames, plain.generate("a fox", **FAST).frames)


def test_a_waiting_fp8_experts_rows_and_scales_wait_together_and_take_loras(tiny_dir_a14b, loras, monkeypatch):
    """offload="experts": the waiting expert is in host memory whole, its fp8 layers' scales too. Left on the GPU
    beside their rows on the host, proving W0 from the checkpoint compared the two across devices, and every LoRA
    on an fp8 A14B failed (a 24 or 32 GB card's plan for it)."""
    from wanlora.weights import host_memory

    from .stand_in_gpu import StandInGPU

    monkeypatch.setattr(host_memory, "cuda_register", lambda pointer, size: None)
    monkeypatch.setattr(host_memory, "cuda_unregister", lambda pointer: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir_a14b), quantize="fp8")
    low = pipe.experts[1]
    with StandInGPU() as gpu:
        ExpertSwitch([(e.module, e.loras) for e in pipe.experts], torch.device("cuda"))
        for name, stored in low.loras.merger.stored.items():
            assert not any(gpu.is_on_gpu(t) for t in stored.data), name
        pipe.set_loras([(loras["a"][0], 0.8)])  # W0 proven from the checkpoint, the waiting expert's merge deferred
    assert low.loras.pending is not None
    assert low.loras.merger.pristine and all(isinstance(p, FileTensor) for p in low.loras.merger.pristine.values())


# ------------------------------------------------------------------ the CLI


def test_cli_runs_a14b_with_a_lora_per_expert_and_records_it(tmp_path, loras):
    from .conftest import recorded, run_cli

    out = tmp_path / "a14b.mp4"
    result = run_cli(
        "generate", "a fox", "--model", "tiny-t2v-a14b", "--frames", "5", "--steps", "4", "--seed", "2",
        "--lora", f"{loras['a'][0]}:0.5", "--lora-high", f"{loras['b'][0]}:3", "--lora-low", f"{loras['b'][0]}:1",
        "--guidance-2", "2.5", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tags = recorded(out)
    assert tags["model"] == "tiny-t2v-a14b" and (tags["guidance_scale"], tags["guidance_scale_2"]) == (4.0, 2.5)
    assert tags["loras"] == [
        {"ref": loras["a"][0], "strength": 0.5},
        {"ref": loras["b"][0], "strength": 3.0, "expert": "high"},
        {"ref": loras["b"][0], "strength": 1.0, "expert": "low"},
    ]
    refused = run_cli(
        "generate", "a fox", "--model", "tiny", "--lora-low", loras["a"][0], "-o", str(tmp_path / "x.mp4")
    )
    assert refused.returncode == 2 and "tiny has one transformer: use --lora" in refused.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_cli_tiny_model_kinds_write_folders_that_generate(tmp_path):
    from PIL import Image

    from .conftest import probe, run_cli
    from .test_reference import best_output_size, image2video_size

    Image.new("RGB", (300, 170), (200, 80, 20)).save(tmp_path / "wide.png")
    runs = {
        "t2v-a14b": ["--accelerator", "lightx2v-4step"],
        "i2v-a14b": ["--image", str(tmp_path / "wide.png"), "--steps", "2"],
        "ti2v-5b": ["--image", str(tmp_path / "wide.png"), "--steps", "2"],
    }
    for kind, args in runs.items():
        folder = tmp_path / kind
        assert run_cli("tiny-model", str(folder), "--kind", kind).returncode == 0
        assert (folder / "transformer_2").is_dir() == kind.endswith("a14b")
        out = tmp_path / f"{kind}.mp4"
        result = run_cli("generate", "a fox", "--model", str(folder), "--frames", "5", *args, "-o", str(out))
        assert result.returncode == 0, result.stderr
        got = probe(out)
        area = 128 * 64 if kind == "ti2v-5b" else 112 * 64  # the tiny presets' areas, as the image's aspect goes
        want = best_output_size(300, 170, 32, 32, area) if kind == "ti2v-5b" else image2video_size(300, 170, area)
        assert (got.width, got.height, len(got.frames)) == (*(want if kind != "t2v-a14b" else (112, 64)), 5)


def test_cli_inspect_names_each_experts_file_and_the_model(tmp_path):
    import json

    from .conftest import run_cli

    write_pair(tmp_path / "pair")
    shown = run_cli("lora", "inspect", str(tmp_path / "pair"), "--model", "tiny-t2v-a14b")
    assert shown.returncode == 0, shown.stderr
    for expert in ("high", "low"):
        assert f"the {expert}-noise expert (Wan2.2 A14B)" in shown.stdout
    write_pair(tmp_path / "named", "motion_HIGH.safetensors", "motion_LOW.safetensors")
    info = json.loads(run_cli("lora", "inspect", str(tmp_path / "named" / "motion_LOW.safetensors"), "--json").stdout)
    assert info["expert"] == "low"
    small_wan21_lora(tmp_path / "small.safetensors", 1536)
    misfit = run_cli("lora", "inspect", str(tmp_path / "small.safetensors"), "--model", "ti2v-5b")
    assert misfit.returncode == 0  # a report, not an error
    assert "does not fit: made for Wan2.1 1.3B (dim 1536); this model (Wan2.2 TI2V-5B" in misfit.stdout


def test_cli_merge_bakes_a_lora_into_each_expert(tmp_path, loras):
    from .conftest import run_cli

    out = tmp_path / "merged"
    result = run_cli(
        "lora",
        "merge",
        "--model",
        "tiny-t2v-a14b",
        "--lora-high",
        f"{loras['a'][0]}:2",
        "--dtype",
        "fp32",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    merged = WanLoraPipeline.from_pretrained(str(out))
    reference = expert_base("high")
    merge(LoraMerger(reference), [(read_lora(loras["a"][0]), 2.0)])
    assert_bitwise(merged.experts[0].module, snapshot(reference))
    assert_bitwise(merged.experts[1].module, snapshot(expert_base("low")))


# ------------------------------------------------------------------ the predictor's inputs


def test_replicates_wan22_inputs_map_onto_the_experts():
    from wanlora.frontends.service import VideoService

    service = VideoService(override="", i2v_override="")
    both = {"lora_weights": "https://example.com/style.safetensors", "lora_scale": 0.8}
    per_expert = {
        "lora_weights_transformer": "https://example.com/h.safetensors",
        "lora_scale_transformer": 3.0,
        "lora_weights_transformer_2": "https://example.com/l.safetensors",
        "lora_scale_transformer_2": 1.0,
    }
    resolved = service.resolve(PredictorInputs(prompt="a fox", model="2.2-a14b", **both, **per_expert))
    assert resolved.model == "t2v-a14b"
    assert [(r.label, r.strength, r.expert) for r in resolved.request.loras] == [
        ("https://example.com/style.safetensors", 0.8, "both"),
        ("https://example.com/h.safetensors", 3.0, "high"),
        ("https://example.com/l.safetensors", 1.0, "low"),
    ]
    settings = resolved.request.settings
    assert (settings.guidance_scale, settings.guidance_scale_2, settings.flow_shift) == (4.0, 3.0, 12.0)
    assert (settings.num_frames, settings.fps, settings.num_inference_steps) == (81, 16, 30)
    one = service.resolve(
        PredictorInputs(prompt="a fox", model="14b", lora_weights_transformer="https://example.com/h.safetensors")
    )
    assert [r.expert for r in one.request.loras] == ["both"]  # diffusers' `transformer`: the only one here
    with pytest.raises(InvalidInput, match="lora_weights_transformer_2=.*only model=2.2-a14b has a second"):
        service.resolve(
            PredictorInputs(prompt="a fox", model="14b", lora_weights_transformer_2="https://example.com/l.safetensors")
        )
    with pytest.raises(InvalidInput, match="sample_guide_scale_2=2.0 .*only model=2.2-a14b"):
        service.resolve(PredictorInputs(prompt="a fox", model="2.2-5b", sample_guide_scale_2=2.0))
    with pytest.raises(InvalidInput, match="lora_scale_transformer=4.0 is not allowed"):
        service.resolve(
            PredictorInputs(prompt="a fox", model="2.2-a14b", **{**per_expert, "lora_scale_transformer": 4.0})
        )


def test_replicates_model_choices_pick_the_wan22_variants():
    from wanlora.frontends.service import VideoService

    service = VideoService(override="", i2v_override="")
    ti2v = service.resolve(
        PredictorInputs(prompt="a fox", model="2.2-5b", resolution="480p")
    )  # one trained size: resolution is moot
    assert ti2v.model == "ti2v-5b"
    assert (ti2v.request.settings.width, ti2v.request.settings.height) == (1280, 704)
    assert (ti2v.request.settings.num_frames, ti2v.request.settings.fps) == (121, 24)
    with pytest.raises(InvalidInput, match="aspect_ratio='1:1' is not allowed: t2v-a14b was trained at 16:9, 9:16"):
        service.resolve(PredictorInputs(prompt="a fox", model="2.2-a14b", aspect_ratio="1:1"))
    assert service.model_for("2.2-a14b", image=True) == "i2v-a14b"
    assert service.model_for("2.2-5b", image=True) == "ti2v-5b"
    assert service.model_for("14b", image=True, resolution="720p") == "i2v-14b-720p"
    with pytest.raises(InvalidInput, match="model=1.3b is text-to-video only; use 14b or 2.2-a14b or 2.2-5b"):
        service.model_for("1.3b", image=True)
    lightning = service.resolve(PredictorInputs(prompt="a fox", model="2.2-a14b", accelerator="lightx2v-4step"))
    settings = lightning.request.settings
    assert (settings.num_inference_steps, settings.guidance_scale, settings.guidance_scale_2) == (4, 1.0, 1.0)
    assert [r.ref for r in lightning.request.accelerator_loras] == [
        "lightx2v/Wan2.2-Lightning/Wan2.2-T2V-A14B-4steps-lora-rank64-Seko-V1.1"
    ]


@pytest.mark.parametrize(("kind", "offload"), [("t2v", "none"), ("t2v-a14b", "experts")])
def test_releasing_a_model_frees_its_transformers(kind, offload):
    """The service drops a model before loading the next: nothing may keep its transformers alive
    (57 GB for A14B's experts), neither the guidance hooks nor the expert switch with its pinned copy."""
    import gc
    import weakref

    from wanlora.models import tiny_spec
    from wanlora.tiny import tiny_pipeline

    pipe = WanLoraPipeline(tiny_pipeline(kind=kind), tiny_spec(kind=kind), torch.device("cpu"), offload=offload)
    assert (pipe.switch is not None) == (offload == "experts")
    alive = [weakref.ref(expert.module) for expert in pipe.experts]
    pipe.release_transformer()
    gc.collect()
    assert [ref() for ref in alive] == [None] * len(alive)
