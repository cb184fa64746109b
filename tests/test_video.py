import json
import subprocess
import sys

import numpy as np
import pytest

from wanlora import Video, VideoEncodeError
from wanlora.video import encode_mp4

from .conftest import container_tags, file_size_limit, probe, recorded


def gradient_frames(count=9, height=48, width=64):
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i, ..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        frames[i, ..., 1] = i * 25
    return frames


def test_encodes_h264_yuv420p_with_exact_frames_fps_and_tags(tmp_path):
    frames = gradient_frames()
    video = Video(frames=frames, fps=12, seed=7, metadata={"prompt": "a fox", "seed": 7, "loras": [["x", 0.5]]})
    path = video.save(tmp_path / "out.mp4")
    got = probe(path)
    assert (got.codec, got.pix_fmt, got.width, got.height, got.fps) == ("h264", "yuv420p", 64, 48, 12.0)
    assert got.frames.shape == frames.shape
    assert np.abs(got.frames.astype(int) - frames.astype(int)).mean() < 4  # CRF 18 is near-lossless
    assert "title           : a fox" in got.tags
    assert recorded(path) == {"prompt": "a fox", "seed": 7, "loras": [["x", 0.5]]}
    assert b"moov" in path.read_bytes()[:4096]  # +faststart puts the index up front


@pytest.mark.parametrize(
    ("shape", "message"),
    [((3, 47, 64, 3), "even"), ((3, 48, 8192, 3), "outside"), ((0, 48, 64, 3), "no frames"), ((3, 48, 64), "uint8")],
)
def test_refuses_what_the_codec_cannot_take(tmp_path, shape, message):
    with pytest.raises(VideoEncodeError, match=message):
        encode_mp4(np.zeros(shape, np.uint8), tmp_path / "x.mp4", fps=12)
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_crf_and_suffix(tmp_path):
    with pytest.raises(VideoEncodeError, match="crf"):
        encode_mp4(gradient_frames(), tmp_path / "x.mp4", fps=12, crf=70)
    with pytest.raises(VideoEncodeError, match=".mp4"):
        encode_mp4(gradient_frames(), tmp_path / "x.avi", fps=12)
    assert list(tmp_path.iterdir()) == []


def test_any_prompt_is_tagged_without_breaking_the_encode(tmp_path):
    """Tags go through a metadata file: no argv limit, no NUL trouble, escapes kept."""
    prompt = "a fox; #1 = best\\ and\nmore\x00 " + "long " * 40_000  # 200 kB, over the old argv limit
    path = Video(frames=gradient_frames(), fps=12, seed=1, metadata={"prompt": prompt}).save(tmp_path / "x.mp4")
    assert len(probe(path).frames) == 9
    tags = container_tags(path)
    assert json.loads(tags["comment"])["prompt"] == prompt  # recorded in full, exactly
    assert tags["title"].startswith("a fox; #1 = best\\ and\nmore ") and len(tags["title"]) < 1100


def test_a_full_disk_is_an_error_and_leaves_no_file(tmp_path):
    code = (
        "import numpy as np, sys; from wanlora.video import encode_mp4\n"
        "frames = np.random.default_rng(0).integers(0, 255, (30, 256, 256, 3), dtype=np.uint8)\n"
        f"encode_mp4(frames, {str(tmp_path / 'out.mp4')!r}, fps=12)"
    )
    full = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=file_size_limit(20_000)
    )
    assert full.returncode != 0 and "VideoEncodeError: ffmpeg could not write" in full.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_places_are_checked_before_any_work(tmp_path):
    frames = gradient_frames()
    (tmp_path / "file").write_text("x")
    for path, words in (
        (tmp_path / "missing" / "x.mp4", "does not exist"),
        (tmp_path / "file" / "x.mp4", "does not exist"),
        ("/sys/x.mp4", "cannot write there"),  # read-only even for root
    ):
        with pytest.raises(VideoEncodeError, match=words):
            encode_mp4(frames, path, fps=12)


def test_no_ffmpeg_is_named_as_such_and_found_out_before_the_work(tmp_path, monkeypatch, cli):
    import imageio_ffmpeg

    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(tmp_path / "no-ffmpeg"))  # taken on its word by imageio-ffmpeg
    with pytest.raises(VideoEncodeError, match="IMAGEIO_FFMPEG_EXE=.*no-ffmpeg' is not a program"):
        encode_mp4(gradient_frames(), tmp_path / "x.mp4", fps=12)
    refused = cli("generate", "a fox", "--model", "t2v-14b", "-o", str(tmp_path / "x.mp4"))  # not reachable here
    assert refused.returncode == 2 and "is not a program" in refused.stderr.strip().splitlines()[-1]
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE")

    def none_found():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", none_found)
    with pytest.raises(VideoEncodeError, match="saving an MP4 needs ffmpeg: pip install imageio-ffmpeg"):
        encode_mp4(gradient_frames(), tmp_path / "x.mp4", fps=12)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_while_ffmpeg_finishes_stops_ffmpeg_too(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, raised as SystemExit) after the last frame, while ffmpeg still writes: no ffmpeg
    left running into a staging folder that is gone."""
    import subprocess

    encodes: list[subprocess.Popen] = []
    wait = subprocess.Popen.wait

    def interrupted_wait(process, timeout=None):
        if "rawvideo" in process.args and process not in encodes:
            encodes.append(process)
            raise KeyboardInterrupt
        return wait(process, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        encode_mp4(gradient_frames(), tmp_path / "x.mp4", fps=12)
    assert encodes and encodes[0].returncode is not None  # stopped and reaped, not still running
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_appears_while_encoding_is_kept_when_overwrite_is_off(tmp_path, monkeypatch):
    """Two runs with one seed write one default name: the second must not replace the first's video."""
    import wanlora.video as video

    target = tmp_path / "x.mp4"
    run = video._run_ffmpeg

    def another_run_finishes_first(*args):
        run(*args)
        target.write_bytes(b"the other run's video")

    monkeypatch.setattr(video, "_run_ffmpeg", another_run_finishes_first)
    with pytest.raises(VideoEncodeError, match="made by something else while this video was encoded: it is kept"):
        encode_mp4(gradient_frames(), target, fps=12, overwrite=False)
    assert target.read_bytes() == b"the other run's video" and [p.name for p in tmp_path.iterdir()] == ["x.mp4"]
    encode_mp4(gradient_frames(), target, fps=12)  # overwrite, the library's default: replaced
    assert len(probe(target).frames) == 9
