"""Shared fixtures: the tiny model, its folder, and real-ffmpeg decoding."""

from __future__ import annotations

import inspect
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from wanlora import WanLoraPipeline
from wanlora.tiny import write_tiny_model

SMALL = {"width": 64, "height": 48, "num_frames": 9, "num_inference_steps": 2, "fps": 12}

# The fast tier, `pytest -m "not slow"`, leaves out the tests marked slow (pyproject.toml registers the
# marker): those that start processes or take more than about two seconds. These are slow by what they use,
# and marked here; any other is marked where it is written (a decorator, or a file's `pytestmark`).
SLOW_FIXTURES = {
    "cog",  # the real Cog server in its own process (tests/test_cog.py), and the fixtures that start it
    "cog_server",
    "cog22",
    "predictor",  # predict.py's Predictor set up in this process: a model loaded, outputs encoded
    "cluster",  # a Ray cluster (tests/test_batch_ray.py)
    "worker_group",  # one worker process per (CPU) device (tests/test_parallel.py)
}


# A test whose own code calls one of these starts a process: `wanlora` in a new interpreter, the Cog server, or
# another child (a process to kill, a second process racing the first).
STARTS_PROCESSES = ("run_cli(", "running_cog_server(", "subprocess.")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if any(call in source for call in STARTS_PROCESSES) or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@dataclass
class Probe:
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: np.ndarray
    tags: str  # what `ffmpeg -i` prints


def probe(path: str | Path) -> Probe:
    """Decode an MP4 with real ffmpeg: stream facts, every frame, and the container tags."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])
    info = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    return Probe(meta["codec"], meta["pix_fmt"].split("(")[0], width, height, meta["fps"], frames, info.stderr)


def assert_frames_agree(got: np.ndarray, want: np.ndarray, levels: int = 1, share: float = 0.01) -> None:
    """Frames from two different code paths (a file against memory, split across processes, compiled):
    CPU kernels may sum in another order there, so a few values may differ by up to `levels`.

    Bitwise equality is promised only within one code path; tests compare across paths with this.
    """
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert int(diff.max()) <= levels, f"frames differ by up to {int(diff.max())} levels"
    assert np.count_nonzero(diff) <= share * diff.size, f"{np.count_nonzero(diff)} of {diff.size} values differ"


def file_size_limit(size: int):
    """For a child process: writes past `size` bytes fail (EFBIG) as they would on a full disk."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, preexec_fn=None
) -> subprocess.CompletedProcess:
    """Run the installed `wanlora` entry point in a fresh process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "wanlora.frontends.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
        preexec_fn=preexec_fn,
    )


@pytest.fixture
def cli(capsys, monkeypatch):
    """`wanlora ARGS` in this process, for what answers before anything heavy loads (input errors,
    help): as a user sees it, without a new interpreter's seconds of imports."""
    from wanlora.frontends.cli import main

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
            monkeypatch.setenv(name, os.environ.get(name, "warning"))  # main sets them; they are put back after
        level = logging.getLogger("wanlora").level  # main sets it for its command; put it back
        with warnings.catch_warnings():
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help, usage errors
                code = exc.code
            finally:
                logging.getLogger("wanlora").setLevel(level)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def tiny_pipe() -> WanLoraPipeline:
    return WanLoraPipeline.from_pretrained("tiny")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def fresh_tiny_pipe() -> WanLoraPipeline:
    """A pipeline of its own, for tests that change LoRA state."""
    return WanLoraPipeline.from_pretrained("tiny")


def container_tags(path: str | Path) -> dict[str, str]:
    """The MP4's global tags, read back in full through ffmpeg's FFMETADATA dump."""
    dump = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tags, key, value, escaped = {}, None, [], False
    for char in dump.split("\n", 1)[1]:  # after the ;FFMETADATA1 line
        if escaped:
            value.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=" and key is None:
            key = "".join(value)
            value = []
        elif char == "\n":
            tags[key] = "".join(value)
            key, value = None, []
        else:
            value.append(char)
    return tags


def recorded(path: str | Path) -> dict:
    """The generation as the MP4 records it: the JSON of its `comment` tag."""
    return json.loads(container_tags(path)["comment"])


@pytest.fixture
def offline_net(tmp_path, monkeypatch):
    """A fresh LoRA cache, loopback URLs allowed, fast retries; returns the env for subprocesses."""
    from wanlora import net

    env = {"WANLORA_CACHE": str(tmp_path / "cache"), "WANLORA_ALLOW_PRIVATE_URLS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(net, "BACKOFF_SECONDS", 0.01)
    return env


@pytest.fixture
def file_server():
    from .servers import FileServer

    with FileServer() as server:
        yield server


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The stand-in Hub behind HF_ENDPOINT, with its own Hub cache."""
    import huggingface_hub.constants as constants

    from .servers import FakeHub

    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        yield hub
