"""Frames to H.264 MP4 with ffmpeg (the binary imageio-ffmpeg ships), the generation recorded in its tags.

ffmpeg is run here rather than through `imageio_ffmpeg.write_frames`, which ignores
ffmpeg's exit status (a full disk would pass for success) and has no room for a second
input. The tags come from an FFMETADATA file, not the command line, so a prompt of any
length or content cannot break the encode, and the MP4 appears under its name only once
ffmpeg has finished it without error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidInput, VideoEncodeError
from .settings import DEFAULT_QUALITY, QUALITY_RANGE
from .staging import scratch_beside, staging_prefix

logger = logging.getLogger(__name__)

MAX_SIDE = 4096  # H.264 level 5.2 tops out near 4096x2304
MAX_TITLE_CHARS = 1000


@dataclass
class Video:
    """Decoded frames (uint8, F x H x W x 3) and what made them.

    Attributes:
        frames: the frames, uint8, frames x height x width x 3 (RGB).
        fps: frames per second.
        seed: the seed that made them (the one picked, when none was asked for).
        metadata: the prompt, model, LoRAs with their strengths and every setting; `save` writes it
            into the MP4's tags.
        timings: seconds per stage (LoRA merge, denoising, ...); not saved, so outputs stay reproducible.
    """

    frames: np.ndarray
    fps: int
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # not saved: outputs stay reproducible

    def save(self, path: str | os.PathLike, quality: int = DEFAULT_QUALITY, overwrite: bool = True) -> Path:
        """Write an MP4 to `path` and return it; `quality` is 0 to 100, higher is better (80: CRF 18).
        `overwrite=False` keeps a file already at `path` (one that appears while encoding too): VideoEncodeError."""
        crf = quality_to_crf(quality)
        return encode_mp4(self.frames, path, fps=self.fps, metadata=self.metadata, crf=crf, overwrite=overwrite)


def quality_to_crf(quality: int, field: str = "quality") -> int:
    """Quality 0-100 (higher is better) to H.264 CRF 51-10; 80 gives CRF 18, near-lossless to the eye."""
    low, high = QUALITY_RANGE
    if isinstance(quality, bool) or not isinstance(quality, int) or not low <= quality <= high:
        raise InvalidInput(field, quality, f"a whole number between {low} (smallest file) and {high} (best)")
    return round(51 - 0.41 * quality)


def check_encodable(frames: np.ndarray) -> None:
    """Refuse frames that libx264 with yuv420p cannot take, before ffmpeg starts."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoEncodeError(f"frames must be uint8 F x H x W x 3, got {frames.dtype} {tuple(frames.shape)}")
    count, height, width, _ = frames.shape
    if count == 0:
        raise VideoEncodeError("there are no frames to encode")
    if width % 2 or height % 2:
        raise VideoEncodeError(f"{width}x{height} cannot be encoded as yuv420p H.264: both sides must be even")
    if not (2 <= width <= MAX_SIDE and 2 <= height <= MAX_SIDE):
        raise VideoEncodeError(f"{width}x{height} is outside what H.264 can take (2 to {MAX_SIDE} pixels a side)")


def check_output(path: str | os.PathLike, field: str = "path") -> Path:
    """Refuse an output path that cannot be written, before any work: a wrong suffix, a missing or read-only folder,
    no ffmpeg."""
    path = Path(path)
    where = f"{field}={str(path)!r}"
    if path.suffix.lower() != ".mp4":
        raise VideoEncodeError(f"{where}: the output must end in .mp4")
    folder = path.parent
    if not folder.is_dir():
        raise VideoEncodeError(f"{where}: the folder {folder} does not exist")
    if path.is_dir():
        raise VideoEncodeError(f"{where}: it is a folder")
    ffmpeg_exe()  # here too: found missing before the work, not after it
    try:  # named as staging is, so that one a killed process left is removed with the rest
        with tempfile.NamedTemporaryFile(dir=folder, prefix=staging_prefix(path), suffix=".check"):
            pass
    except OSError as exc:
        raise VideoEncodeError(f"{where}: cannot write there ({exc.strerror or exc})") from exc
    return path


def ffmetadata(metadata: dict[str, Any]) -> str:
    """An FFMETADATA file: the prompt as `title`, everything as JSON in `comment`."""
    lines = [";FFMETADATA1", f"comment={_escape(json.dumps(metadata, sort_keys=True))}"]
    prompt = metadata.get("prompt")
    if isinstance(prompt, str):
        title = prompt if len(prompt) <= MAX_TITLE_CHARS else prompt[:MAX_TITLE_CHARS] + "..."
        lines.append(f"title={_escape(title)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """FFMETADATA escapes `=`, `;`, `#`, `\\` and newlines; control characters are dropped."""
    value = re.sub(r"[\x00-\x09\x0b-\x1f\x7f]", "", value)
    return re.sub(r"([=;#\\\n])", r"\\\1", value)


def encode_mp4(
    frames: np.ndarray,
    path: str | os.PathLike,
    *,
    fps: int,
    metadata: dict[str, Any] | None = None,
    crf: int = 18,
    overwrite: bool = True,
) -> Path:
    """Encode H.264 (yuv420p, `+faststart`) at exactly `fps`, one output frame per input frame.

    `metadata` goes into the container: the prompt as `title`, everything as JSON in
    `comment`, both shown by `ffmpeg -i`. The file appears only once it is complete, and
    nothing else stays beside it: a staging folder a killed encode left is removed by the next.
    """
    check_encodable(frames)
    if not 0 <= crf <= 51:
        raise VideoEncodeError(f"crf={crf} is outside H.264's range 0 (lossless) to 51 (worst)")
    path = check_output(path)
    height, width = frames.shape[1:3]
    try:  # the tags and the partial MP4 beside it, removed however the encode ends (SIGTERM included)
        with scratch_beside(path) as work:
            tags = Path(work) / "tags.txt"
            tags.write_text(ffmetadata(metadata or {}), encoding="utf-8")
            partial = Path(work) / "video.mp4"
            _run_ffmpeg(_command(frames, fps, crf, tags, partial), frames, partial, path)
            if overwrite:
                os.replace(partial, path)
            else:
                _place_new(partial, path)
    except OSError as exc:
        raise VideoEncodeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    logger.info("wrote %s (%d frames, %dx%d, %d fps)", path, len(frames), width, height, fps)
    return path


def ffmpeg_exe() -> str:
    """The ffmpeg to run: IMAGEIO_FFMPEG_EXE's (checked: imageio-ffmpeg takes it on its word), or imageio-ffmpeg's."""
    try:  # imported here: generating needs no ffmpeg (the GPU image lacks imageio-ffmpeg), saving does
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise VideoEncodeError(
            "saving an MP4 needs ffmpeg: pip install imageio-ffmpeg, or set IMAGEIO_FFMPEG_EXE to an ffmpeg program"
        ) from None
    found = shutil.which(exe)
    if found is None:
        raise VideoEncodeError(
            f"IMAGEIO_FFMPEG_EXE={exe!r} is not a program: set it to an ffmpeg program, or unset it to use "
            "imageio-ffmpeg's"
        )
    return found


def _place_new(partial: Path, path: Path) -> None:
    """`partial` at `path` only where no file is: a hard link fails on one there, where a rename would replace it."""
    try:
        os.link(partial, path)
        return
    except FileExistsError:
        taken = True
    except OSError:  # a file system without hard links: looked at, then renamed
        taken = path.exists() or path.is_symlink()
        if not taken:
            os.replace(partial, path)
    if taken:
        raise VideoEncodeError(f"{path} was made by something else while this video was encoded: it is kept")


def _command(frames: np.ndarray, fps: int, crf: int, tags: Path, partial: Path) -> list[str]:
    height, width = frames.shape[1:3]
    return [
        ffmpeg_exe(), "-nostdin", "-y", "-v", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        "-f", "ffmetadata", "-i", str(tags),
        "-map", "0:v", "-map_metadata", "1",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", "medium",
        "-movflags", "+faststart", str(partial),
    ]  # fmt: skip


def _run_ffmpeg(command: list[str], frames: np.ndarray, partial: Path, path: Path) -> None:
    """Feed the frames to ffmpeg; its failure (a full disk, a killed process) is ours to report."""
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
        except OSError as exc:  # a file that is no program after all
            raise VideoEncodeError(f"cannot run ffmpeg ({command[0]}): {exc.strerror or exc}") from None
        try:
            _feed(process, frames)
            code = process.wait()
        except BaseException:  # Ctrl-C, SIGTERM (staging's SystemExit), even while ffmpeg finishes: it goes too
            process.kill()
            process.wait()
            raise
        if code < 0:  # a file size limit, an out-of-memory kill
            raise VideoEncodeError(f"ffmpeg could not write {path}: it was stopped by {signal.Signals(-code).name}")
        if code != 0:
            errors.seek(0)
            said = [line for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
            reason = said[-1].strip().replace(str(partial), str(path)) if said else f"exit status {code}"
            raise VideoEncodeError(f"ffmpeg could not write {path}: {reason}")


def _feed(process: subprocess.Popen, frames: np.ndarray) -> None:
    assert process.stdin is not None  # stdin=PIPE
    try:
        for frame in frames:
            process.stdin.write(np.ascontiguousarray(frame).tobytes())
        process.stdin.close()
    except BrokenPipeError:
        pass  # ffmpeg stopped early; its exit status and message tell why
