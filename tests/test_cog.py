"""The Cog predictor: cog.yaml against Cog's schema, the real Cog HTTP server, and in-process runs."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from wanlora.errors import InvalidInput, LoraMismatch
from wanlora.frontends.service import PredictorInputs
from wanlora.tiny import tiny_transformer, write_tiny_model

from .builders import write_lora
from .cog_rules import config_problems, push_problems
from .conftest import assert_frames_agree, probe, recorded
from .lora_helpers import tar_of
from .processes import alive, children_with, free_port, wait_for
from .servers import FileServer, Route
from .test_reference import image2video_size

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cog.yaml", "cog.weights.yaml"])
def test_cog_configs_pass_cogs_config_loader(name):
    config = yaml.safe_load((ROOT / name).read_text())
    assert config_problems(config, ROOT) == []
    assert config["build"]["gpu"] is True and config["run"] == "predict.py:Predictor"
    assert "HF_XET_HIGH_PERFORMANCE=1" in config["environment"]
    pins = dict(
        line.split("==")
        for line in (ROOT / config["build"]["python_requirements"]).read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert {"torch", "xformers", "diffusers", "transformers", "hf_xet"} <= set(pins)


@pytest.mark.parametrize(
    ("edit", "refusal"),
    [
        (lambda c: c.pop("model"), "weights require 'model' in cog.yaml"),
        (lambda c: c.update(image=c.pop("model")), "weights require 'model', not 'image'"),
        (lambda c: c.update(image="r8.im/a/b"), "'model' and 'image' cannot both be set"),
        (lambda c: c.update(model="r8.im/a/b:v1"), "tags and digests are not allowed"),
        (lambda c: c.update(model="r8.im/Some/Model"), "invalid repository"),
        (lambda c: c["weights"][1].update(name=c["weights"][0]["name"]), "duplicate weight name"),
        (lambda c: c["weights"][0].update(name="Wan_Weights"), "only lowercase letters"),
        (lambda c: c["weights"][0].update(target="weights/x"), "target must be an absolute path"),
        (lambda c: c["weights"][1].update(target=c["weights"][0]["target"] + "/sub"), "must be disjoint"),
        (lambda c: c["weights"][0]["source"]["include"].append("!*.bin"), "a negation"),
        (lambda c: c["environment"].append("CUDA_HOME=/x"), "reserved for internal use"),
        (lambda c: c["environment"].append("WANLORA_WEIGHTS=/y"), "already defined"),
        (lambda c: c["build"].update(python_version="3.9"), "minimum supported Python version"),
        (lambda c: c["build"].update(cuda="12.7"), "no cuDNN is known for CUDA 12.7"),
        (lambda c: c["build"].update(python_packages=["torch"]), "only one of python_packages"),
        (lambda c: c.update(run="predict:Predictor"), "must be in the form"),
    ],
)
def test_the_config_rules_catch_what_cogs_loader_refuses(edit, refusal):
    config = yaml.safe_load((ROOT / "cog.weights.yaml").read_text())
    edit(config)
    assert any(refusal in problem for problem in config_problems(config, ROOT)), config_problems(config, ROOT)


def test_the_documented_cog_commands_are_ones_cog_accepts():
    pages = [ROOT / "README.md", ROOT / "docs" / "cog.md"]
    commands = [line.split("#")[0] for page in pages for line in page.read_text().splitlines()]
    pushes = [c for c in commands if c.strip().startswith(("cog push", "cog weights"))]
    assert pushes, "the documentation gives no cog push command"
    for command in pushes:
        name = "cog.weights.yaml" if "cog.weights.yaml" in command else "cog.yaml"
        config = yaml.safe_load((ROOT / name).read_text())
        if command.strip().startswith("cog push"):
            assert push_problems(command, config) == [], command
        else:
            assert name == "cog.weights.yaml" and config["model"], command  # weight commands need a model ref
    managed = yaml.safe_load((ROOT / "cog.weights.yaml").read_text())
    refused = push_problems("cog push -f cog.weights.yaml r8.im/OWNER/MODEL", managed)
    assert refused == ["positional image argument not supported with 'model' config"]


def test_managed_weights_hold_what_the_library_looks_for():
    """Each entry lands where wanlora.hub.local_copy looks, with the files a load or an accelerator needs."""
    from wanlora.hub import MODEL_FILES
    from wanlora.models import CATALOGUE

    config = yaml.safe_load((ROOT / "cog.weights.yaml").read_text())
    root = next(v.split("=", 1)[1] for v in config["environment"] if v.startswith("WANLORA_WEIGHTS="))
    for entry in config["weights"]:
        repo = entry["source"]["uri"].removeprefix("hf://")
        assert entry["target"] == f"{root}/{repo}"
        if repo in {spec.source for spec in CATALOGUE.values()}:
            assert entry["source"]["include"] == list(MODEL_FILES)
    baked = {e["source"]["uri"].removeprefix("hf://"): set(e["source"]["include"]) for e in config["weights"]}
    needed: dict[str, set[str]] = {}
    for ref in {ref for spec in CATALOGUE.values() for row in spec.accelerators.values() for ref in row.refs}:
        owner, name, path = ref.split("/", 2)
        pair = {f"{path}/{expert}_noise_model.safetensors" for expert in ("high", "low")}  # a Wan2.2-Lightning folder
        files = {path} if path.endswith(".safetensors") else pair
        needed.setdefault(f"{owner}/{name}", set()).update(files)
    assert {repo: baked[repo] for repo in needed} == needed


def test_inputs_are_visible_with_types_defaults_and_ranges():
    from cog._inspector import create_predictor

    inputs = create_predictor("predict", "Predictor").inputs
    for name in (
        "prompt",
        "negative_prompt",
        "image",
        "model",
        "resolution",
        "aspect_ratio",
        "num_frames",
        "fps",
        "sample_steps",
        "sample_guide_scale",
        "sample_guide_scale_2",
        "sample_shift",
        "seed",
        "fast_mode",
        "lora_weights",
        "lora_scale",
        "lora_scale_sweep",
        "extra_lora",
        "extra_lora_scale",
        "lora_weights_transformer",
        "lora_scale_transformer",
        "lora_weights_transformer_2",
        "lora_scale_transformer_2",
        "hf_api_token",
        "civitai_api_token",
        "output_quality",
    ):
        assert name in inputs, name
    assert (inputs["lora_scale"].ge, inputs["lora_scale"].le) == (-1, 3)
    assert (inputs["num_frames"].ge, inputs["num_frames"].le) == (5, 121)  # 121 on Wan2.2 TI2V-5B
    assert inputs["fast_mode"].choices == ["Off", "Balanced", "Fast"]
    assert "civitai.com" in inputs["lora_weights"].description


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    """LoRAs over loopback: two styles, a login page, a Replicate trainer's tar, a private Civitai file."""
    folder = tmp_path_factory.mktemp("cog-loras")
    model = tiny_transformer()
    with FileServer() as server:
        for name, layout, seed in (("style", "original", 1), ("motion", "kohya", 2), ("trained", "original-peft", 3)):
            path = folder / f"{name}.safetensors"
            write_lora(path, model, layout, seed=seed, metadata={"modelspec.trigger_phrase": f"{name}word"})
            server.routes[f"/{name}.safetensors"] = Route(path.read_bytes())
        server.routes["/login.safetensors"] = Route(b"<!DOCTYPE html><html>Please sign in</html>")
        trained = server.routes["/trained.safetensors"].body  # diffusion-pipe's layout, as Replicate's trainers use
        server.routes["/trained_model.tar"] = Route(tar_of({"wan_train_replicate/14b-lora.safetensors": trained}))
        server.routes["/api/download/models/4242"] = Route(
            server.routes["/motion.safetensors"].body, require_auth="Bearer good-token"
        )
        yield server


@dataclass
class CogServer:
    url: str
    pid: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_cog_server(tmp_path_factory, **env_overrides):
    """`python -m cog.server.http` from PyPI's cog, serving predict.py with the tiny models."""
    port = free_port()
    env = {
        **os.environ,
        "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
        "PORT": str(port),
        "WANLORA_MODEL": "tiny",
        "WANLORA_I2V_MODEL": "tiny-i2v",
        "WANLORA_CACHE": str(tmp_path_factory.mktemp("cog-cache")),
        "WANLORA_ALLOW_PRIVATE_URLS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **env_overrides,
    }
    log_path = tmp_path_factory.mktemp("cog-log") / "server.log"
    log = open(log_path, "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            status = requests.get(f"{url}/health-check", timeout=2).json().get("status")
        except requests.RequestException:
            status = None
        if status == "READY":
            break
        if status == "SETUP_FAILED":
            deadline = 0  # no use waiting: say why now
        assert server.poll() is None, "the Cog server exited"
        time.sleep(0.5)
    else:
        server.kill()
        log.seek(0)
        pytest.fail(f"the Cog server never became ready:\n{log.read()[-3000:]}")
    try:
        yield CogServer(url, server.pid, log_path)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def cog(tmp_path_factory, lora_server):
    """The shared server: the tiny model from a folder (with its stand-in accelerators), Civitai on loopback."""
    folder = write_tiny_model(tmp_path_factory.mktemp("cog-model") / "tiny")
    with running_cog_server(tmp_path_factory, WANLORA_MODEL=str(folder), WANLORA_CIVITAI_URL=lora_server.url) as s:
        yield s


@pytest.fixture(scope="module")
def cog_server(cog):
    return cog.url


def health_settles(url: str, seconds: float = 10.0) -> str:
    """The server's status once it has finished the last request (it reports BUSY briefly)."""
    deadline = time.time() + seconds
    while True:
        status = requests.get(f"{url}/health-check", timeout=5).json()["status"]
        if status != "BUSY" or time.time() > deadline:
            return status
        time.sleep(0.1)


def predict(url: str, **inputs) -> dict:
    """One prediction, once the last one has finished: Cog answers 409 while it is busy."""
    health_settles(url)
    return requests.post(f"{url}/predictions", json={"input": inputs}, timeout=300).json()


def video_of(response: dict, tmp_path: Path, name: str) -> Path:
    assert response["status"] == "succeeded", response.get("error")
    header, data = response["output"].split(",", 1)
    assert header.startswith("data:video/mp4")
    path = tmp_path / name
    path.write_bytes(base64.b64decode(data))
    return path


SMALL = {"num_frames": 9, "sample_steps": 2, "fps": 12, "seed": 11}


def test_server_runs_two_loras_fails_cleanly_and_reproduces(cog_server, lora_server, tmp_path):
    two = {
        "prompt": "styleword motionword a fox",
        "lora_weights": f"{lora_server.url}/style.safetensors",
        "lora_scale": 0.8,
        "extra_lora": f"{lora_server.url}/motion.safetensors",
        "extra_lora_scale": -0.5,
        "aspect_ratio": "1:1",
        **SMALL,
    }
    first = predict(cog_server, **two)
    got = probe(video_of(first, tmp_path, "a.mp4"))
    assert (got.codec, got.width, got.height, len(got.frames), got.fps) == ("h264", 64, 64, 9, 12.0)
    assert {"lora_load_seconds", "denoising_seconds", "frames"} <= set(first["metrics"])
    assert first["metrics"]["frames"] == 9

    bad_inputs = [
        {"lora_weights": f"{lora_server.url}/missing.safetensors"},
        {"lora_weights": f"{lora_server.url}/login.safetensors"},
        {"num_frames": 500},
        {"lora_scale": 40},
        {"prompt": ""},
    ]
    for bad in bad_inputs:
        response = predict(cog_server, **{**two, **bad})
        assert response["status"] == "failed", bad
        assert len(response["error"]) < 600 and "Traceback" not in response["error"]
        assert health_settles(cog_server) == "READY"
    errors = [predict(cog_server, **{**two, **bad})["error"] for bad in bad_inputs[2:]]
    assert "num_frames=500" in errors[0] and "lora_scale=40" in errors[1] and "prompt" in errors[2]

    again = predict(cog_server, **two)
    assert again["output"] == first["output"]  # byte-identical after the failures

    plain = predict(cog_server, **{**two, "lora_weights": None, "extra_lora": None})
    assert not np.array_equal(probe(video_of(plain, tmp_path, "b.mp4")).frames, got.frames)
    assert predict(cog_server, **{**two, "aspect_ratio": "16:9"})["status"] == "succeeded"


def test_server_image_to_video(cog_server, tmp_path):
    from PIL import Image

    buffer = tmp_path / "wide.png"
    Image.new("RGB", (320, 180), (20, 120, 200)).save(buffer)
    image = "data:image/png;base64," + base64.b64encode(buffer.read_bytes()).decode()
    response = predict(cog_server, prompt="the sea moves", image=image, **SMALL)
    got = probe(video_of(response, tmp_path, "i2v.mp4"))
    assert (got.width, got.height, len(got.frames)) == (*image2video_size(320, 180, 112 * 64), 9)  # the image's aspect
    refused = predict(cog_server, prompt="the sea moves", image=image, model="1.3b", **SMALL)
    assert refused["status"] == "failed" and "text-to-video only" in refused["error"]


# ------------------------------------------------------------------ Wan2.2 through the real server


STAND_INS = {
    "Wan2.1-T2V-14B": "t2v",
    "Wan2.1-I2V-14B-480P": "i2v",
    "Wan2.2-T2V-A14B": "t2v-a14b",
    "Wan2.2-I2V-A14B": "i2v-a14b",
    "Wan2.2-TI2V-5B": "ti2v-5b",
}


def weights_folder(tmp_path_factory, repos: list[str]) -> dict[str, str]:
    """The environment of a server whose `model` input chooses, each catalogue repo a tiny stand-in there."""
    weights = tmp_path_factory.mktemp("cog-weights")
    for repo in repos:
        write_tiny_model(weights / "Wan-AI" / f"{repo}-Diffusers", kind=STAND_INS[repo])
    return {"WANLORA_MODEL": "", "WANLORA_I2V_MODEL": "", "WANLORA_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cog22(tmp_path_factory, lora_server):
    """No model override: the `model` input chooses, each catalogue repo a tiny stand-in in the weights folder."""
    env = weights_folder(tmp_path_factory, ["Wan2.1-T2V-14B", "Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B", "Wan2.2-TI2V-5B"])
    with running_cog_server(tmp_path_factory, **env) as server:
        yield server.url


def test_server_takes_fals_loras_list_as_fal_writes_it(cog22, lora_server, tmp_path):
    style, motion = f"{lora_server.url}/style.safetensors", f"{lora_server.url}/motion.safetensors"
    listed = [
        {"path": motion, "scale": 3.0, "transformer": "high"},
        {"path": motion, "scale": 1.0, "transformer": "low"},
    ]
    a14b = predict(
        cog22,
        prompt="styleword motionword a fox",
        model="2.2-a14b",
        lora_weights=style,
        lora_scale=0.5,
        loras=json.dumps(listed),
        **SMALL,
    )
    assert recorded(video_of(a14b, tmp_path, "fal.mp4"))["loras"] == [
        {"ref": style, "strength": 0.5},
        {"ref": motion, "strength": 3.0, "expert": "high"},
        {"ref": motion, "strength": 1.0, "expert": "low"},
    ]
    secret = f"{lora_server.url}/style.safetensors?token=SECRET-TOKEN"
    for loras, words in (
        ([{"path": style}], "loras="),  # the slot's LoRA again
        ([{"path": secret, "transformer": "middle"}], "high, low or both"),
        ([{"path": secret, "scale": 3.5}], "between -1 and 3"),
        ([{"path": secret}] * 9, "at most 8"),
        ("[{'path': 'x'}]", "not JSON"),
    ):
        text = loras if isinstance(loras, str) else json.dumps(loras)
        refused = predict(cog22, prompt="a fox", model="2.2-a14b", lora_weights=style, loras=text, **SMALL)
        assert refused["status"] == "failed" and words in refused["error"], refused.get("error")
        assert "SECRET" not in refused["error"] and len(refused["error"].splitlines()) == 1
    assert health_settles(cog22) == "READY"


def test_server_runs_wan22_a14b_with_a_lora_per_expert_and_ti2v(cog22, lora_server, tmp_path):
    from PIL import Image

    style, motion = f"{lora_server.url}/style.safetensors", f"{lora_server.url}/motion.safetensors"
    per_expert = {
        **{"lora_weights": style, "lora_scale": 0.5},
        **{"lora_weights_transformer": motion, "lora_scale_transformer": 3.0},
        **{"lora_weights_transformer_2": motion, "lora_scale_transformer_2": 1.0},
    }
    a14b = predict(
        cog22, prompt="styleword motionword a fox", model="2.2-a14b", sample_guide_scale_2=2.0, **per_expert, **SMALL
    )
    path = video_of(a14b, tmp_path, "a14b.mp4")
    got, tags = probe(path), recorded(path)
    assert (got.width, got.height, len(got.frames)) == (112, 64, 9)
    assert tags["model"] == "tiny-t2v-a14b" and (tags["guidance_scale"], tags["guidance_scale_2"]) == (4.0, 2.0)
    assert tags["loras"] == [
        {"ref": style, "strength": 0.5},
        {"ref": motion, "strength": 3.0, "expert": "high"},
        {"ref": motion, "strength": 1.0, "expert": "low"},
    ]

    lightning = {**SMALL, "accelerator": "lightx2v-4step", "sample_steps": None}  # its own 4 steps
    fast = predict(cog22, prompt="a fox", model="2.2-a14b", **lightning)
    assert fast["status"] == "succeeded" and fast["metrics"]["steps"] == 4, fast.get("error")

    Image.new("RGB", (320, 180), (20, 120, 200)).save(tmp_path / "wide.png")
    image = "data:image/png;base64," + base64.b64encode((tmp_path / "wide.png").read_bytes()).decode()
    i2v = predict(cog22, prompt="the sea", model="2.2-a14b", image=image, **SMALL)
    i2v = recorded(video_of(i2v, tmp_path, "i2v.mp4"))
    assert i2v["model"] == "tiny-i2v-a14b" and i2v["guidance_scale_2"] == 3.5

    for extra in ({}, {"image": image}):  # TI2V-5B: text-to-video, or with a first frame; the resolution is moot
        ti2v = video_of(
            predict(cog22, prompt="a fox", model="2.2-5b", resolution="480p", **extra, **SMALL), tmp_path, "ti2v.mp4"
        )
        assert (probe(ti2v).width, probe(ti2v).height) == (128, 64) and recorded(ti2v)["model"] == "tiny-ti2v-5b"

    refused = predict(cog22, prompt="a fox", model="14b", lora_weights_transformer_2=motion, **SMALL)
    assert refused["status"] == "failed" and "only model=2.2-a14b has a second transformer" in refused["error"]
    back = predict(cog22, prompt="a fox", model="14b", lora_weights=style, **SMALL)
    assert recorded(video_of(back, tmp_path, "back.mp4"))["model"] == "tiny"


def test_server_sweeps_lora_weights_into_one_grid_and_refuses_a_sweep_it_cannot_run(cog22, lora_server, tmp_path):
    style, motion = f"{lora_server.url}/style.safetensors", f"{lora_server.url}/motion.safetensors"
    request = {"prompt": "styleword a fox", "model": "14b", "lora_weights": style, "extra_lora": motion, **SMALL}
    grid = video_of(predict(cog22, **request, lora_scale_sweep="0, 0.5,1"), tmp_path, "grid.mp4")
    tags = recorded(grid)
    from wanlora.grid import grid_layout
    from wanlora.lora.selection import LoraRequest
    from wanlora.sweep import Axis, grid_headers

    headers = grid_headers([Axis("strength", (0.0, 0.5, 1.0), 0)], [LoraRequest(style)])
    layout = grid_layout(headers, 1, 3, 112, 64, 1920)
    assert (probe(grid).width, probe(grid).height) == (layout.width, layout.height)  # three 112x64 cells, headed
    assert [cell["loras"] for cell in tags["sweep"]["cells"]] == [
        [{"ref": style, "strength": strength}, {"ref": motion, "strength": 1.0}] for strength in (0.0, 0.5, 1.0)
    ]
    assert {cell["seed"] for cell in tags["sweep"]["cells"]} == {SMALL["seed"]}

    a14b = predict(cog22, **{**request, "model": "2.2-a14b"}, lora_scale_sweep="0.5,1")
    assert len(recorded(video_of(a14b, tmp_path, "a14b.mp4"))["sweep"]["cells"]) == 2

    for sweep, words in (
        ("0,x", "comma-separated strengths, e.g. 0,0.5,1"),
        ("0,1,2,3,0.5,1.5,2.5", "1 to 6 strengths"),
        ("0,4", "between -1 and 3"),
        ("0,nan", "between -1 and 3"),
    ):
        refused = predict(cog22, **request, lora_scale_sweep=sweep)
        assert refused["status"] == "failed" and "lora_scale_sweep" in refused["error"], refused
        assert words in refused["error"], refused["error"]
    alone = predict(cog22, prompt="a fox", model="14b", extra_lora=motion, lora_scale_sweep="0,1", **SMALL)
    assert alone["status"] == "failed" and "empty unless lora_weights (or replicate_weights)" in alone["error"]


def test_server_runs_every_variant_in_fp8_when_the_operator_asks(tmp_path_factory, lora_server, tmp_path):
    from PIL import Image

    env = weights_folder(tmp_path_factory, list(STAND_INS))
    Image.new("RGB", (320, 180), (20, 120, 200)).save(tmp_path / "wide.png")
    image = "data:image/png;base64," + base64.b64encode((tmp_path / "wide.png").read_bytes()).decode()
    style = f"{lora_server.url}/style.safetensors"
    runs = [
        ("14b", {"lora_weights": style}, "tiny"),
        ("14b", {"image": image}, "tiny-i2v"),
        ("2.2-a14b", {"lora_weights": style}, "tiny-t2v-a14b"),
        ("2.2-a14b", {"image": image}, "tiny-i2v-a14b"),
        ("2.2-5b", {"image": image}, "tiny-ti2v-5b"),
    ]
    with running_cog_server(tmp_path_factory, WANLORA_QUANTIZE="fp8", **env) as server:
        for model, extra, variant in runs:
            tags = recorded(
                video_of(predict(server.url, prompt="a fox", model=model, **extra, **SMALL), tmp_path, "v.mp4")
            )
            assert (tags["model"], tags["weights"]) == (variant, "fp8")


def test_an_unknown_quantization_is_named_at_setup(monkeypatch):
    from wanlora.frontends.service import VideoService
    from wanlora.weights.formats import QUANTIZE_CHOICES

    monkeypatch.setenv("WANLORA_QUANTIZE", "int4")
    named = ", ".join(QUANTIZE_CHOICES[1:])  # "fp8", and any other format registered
    assert named.startswith("fp8")
    with pytest.raises(InvalidInput, match=f"WANLORA_QUANTIZE='int4' is not allowed: {named} or none$"):
        VideoService().load("tiny")


# ------------------------------------------------------------------ in-process, for fast iteration


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    os.environ.update(WANLORA_MODEL="tiny", WANLORA_I2V_MODEL="tiny-i2v")
    from predict import Predictor

    runner = Predictor()
    runner.setup()
    yield runner
    del os.environ["WANLORA_MODEL"], os.environ["WANLORA_I2V_MODEL"]


def inputs(**overrides):
    from predict import Predictor

    defaults = {
        name: param.default.default
        for name, param in inspect.signature(Predictor.run).parameters.items()
        if name != "self"
    }
    return {**defaults, **SMALL, **overrides}


def test_in_process_same_loras_do_no_work_and_a_cancel_leaves_a_consistent_model(
    predictor, lora_server, offline_net, monkeypatch
):
    style = f"{lora_server.url}/style.safetensors"
    first = Path(predictor.run(**inputs(prompt="styleword fox", lora_weights=style))).read_bytes()
    pipe = predictor.service.resident.pipe
    applied = []
    original = pipe.experts[0].loras.merger.write
    monkeypatch.setattr(
        pipe.experts[0].loras.merger, "write", lambda plan: applied.append(original(plan)) or applied[-1]
    )
    assert Path(predictor.run(**inputs(prompt="styleword fox", lora_weights=style))).read_bytes() == first
    assert applied == [0]  # the same LoRA set: not a tensor rewritten

    from cog import CancelationException

    def cancel_mid_run(*args, **kwargs):
        raise CancelationException()

    monkeypatch.setattr(pipe, "_denoise", cancel_mid_run)
    with pytest.raises(CancelationException):
        predictor.run(**inputs(prompt="motionword fox", lora_weights=f"{lora_server.url}/motion.safetensors"))
    monkeypatch.undo()
    assert Path(predictor.run(**inputs(prompt="styleword fox", lora_weights=style))).read_bytes() == first


def cog_download(image) -> Path:
    """Where Cog puts a file input it downloaded for a request: a fresh temporary file."""
    with tempfile.NamedTemporaryFile(suffix="photo.png", delete=False) as handle:
        image.save(handle, format="PNG")
    return Path(handle.name)


def test_in_process_image_switches_to_i2v_and_bad_models_are_refused(predictor):
    from PIL import Image

    from wanlora.errors import InvalidInput

    photo = cog_download(Image.new("RGB", (90, 160), (200, 40, 40)))
    got = probe(predictor.run(**inputs(prompt="a fox", image=Path(photo))))
    assert (got.width, got.height, len(got.frames)) == (*image2video_size(90, 160, 112 * 64), 9)  # the image's aspect
    assert predictor.service.resident.model == "tiny-i2v"
    with pytest.raises(InvalidInput, match="model=1.3b is text-to-video only"):
        predictor.run(**inputs(prompt="a fox", image=Path(photo), model="1.3b"))
    with pytest.raises(InvalidInput, match="model='7b'"):
        predictor.run(**inputs(prompt="a fox", model="7b"))
    assert probe(predictor.run(**inputs(prompt="a fox"))).width == 112  # back to text-to-video


@pytest.mark.parametrize("sample", sorted((ROOT / "samples").glob("*.json")), ids=lambda p: p.name)
def test_samples_use_only_real_inputs_with_valid_values(sample):
    from predict import Predictor
    from wanlora.frontends.service import VideoService

    values = json.loads(sample.read_text())
    assert set(values) <= set(inspect.signature(Predictor.run).parameters), sample.name
    values.pop("image", None)  # a URL: Cog downloads it before the predictor sees it
    VideoService(override="", i2v_override="").resolve(PredictorInputs.of(**values))


def test_server_with_two_workers_matches_one_process_and_survives_a_killed_worker(
    cog_server, tmp_path_factory, tmp_path
):
    """WANLORA_GPUS=2 on CPU: two persistent gloo workers share each prediction (Ulysses 2)."""
    request = {"prompt": "a fox", **SMALL}
    reference = predict(cog_server, **request)
    with running_cog_server(tmp_path_factory, WANLORA_GPUS="2") as server:
        url, pid = server.url, server.pid
        split = predict(url, **request)  # Ulysses 2: another summation order, so frames within a level
        assert_frames_agree(
            probe(video_of(split, tmp_path, "split.mp4")).frames, probe(video_of(reference, tmp_path, "one.mp4")).frames
        )

        workers = children_with(pid, "spawn_main")
        assert len(workers) == 2, workers
        victim = max(workers)
        long_request = {**request, "num_frames": 81, "sample_steps": 100}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(predict, url, **long_request)
            time.sleep(2)
            os.kill(victim, signal.SIGKILL)
            crashed = pending.result(timeout=60)
        assert crashed["status"] == "failed"
        assert f"pid {victim}, exit code -9) stopped during the request" in crashed["error"]
        assert "restarting" in crashed["error"]
        assert health_settles(url) == "READY"
        wait_for(lambda: not alive(victim), 10)
        assert predict(url, **request)["output"] == split["output"]  # the new group serves, as the old one did


# ------------------------------------------------------------------ Replicate's fine-tunes, accelerators, errors


def test_server_replicate_weights_are_the_trained_lora(cog_server, lora_server, tmp_path):
    """A trained version's trained_model.tar runs as the main LoRA, exactly as the file inside it would."""
    request = {"prompt": "trainedword a fox", "lora_scale": 0.8, **SMALL}
    trained = predict(cog_server, replicate_weights=f"{lora_server.url}/trained_model.tar", **request)
    direct = predict(cog_server, lora_weights=f"{lora_server.url}/trained.safetensors", **request)
    assert trained["status"] == direct["status"] == "succeeded", trained.get("error")
    frames = probe(video_of(trained, tmp_path, "trained.mp4")).frames
    assert np.array_equal(frames, probe(video_of(direct, tmp_path, "direct.mp4")).frames)
    assert not np.array_equal(frames, probe(video_of(predict(cog_server, **request), tmp_path, "plain.mp4")).frames)
    stacked = predict(
        cog_server,
        replicate_weights=f"{lora_server.url}/trained_model.tar",
        extra_lora=f"{lora_server.url}/style.safetensors",
        **request,
    )
    assert stacked["status"] == "succeeded" and stacked["output"] != trained["output"]
    both = predict(
        cog_server,
        replicate_weights=f"{lora_server.url}/trained_model.tar",
        lora_weights=f"{lora_server.url}/style.safetensors",
        **request,
    )
    assert both["status"] == "failed" and len(both["error"].splitlines()) == 1
    assert "lora_weights=" in both["error"] and "replicate_weights is its LoRA" in both["error"]


def test_server_accelerator_samples_its_own_steps(cog_server, tmp_path):
    request = {"prompt": "a fox", "num_frames": 9, "fps": 12, "seed": 3}
    fast = predict(cog_server, accelerator="lightx2v-4step", **request)
    assert fast["status"] == "succeeded", fast.get("error")
    assert fast["metrics"]["steps"] == 4
    tags = recorded(video_of(fast, tmp_path, "fast.mp4"))
    assert (tags["accelerator"], tags["num_inference_steps"], tags["guidance_scale"]) == ("lightx2v-4step", 4, 1.0)
    assert [lora["ref"].rsplit("/", 1)[1] for lora in tags["loras"]] == ["lightx2v-4step.safetensors"]
    assert predict(cog_server, accelerator="causvid", **request)["metrics"]["steps"] == 8
    rcm = predict(cog_server, accelerator="rcm", **request)  # rCM's own sampler, on its stand-in LoRA
    assert rcm["status"] == "succeeded" and rcm["metrics"]["steps"] == 4, rcm.get("error")
    assert predict(cog_server, **request)["metrics"]["steps"] == 30  # Replicate's default without one
    wrong = predict(cog_server, accelerator="lightx2v-4step", sample_steps=6, **request)
    assert wrong["status"] == "failed" and "4 with lightx2v-4step" in wrong["error"]


def test_server_private_lora_needs_its_token_on_every_request(cog_server):
    private = {"prompt": "a fox", "lora_weights": "civitai:4242", **SMALL}
    first = predict(cog_server, civitai_api_token="good-token", **private)
    assert first["status"] == "succeeded", first.get("error")
    for token in (None, "wrong-token"):
        refused = predict(cog_server, civitai_api_token=token, **private)
        assert refused["status"] == "failed" and "Civitai needs an API token" in refused["error"], refused
        assert health_settles(cog_server) == "READY"
    assert predict(cog_server, civitai_api_token="good-token", **private)["output"] == first["output"]


def test_server_keeps_secrets_out_of_errors_logs_and_tags(cog, lora_server, tmp_path):
    host = lora_server.url.removeprefix("http://")
    signed = "?token=tok3n-secret&X-Amz-Signature=s1g-secret"
    missing = predict(
        cog.url,
        prompt="a fox",
        lora_weights=f"http://bob:pw-secret@{host}/missing.safetensors{signed}",
        hf_api_token="hf-secret",
        civitai_api_token="civ-secret",
        **SMALL,
    )
    assert missing["status"] == "failed" and "not found (404)" in missing["error"]
    made = predict(cog.url, prompt="a fox", lora_weights=f"{lora_server.url}/style.safetensors{signed}", **SMALL)
    tags = probe(video_of(made, tmp_path, "signed.mp4")).tags
    for secret in ("tok3n-secret", "s1g-secret", "pw-secret", "hf-secret", "civ-secret"):
        assert secret not in missing["error"] and secret not in "".join(missing["logs"] or "")
        assert secret not in tags and secret not in cog.log_text(), secret


def test_server_paths_on_the_server_are_refused_alike(cog_server, tmp_path):
    """No input reaches a file on the server, and the answer does not tell whether it exists."""
    for image in ("/etc/hostname", "/no/such/file.png"):
        refused = predict(cog_server, prompt="a fox", image=image, **SMALL)
        assert refused["status"] == "failed" and "image='(a path on the server)'" in refused["error"], refused
    errors = set()
    for ref in ("/etc/passwd", "/no/such/lora.safetensors"):
        refused = predict(cog_server, prompt="a fox", lora_weights=ref, **SMALL)
        assert refused["status"] == "failed"
        errors.add(refused["error"].replace(ref, "PATH"))
    assert len(errors) == 1 and "is a path; here a LoRA must come from a link" in errors.pop()
    listed = predict(cog_server, prompt="a fox", loras=json.dumps([{"path": "/etc/passwd"}]), **SMALL)
    assert listed["status"] == "failed" and "is a path; here a LoRA must come from a link" in listed["error"]


@pytest.mark.parametrize(
    "bad",
    [{"lora_weights": 123}, {"lora_weights": ["a/b"]}, {"hf_api_token": 123}, {"num_frames": "nine"}, {"seed": -5}],
    ids=["int-ref", "list-ref", "int-token", "text-frames", "negative-seed"],
)
def test_server_wrongly_typed_inputs_are_one_line(cog_server, bad):
    refused = predict(cog_server, prompt="a fox", **{**SMALL, **bad})
    assert refused["status"] == "failed" and len(refused["error"].splitlines()) == 1, refused
    assert "Traceback" not in refused["error"] and health_settles(cog_server) == "READY"


def test_server_a_lora_that_overflows_leaves_the_model_as_it_was(cog_server, lora_server, tmp_path):
    import torch
    from safetensors.torch import save

    huge = {
        "lora_unet_blocks_0_self_attn_k.lora_down.weight": torch.full((4, 24), 0.01),
        "lora_unet_blocks_0_self_attn_k.lora_up.weight": torch.full((24, 4), 0.01),
        "lora_unet_blocks_0_self_attn_k.alpha": torch.tensor(1e300, dtype=torch.float64),
    }
    lora_server.routes["/huge.safetensors"] = Route(save(huge))
    style = {"prompt": "styleword a fox", "lora_weights": f"{lora_server.url}/style.safetensors", **SMALL}
    before = predict(cog_server, **style)
    refused = predict(cog_server, **{**style, "extra_lora": f"{lora_server.url}/huge.safetensors"})
    assert refused["status"] == "failed" and "far too large" in refused["error"]
    assert predict(cog_server, **style)["output"] == before["output"]  # not a half-changed model


def test_server_cancel_during_a_stalled_download_frees_the_server_at_once(cog_server, lora_server):
    lora_server.routes["/stalled.safetensors"] = Route(lora_server.routes["/style.safetensors"].body, drip=5.0)
    health_settles(cog_server)
    started = requests.put(
        f"{cog_server}/predictions/stalled-1",
        json={"input": {"prompt": "a fox", "lora_weights": f"{lora_server.url}/stalled.safetensors", **SMALL}},
        headers={"Prefer": "respond-async"},
        timeout=10,
    )
    assert started.status_code in (200, 202), started.text
    time.sleep(3)  # well into the dripping body
    cancelled_at = time.monotonic()
    assert requests.post(f"{cog_server}/predictions/stalled-1/cancel", timeout=10).status_code == 200
    while requests.get(f"{cog_server}/health-check", timeout=5).json()["status"] != "READY":
        assert time.monotonic() - cancelled_at < 5, "the cancel did not free the server"
        time.sleep(0.1)
    assert predict(cog_server, prompt="a fox", **SMALL)["status"] == "succeeded"


def test_in_process_outputs_do_not_pile_up(predictor):
    for seed in range(3):
        path = Path(predictor.run(**inputs(prompt="a fox", seed=seed)))
        assert sorted(predictor.outputs.iterdir()) == [path]


def test_in_process_a_lora_for_the_other_size_names_the_model_input(predictor, lora_server, offline_net):
    import torch
    from safetensors.torch import save

    wide = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 5120),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 2),
    }
    lora_server.routes["/wan14b.safetensors"] = Route(save(wide))
    with pytest.raises(LoraMismatch, match="made for Wan2.1 14B.*run it with model=14b"):
        predictor.run(**inputs(prompt="a fox", model="1.3b", lora_weights=f"{lora_server.url}/wan14b.safetensors"))


def test_in_process_a_huge_prompt_or_a_nul_is_generated_and_recorded(predictor):
    """Cog passes a prompt of any size: past the old 128 kB argv limit, it still ends in a video."""
    for prompt in ("a fox " * 40_000, "a fox\x00 in the snow"):
        path = predictor.run(**inputs(prompt=prompt))
        assert recorded(path)["prompt"] == prompt
    with pytest.raises(InvalidInput, match="at most 1000000 characters"):
        predictor.run(**inputs(prompt="x" * 1_000_001))


def test_in_process_two_private_loras_with_a_cache_smaller_than_both(predictor, lora_server, offline_net, monkeypatch):
    """Each is downloaded once; the trigger-word hint no longer fetches again (without the token)."""
    monkeypatch.setenv("WANLORA_CIVITAI_URL", lora_server.url)
    monkeypatch.setenv("WANLORA_CACHE_MAX_GB", "0")
    for version, name in (("5001", "style"), ("5002", "motion")):
        lora_server.routes[f"/api/download/models/{version}"] = Route(
            lora_server.routes[f"/{name}.safetensors"].body, require_auth="Bearer two-loras"
        )
    path = predictor.run(
        **inputs(prompt="a fox", lora_weights="civitai:5001", extra_lora="civitai:5002", civitai_api_token="two-loras")
    )
    assert len(recorded(path)["loras"]) == 2
    assert [lora_server.full_bodies[f"/api/download/models/{v}"] for v in ("5001", "5002")] == [1, 1]
