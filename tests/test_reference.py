"""Sampling as the original Wan code samples: its timesteps, expert split, negative prompt, frame size and defaults.

The expected values come from the reference's own formulas, written out here from reading
Wan-Video/Wan2.1 and Wan-Video/Wan2.2 (wan/utils/fm_solvers_unipc.py, image2video.py,
textimage2video.py with wan/utils/utils.py's best_output_size, generate.py, wan/configs),
not from wanlora's code.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from PIL import Image

from wanlora import WanLoraPipeline
from wanlora.accelerators import ACCELERATORS
from wanlora.errors import InvalidInput
from wanlora.experts import expert_steps
from wanlora.frontends.service import PredictorInputs, VideoService
from wanlora.models import CATALOGUE, WAN_NEGATIVE_PROMPT, tiny_spec
from wanlora.options import GenerationOptions
from wanlora.pipeline import sampler_for
from wanlora.request import resolve_request
from wanlora.runtime.sampling import RcmSampler, Wan2gpEuler, WanFlowUniPC

from .conftest import SMALL, recorded, run_cli
from .test_cli import FOX, fox_with_preset_steps

SCHEDULER_CONFIG = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "num_train_timesteps": 1000}


def reference_timesteps(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift): (int timesteps, float32 sigmas)."""
    training = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    sigmas = (1.0 - training).astype(np.float32)  # the training schedule, kept in float32
    sigma_max, sigma_min = float(sigmas[0]), float(sigmas[-1])
    grid = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    shifted = shift * grid / (1 + (shift - 1) * grid)
    timesteps = (shifted * 1000).astype(np.int64)  # torch's .to(int64) truncates, as astype does
    return timesteps, np.concatenate([shifted, [0.0]]).astype(np.float32)


# ------------------------------------------------------------------ 1. timesteps and the expert split


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0, 12.0, 16.0, 20.0])
def test_timesteps_and_sigmas_equal_the_references_for_every_step_count(shift):
    scheduler = WanFlowUniPC.for_shift(SCHEDULER_CONFIG, shift)
    for steps in range(1, 101):
        scheduler.set_timesteps(steps)
        timesteps, sigmas = reference_timesteps(steps, shift)
        assert scheduler.timesteps.tolist() == timesteps.tolist(), steps
        assert np.abs(scheduler.sigmas.numpy() - sigmas).max() <= 1e-7, steps


def test_diffusers_own_schedule_differs_which_is_why_wanlora_feeds_it_the_references():
    drifted = UniPCMultistepScheduler.from_config(SCHEDULER_CONFIG, flow_shift=12.0)
    drifted.set_timesteps(40)
    timesteps, _ = reference_timesteps(40, 12.0)
    assert np.abs(drifted.timesteps.numpy() - timesteps).max() >= 5  # up to 7 at T2V-A14B's defaults


@pytest.mark.parametrize(("name", "shift"), [("t2v-a14b", 12.0), ("i2v-a14b", 5.0)])
def test_each_step_goes_to_the_expert_the_references_rule_picks(name, shift):
    spec = CATALOGUE[name]
    scheduler = WanFlowUniPC.for_shift(SCHEDULER_CONFIG, shift)
    boundary = spec.boundary_ratio * 1000
    moved = []
    for steps in range(1, 101):
        high = int((reference_timesteps(steps, shift)[0] >= boundary).sum())  # its `t.item() >= boundary`
        assert expert_steps(scheduler, steps, spec.boundary_ratio, spec.experts) == {
            "high": range(0, high),
            "low": range(high, steps),
        }
        drifted = UniPCMultistepScheduler.from_config(SCHEDULER_CONFIG, flow_shift=shift)
        drifted.set_timesteps(steps)
        moved += [steps] if int((drifted.timesteps >= boundary).sum()) != high else []
    assert moved  # the step counts where diffusers' own schedule gave the high-noise expert another step


def test_every_catalogue_default_runs_on_the_references_timesteps():
    for spec in CATALOGUE.values():
        scheduler = WanFlowUniPC.for_shift(SCHEDULER_CONFIG, spec.flow_shifts[1])
        for steps in (40, 50):
            scheduler.set_timesteps(steps)
            want = reference_timesteps(steps, spec.flow_shifts[1])[0]
            assert np.abs(scheduler.timesteps.numpy() - want).max() <= 1e-4, spec.name


def test_the_pipeline_samples_on_the_references_timesteps(fresh_tiny_pipe):
    seen = []
    fresh_tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(int(kwargs["timestep"][0])), with_kwargs=True
    )
    fresh_tiny_pipe.generate("a fox", flow_shift=7.0, guidance_scale=1.0, **{**SMALL, "num_inference_steps": 6})
    assert seen == reference_timesteps(6, 7.0)[0].tolist()


# ------------------------------------------------------------------ 2. the negative prompt


def test_each_variants_default_negative_prompt_is_its_configs():
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清，字幕") and WAN_NEGATIVE_PROMPT.endswith(
        "倒着走"
    )
    # Wan2.1's wan/configs: i2v_14B puts "镜头晃动，" before the shared one; flf2v_14B is a deep copy of
    # i2v_14B with "镜头切换，" put before that: WAN_CONFIGS['flf2v-14B'].sample_neg_prompt, 147 characters
    flf2v = "镜头切换，" + "镜头晃动，" + WAN_NEGATIVE_PROMPT
    assert len(flf2v) == 147
    for spec in CATALOGUE.values():
        prefix = {"i2v-14b-480p": "镜头晃动，", "i2v-14b-720p": "镜头晃动，"}.get(spec.name, "")
        want = flf2v if spec.name == "flf2v-14b" else prefix + WAN_NEGATIVE_PROMPT
        assert spec.negative_prompt == want, spec.name


def test_an_empty_negative_prompt_is_the_models_own_on_every_front_end(tiny_pipe, tmp_path):
    video = tiny_pipe.generate("a fox", seed=3, **SMALL)
    assert video.metadata["negative_prompt"] == WAN_NEGATIVE_PROMPT
    assert (
        tiny_pipe.generate("a fox", negative_prompt="", seed=3, **SMALL).metadata["negative_prompt"]
        == WAN_NEGATIVE_PROMPT
    )
    none = tiny_pipe.generate("a fox", negative_prompt="none", seed=3, **SMALL)
    assert none.metadata["negative_prompt"] == "" and not np.array_equal(none.frames, video.frames)
    assert tiny_pipe.generate("a fox", negative_prompt="blurry", **SMALL).metadata["negative_prompt"] == "blurry"
    unguided = tiny_pipe.generate("a fox", guidance_scale=1.0, **SMALL)
    assert unguided.metadata["negative_prompt"] == ""  # no unguided pass runs: none is used
    result = run_cli(*FOX, "-o", str(tmp_path / "fox.mp4"))
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path / "fox.mp4")["negative_prompt"] == WAN_NEGATIVE_PROMPT
    service = VideoService(override="tiny-i2v", i2v_override="tiny-i2v")
    resolved = service.resolve(PredictorInputs(prompt="a fox", image=str(square_png(tmp_path)), model="14b"))
    assert resolved.request.settings.negative_prompt == "镜头晃动，" + WAN_NEGATIVE_PROMPT


# ------------------------------------------------------------------ 3. the frame size for an image


def image2video_size(width: int, height: int, area: int) -> tuple[int, int]:
    """image2video.py: each latent side from sqrt(area x aspect), floored to an even number of 8x cells."""
    aspect = height / width
    lat_h = round(np.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = round(np.sqrt(area / aspect) // 8 // 2 * 2)
    return lat_w * 8, lat_h * 8


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """textimage2video.py (wan/utils/utils.py): width first or height first, whichever keeps the aspect."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


SHAPES = [(1000, 1000), (1600, 1200), (1200, 1600), (1920, 1080), (1080, 1920), (3000, 2000), (2000, 3000)]
SHAPES += [(800, 600), (640, 480), (1024, 768), (4096, 2160), (500, 700), (1280, 1024)]


@pytest.mark.parametrize("name", ["i2v-14b-480p", "i2v-14b-720p", "flf2v-14b", "i2v-a14b", "ti2v-5b"])
def test_an_image_keeps_its_aspect_at_the_resolutions_area_by_the_references_rule(name):
    spec = CATALOGUE[name]
    for resolution in spec.resolutions:
        area = {"480p": 832 * 480, "720p": 1280 * 704 if name == "ti2v-5b" else 1280 * 720}[resolution]
        for width, height in SHAPES:
            image = Image.new("RGB", (width, height))
            got = resolve_request(spec, GenerationOptions("p", image=image, resolution=resolution)).settings
            if spec.task.name == "ti2v":
                want = best_output_size(width, height, 32, 32, area)
            else:
                want = image2video_size(width, height, area)
            assert (got.width, got.height) == want, (name, resolution, width, height)


def test_the_issues_square_and_four_thirds_cases():
    square, photo = Image.new("RGB", (1024, 1024)), Image.new("RGB", (1600, 1200))
    assert size_of("i2v-14b-480p", square) == size_of("i2v-a14b", square, "480p") == (624, 624)
    assert size_of("ti2v-5b", square) == (960, 928)
    assert size_of("i2v-14b-480p", photo) == size_of("i2v-a14b", photo, "480p") == (720, 544)
    assert size_of("ti2v-5b", photo) == (1088, 800)
    asked = resolve_request(
        CATALOGUE["i2v-14b-480p"], GenerationOptions("p", image=photo, aspect_ratio="16:9")
    ).settings
    assert (asked.width, asked.height) == (832, 480)  # an aspect ratio asked for: the preset, and --resize


def size_of(name: str, image: Image.Image, resolution: str | None = None) -> tuple[int, int]:
    settings = resolve_request(CATALOGUE[name], GenerationOptions("p", image=image, resolution=resolution)).settings
    return settings.width, settings.height


def square_png(folder) -> object:
    path = folder / "square.png"
    Image.new("RGB", (96, 96), (40, 120, 200)).save(path)
    return path


def test_the_tiny_model_frames_an_image_the_same_way(tmp_path):
    spec = tiny_spec(kind="i2v")
    photo = Image.new("RGB", (160, 120), (200, 40, 40))
    pipe = WanLoraPipeline.from_pretrained("tiny-i2v")
    video = pipe.generate("a fox", image=photo, num_frames=5, num_inference_steps=1, seed=1)
    area = max(w * h for w, h in spec.presets["480p"].values())
    assert video.frames.shape[1:3] == image2video_size(160, 120, area)[::-1]
    assert video.metadata["framing"] == "the image's aspect"


def test_an_extreme_aspect_is_refused_in_words():
    from wanlora import InvalidInput

    with pytest.raises(InvalidInput, match="less extreme aspect"):
        resolve_request(CATALOGUE["i2v-14b-480p"], GenerationOptions("p", image=Image.new("RGB", (32, 3200))))


# ------------------------------------------------------------------ 4. Wan2.1's defaults


def wan21_generate_defaults(task: str, size: str) -> tuple[int, float]:
    """Wan2.1 generate.py: (sample_steps, sample_shift) for a task and a `--size` such as '832*480'."""
    steps = 40 if "i2v" in task else 50
    shift = 5.0
    if "i2v" in task and size in ("832*480", "480*832"):
        shift = 3.0
    elif "flf2v" in task:
        shift = 16
    return steps, shift


WAN21_TASKS = {"t2v-1.3b": "t2v-1.3B", "t2v-14b": "t2v-14B", "i2v-14b-480p": "i2v-14B", "i2v-14b-720p": "i2v-14B"}
WAN21_TASKS["flf2v-14b"] = "flf2v-14B"


@pytest.mark.parametrize("name", list(WAN21_TASKS))
def test_wan21_defaults_equal_generate_py_and_its_configs(name):
    spec = CATALOGUE[name]
    image = None if spec.task.name == "t2v" else Image.new("RGB", (64, 64))
    for resolution in spec.resolutions:
        size_flag = {"480p": "832*480", "720p": "1280*720"}[resolution]  # generate.py's --size for the resolution
        steps, shift = wan21_generate_defaults(WAN21_TASKS[name], size_flag)
        for width, height in spec.presets[resolution].values():
            settings = resolve_request(spec, GenerationOptions("p", width=width, height=height, image=image)).settings
            assert (settings.num_inference_steps, settings.flow_shift) == (steps, shift), (resolution, width, height)
            assert (settings.guidance_scale, settings.num_frames, settings.fps) == (5.0, 81, 16)


def test_the_shift_options_help_names_every_variants_default_shift():
    """Every default shift a variant has (generate.py: 16 for FLF2V) is one the help of `--shift` names."""
    from wanlora.options import describe

    words = describe("flow_shift").help
    for spec in CATALOGUE.values():
        for shift in spec.flow_shifts:
            assert f" {shift:g}" in words, (spec.name, shift)


# ------------------------------------------------------------------ 5. accelerators, on their references' schedules
#
# Written out from each distillation's own sampling code, not from wanlora's:
# - ModelTC/Wan2.2-Lightning @92efeb4: wan/utils/fm_solvers_euler.py lines 16-21 (`get_timesteps` =
#   linspace(1000, 0, N + 1, float32), `timestep_shift`), 42-44 and 50-57 (sigmas = shifted t / 1000),
#   wan/text2video.py line 347 (`timesteps[:-1]`), line 200 (`t.item() >= boundary` is the high-noise
#   expert); wan/configs/wan_{t2v,i2v}_A14B.py lines 34-37 (shift 5, 4 steps, boundary 0.875 / 0.900,
#   guidance (1.0, 1.0)).
# - ModelTC/LightX2V @f8aee98b: lightx2v/models/schedulers/wan/step_distill/scheduler.py lines 25-33
#   (sigmas = shift(linspace(1, 0, 1001)[:-1]) taken at 1000 - denoising_step_list); configs/distill/wan22/
#   wan_moe_i2v_distill_with_lora.json and wan_moe_t2v_distill_lora.json (infer_steps 4, sample_shift 5,
#   enable_cfg false, boundary_step_index 2, denoising_step_list [1000, 750, 500, 250]).
# - NVlabs/rcm @5b41aa9: rcm/inference/wan2pt2_i2v_rcm_infer.py line 69 (sigma_max 200), 64 (boundary 0.9),
#   176-187 (mid_t [1.5, 1.4, 1.0], t = sin / (cos + sin), x = noise * t[0]), 194 (`t_cur < boundary`
#   switches to the low-noise model), 201 (timesteps `(t_cur.float() * ones * 1000).to(bf16)`), 207 (the
#   SDE step); wan2pt1_t2v_rcm_infer.py line 73 (sigma_max 80).

LIGHTNING_AUTHOR_TIMESTEPS = [1000.0000, 937.5001, 833.3333, 625.0000]  # LightX2V-Wan2.2-Lightning issue #3


def lightning_reference(steps: int, shift: float) -> np.ndarray:
    """Wan2.2-Lightning's EulerScheduler: float32 sigmas of the `steps` steps (its `timesteps[:-1]` / 1000)."""
    timesteps = np.linspace(1000, 0, steps + 1, dtype=np.float32)
    sigmas = timesteps / 1000
    return (shift * sigmas / (1 + (shift - 1) * sigmas))[:-1]


def lightx2v_reference(denoising_step_list: list[int], shift: float) -> torch.Tensor:
    """LightX2V's WanStepDistillScheduler.set_denoising_timesteps: the sigmas of the listed steps."""
    sigmas = torch.linspace(1.0, 0.0, 1000 + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas[[1000 - x for x in denoising_step_list]]


def euler_rows() -> list[tuple[str, str]]:
    return [
        (spec.name, name)
        for spec in CATALOGUE.values()
        for name in spec.accelerators
        if ACCELERATORS[name].sampler == "euler"
    ]


def accelerated(name: str, preset: str):
    spec = CATALOGUE[name]
    image = None if spec.task.name == "t2v" else Image.new("RGB", (64, 64))
    request = resolve_request(spec, GenerationOptions("p", image=image, accelerator=preset))
    return spec, request, sampler_for(request, SCHEDULER_CONFIG, request.settings.flow_shift)


@pytest.mark.parametrize(("name", "preset"), euler_rows())
def test_each_lightx2v_release_samples_its_references_sigmas_and_expert_split(name, preset):
    spec, request, sampler = accelerated(name, preset)
    settings = request.settings
    assert (settings.num_inference_steps, settings.guidance_scale, settings.flow_shift) == (4, 1.0, 5.0)
    assert settings.guidance_scale_2 in (None, 1.0)
    sampler.set_timesteps(settings.num_inference_steps)
    sigmas = sampler.sigmas[:-1].numpy()
    assert sigmas.tolist() == lightning_reference(4, 5.0).tolist()  # bit for bit, in float32
    assert sigmas.tolist() == lightx2v_reference([1000, 750, 500, 250], 5.0).tolist()
    assert sampler.timesteps.tolist() == (lightning_reference(4, 5.0) * 1000).tolist()
    assert np.abs(sampler.timesteps.numpy() - LIGHTNING_AUTHOR_TIMESTEPS).max() < 2e-4
    if spec.boundary_ratio is not None:  # Lightning: t >= boundary; LightX2V: step index < boundary_step_index 2
        lightning_high = int((lightning_reference(4, 5.0) * 1000 >= spec.boundary_ratio * 1000).sum())
        assert lightning_high == 2
        steps = expert_steps(sampler, 4, spec.boundary_ratio, spec.experts)
        assert steps == {"high": range(0, 2), "low": range(2, 4)}
        assert [(r.expert, r.strength) for r in request.accelerator_loras] in (
            [("both", 1.0)],  # a Lightning folder: its pair lands one file per expert
            [("high", 1.0), ("low", 1.0)],  # LightX2V's lora_configs: each file at strength 1.0 on its expert
        )


def rcm_reference(steps: int, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rCM's script: the rectified-flow sigmas (with the final 0) and the bf16 timesteps its model is given."""
    mid_t = [1.5, 1.4, 1.0][: steps - 1]
    t_steps = torch.tensor([math.atan(sigma_max), *mid_t, 0], dtype=torch.float64)
    t_steps = torch.sin(t_steps) / (torch.cos(t_steps) + torch.sin(t_steps))
    ones = torch.ones(1, 1, dtype=torch.float64)
    timesteps = torch.stack([(t.float() * ones * 1000).to(torch.bfloat16).float()[0, 0] for t in t_steps[:-1]])
    return t_steps, timesteps


RCM_SIGMA_MAX = {"t2v-14b": 80.0, "t2v-1.3b": 80.0, "i2v-a14b": 200.0}  # the scripts' --sigma_max defaults


def test_every_rcm_row_is_one_whose_script_sigma_max_is_known():
    assert {spec.name for spec in CATALOGUE.values() if "rcm" in spec.accelerators} == set(RCM_SIGMA_MAX)


@pytest.mark.parametrize("name", list(RCM_SIGMA_MAX))
def test_rcm_samples_its_scripts_times_on_each_variant(name):
    spec, request, sampler = accelerated(name, "rcm")
    assert (request.settings.num_inference_steps, request.settings.guidance_scale) == (4, 1.0)
    for steps in (1, 2, 3, 4):
        sampler.set_timesteps(steps)
        sigmas, timesteps = rcm_reference(steps, RCM_SIGMA_MAX[name])
        assert torch.equal(sampler.sigmas, sigmas) and torch.equal(sampler.timesteps, timesteps), steps
    sampler.set_timesteps(4)
    if name == "i2v-a14b":  # 996, 932 >= 900 on the high-noise expert, as `t_cur < 0.9` switches after them
        assert sampler.timesteps.tolist() == [996.0, 932.0, 852.0, 608.0]
        assert expert_steps(sampler, 4, spec.boundary_ratio, spec.experts) == {"high": range(2), "low": range(2, 4)}
        # Wan.md's Wan2.2 I2V example: the Wan2.1 T2V delta merged at 4.0 into the high expert, 1.0 into the low
        assert [(r.expert, r.strength) for r in request.accelerator_loras] == [("high", 4.0), ("low", 1.0)]
    else:
        assert sampler.timesteps[0] == 988.0
    image = None if spec.task.name == "t2v" else Image.new("RGB", (64, 64))
    with pytest.raises(InvalidInput, match="1 or 2 or 3 or 4 with rcm"):
        resolve_request(spec, GenerationOptions("p", image=image, accelerator="rcm", num_inference_steps=5))
    with pytest.raises(InvalidInput, match="flow_shift=3.0 is not allowed: left out with rcm"):
        resolve_request(spec, GenerationOptions("p", image=image, accelerator="rcm", flow_shift=3.0))


def test_rcm_steps_as_its_script_does_with_fresh_noise_from_the_same_generator():
    sampler = RcmSampler(80.0, torch.Generator().manual_seed(5))
    sampler.set_timesteps(4)
    sample, velocity = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    out = sampler.step(velocity, sampler.timesteps[0], sample, return_dict=False)[0]
    t_cur, t_next = rcm_reference(4, 80.0)[0][:2]
    noise = torch.randn(*sample.shape, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    want = (1 - t_next) * (sample.double() - t_cur * velocity.double()) + t_next * noise
    assert torch.equal(out, want.float())


def test_the_pipeline_runs_rcm_from_noise_at_its_first_sigma(tiny_dir):
    from diffusers.utils.torch_utils import randn_tensor

    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir))
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].clone(), float(kwargs["timestep"][0]))),
        with_kwargs=True,
    )
    video = pipe.generate("a fox", accelerator="rcm", width=64, height=48, num_frames=9, seed=4, progress=False)
    assert [t for _, t in seen] == rcm_reference(4, 80.0)[1].tolist()  # one pass a step: guidance 1
    first_sigma = rcm_reference(4, 80.0)[0][0]
    noise = randn_tensor(seen[0][0].shape, generator=torch.Generator("cpu").manual_seed(4), dtype=torch.float32)
    assert torch.equal(seen[0][0], (noise.double() * first_sigma).float().to(seen[0][0].dtype))
    assert (video.metadata["accelerator"], video.metadata["num_inference_steps"], video.metadata["flow_shift"]) == (
        "rcm",
        4,
        1.0,
    )


def test_the_cli_runs_rcm_with_its_own_steps_and_no_shift(tiny_dir, tmp_path):
    fox = fox_with_preset_steps(tiny_dir)  # the preset's own 4
    result = run_cli(*fox, "--accelerator", "rcm", "-o", str(tmp_path / "rcm.mp4"))
    assert result.returncode == 0, result.stderr
    tags = recorded(tmp_path / "rcm.mp4")
    assert (tags["accelerator"], tags["num_inference_steps"], tags["flow_shift"], tags["guidance_scale"]) == (
        "rcm",
        4,
        1.0,
        1.0,
    )
    refused = run_cli(*fox, "--accelerator", "rcm", "--shift", "5", "-o", str(tmp_path / "no.mp4"))
    assert refused.returncode == 2 and "its sampler does not shift" in refused.stderr


# CausVid on Wan2.1 1.3B, written out from deepbeepmeep/Wan2GP @8681e9f7: profiles/wan_1.3B/"Causvid Rank32 -
# 8 Steps.json" (Kijai's Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32 at multiplier 1, 8 steps, guidance 1,
# sample_solver "causvid"), models/wan/any2video.py lines 513-517 (the "causvid" solver: timesteps
# [1000, 934, 862, 756, 603, 410, 250, 140, 74][:N], sigmas those / 1000 then 0; its shift is not used) and
# shared/utils/basic_flowmatch.py line 56 (`sample + model_output * (sigma_next - sigma)`).

WAN2GP_CAUSVID_TIMESTEPS = [1000, 934, 862, 756, 603, 410, 250, 140, 74]


def test_causvid_on_1_3b_samples_wan2gps_profile_and_its_fixed_timesteps():
    spec, request, sampler = accelerated("t2v-1.3b", "causvid")
    assert (request.settings.num_inference_steps, request.settings.guidance_scale) == (8, 1.0)
    assert [(r.ref.rsplit("/", 1)[1], r.strength) for r in request.accelerator_loras] == [
        ("Wan21_CausVid_bidirect2_T2V_1_3B_lora_rank32.safetensors", 1.0)
    ]
    for steps in range(1, 10):
        sampler.set_timesteps(steps)
        timesteps = torch.tensor(WAN2GP_CAUSVID_TIMESTEPS)[:steps]
        sigmas = torch.cat([timesteps / 1000, torch.tensor([0.0])])
        assert sampler.timesteps.tolist() == timesteps.tolist() and torch.equal(sampler.sigmas, sigmas), steps
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(1, 4, 2, 3, 3, generator=generator)
    want = sample.clone()
    for index, t in enumerate(sampler.timesteps):
        velocity = torch.randn(1, 4, 2, 3, 3, generator=generator)
        sample = sampler.step(velocity, t, sample, return_dict=False)[0]
        want = want + velocity * (sigmas[index + 1] - sigmas[index])
    assert torch.equal(sample, want)
    with pytest.raises(InvalidInput, match="1 to 9 with causvid"):
        resolve_request(spec, GenerationOptions("p", accelerator="causvid", num_inference_steps=10))
    with pytest.raises(InvalidInput, match="flow_shift=3.0 is not allowed: left out with causvid"):
        resolve_request(spec, GenerationOptions("p", accelerator="causvid", flow_shift=3.0))


# ------------------------------------------------------------------ 6. Wan2GP's three-phase recipe
#
# Written out from deepbeepmeep/Wan2GP @8681e9f7: shared/utils/euler_scheduler.py (`set_timesteps`: a float32
# linspace(1000, 1, N) plus 0, each a 1-element tensor shifted by `_timestep_transform`, the last dropped;
# `step`: dt = (t - t_next).item() / 1000, the last step's t_next 0, `sample - model_output * dt`),
# shared/utils/loras_mutipliers.py `get_model_switch_steps` (a phase starts at the first step with
# t <= its threshold), models/wan/any2video.py `update_guidance` (phase 2 and 3 guidance; the low-noise
# model from phase `model_switch_phase` + 1), and profiles/wan_2_2/"Lightning t2v v2025-09-28 3 Phases -
# 8 Steps.json" (8 steps, shift 3, thresholds 965 / 800, guidance 3.5 / 1 / 1, multipliers "0;1;0 0;0;1"),
# "Lightning i2v v2025-10-14 3 Phases - 8 Steps.json" (the same with shift 5 and 985 / 800).

WAN2GP_PROFILES = {"t2v-a14b": (3.0, 965.0, 800.0), "i2v-a14b": (5.0, 985.0, 800.0)}  # shift, thresholds


def wan2gp_reference(steps: int, shift: float) -> list[float]:
    """Wan2GP's EulerScheduler.set_timesteps: each 1-element float32 timestep shifted on its own."""
    timesteps = [torch.tensor([t]) for t in np.linspace(1000, 1, steps, dtype=np.float32)]
    timesteps.append(torch.tensor([0.0]))
    shifted = []
    for t in timesteps:
        t = t / 1000
        shifted.append(shift * t / (1 + (shift - 1) * t) * 1000)
    return [float(t) for t in shifted[:-1]]


def wan2gp_switch_steps(timesteps: list[float], first: float, second: float) -> tuple[int, int]:
    """get_model_switch_steps with three guidance phases."""
    found = [None, None]
    for i, t in enumerate(timesteps):
        if found[0] is None and t <= first:
            found[0] = i
        if found[1] is None and t <= second:
            found[1] = i
    return tuple(len(timesteps) if f is None else f for f in found)


def test_every_three_phase_row_is_a_wan2gp_profile():
    assert {spec.name for spec in CATALOGUE.values() if "lightning-3phase" in spec.accelerators} == set(WAN2GP_PROFILES)


@pytest.mark.parametrize("name", list(WAN2GP_PROFILES))
def test_three_phases_sample_wan2gps_timesteps_with_its_phases_guidance_and_strengths(name):
    shift, first, second = WAN2GP_PROFILES[name]
    spec, request, sampler = accelerated(name, "lightning-3phase")
    settings = request.settings
    assert (settings.num_inference_steps, settings.flow_shift) == (8, shift)
    assert (settings.guidance_scale, settings.guidance_scale_2) == (3.5, 1.0)  # guidance, guidance2 (= guidance3)
    assert settings.negative_prompt == spec.negative_prompt  # phase 1 is guided: the model's own negative prompt
    for steps in (5, 8, 12, 20):
        sampler.set_timesteps(steps)
        reference = wan2gp_reference(steps, shift)
        assert sampler.timesteps.tolist() == reference, steps  # bit for bit, in float32
        options = GenerationOptions("p", image=None if name == "t2v-a14b" else Image.new("RGB", (64, 64)))
        split = resolve_request(spec, replace(options, accelerator="lightning-3phase", num_inference_steps=steps))
        guided, high = wan2gp_switch_steps(reference, first, second)
        assert (split.phases.guided, split.phases.high) == (guided, high), steps
        boundary = split.phases.boundary_ratio
        assert expert_steps(sampler, steps, boundary, spec.experts) == {"high": range(high), "low": range(high, steps)}
    sampler.set_timesteps(8)
    assert [round(t, 1) for t in sampler.timesteps.tolist()][:4] == (
        [1000.0, 947.4, 882.5, 800.3] if shift == 3.0 else [1000.0, 967.8, 926.0, 869.8]
    )
    assert request.phases.describe() == "phase 1 = steps 1-1, phase 2 = steps 2-4, phase 3 = steps 5-8"
    # "0;1;0 0;0;1": the high-noise LoRA off in phase 1 and on in phase 2; the low-noise one on in phase 3
    assert [(r.expert, r.strength) for r in request.accelerator_loras] == [
        ("high", (0.0, 1.0, 1.0, 1.0)),
        ("low", 1.0),
    ]


def test_wan2gps_euler_steps_as_its_code_does():
    sampler = Wan2gpEuler(3.0)
    sampler.set_timesteps(8)
    reference = wan2gp_reference(8, 3.0)
    sample, velocity = torch.randn(1, 4, 2, 3, 3), torch.randn(1, 4, 2, 3, 3)
    for index in (0, 7):  # a step to the next timestep, and the last one, to 0
        sampler._step_index = index
        got = sampler.step(velocity, sampler.timesteps[index], sample, return_dict=False)[0]
        here = torch.tensor([reference[index]])
        after = torch.tensor([reference[index + 1]]) if index < 7 else None
        dt = ((here - after) if after is not None else here).item() / 1000
        assert torch.equal(got, sample - velocity * dt), index


def test_three_phases_refuse_what_would_leave_a_phase_empty_or_guide_the_low_noise_phase():
    spec = CATALOGUE["t2v-a14b"]
    with pytest.raises(
        InvalidInput, match="num_inference_steps=3 is not allowed: more with lightning-3phase.*; 4 steps"
    ):
        resolve_request(spec, GenerationOptions("p", accelerator="lightning-3phase", num_inference_steps=3))
    with pytest.raises(InvalidInput, match="flow_shift=0.1 is not allowed: another with lightning-3phase.*; 42 steps"):
        resolve_request(
            spec, GenerationOptions("p", accelerator="lightning-3phase", flow_shift=0.1)
        )  # 8 steps: its own
    with pytest.raises(InvalidInput, match="guidance_scale_2='1' is not allowed: a finite number"):
        resolve_request(spec, GenerationOptions("p", accelerator="lightning-3phase", guidance_scale_2="1"))
    with pytest.raises(InvalidInput, match="guidance_scale_2=3.0 is not allowed: left out with lightning-3phase"):
        resolve_request(spec, GenerationOptions("p", accelerator="lightning-3phase", guidance_scale_2=3.0))
    with pytest.raises(InvalidInput, match="available for t2v-a14b, i2v-a14b, not t2v-14b"):
        resolve_request(CATALOGUE["t2v-14b"], GenerationOptions("p", accelerator="lightning-3phase"))
    guided = resolve_request(spec, GenerationOptions("p", accelerator="lightning-3phase", guidance_scale=5.0))
    assert guided.settings.guidance_scale == 5.0 and guided.phases.guided == 1  # phase 1's guidance is yours
