"""Frames to H.264 MP4 through imageio-ffmpeg, with the generation recorded in the container tags."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

from .errors import VideoEncodeError

logger = logging.getLogger(__name__)

DEFAULT_CRF = 18
MAX_SIDE = 4096  # H.264 level 5.2 tops out near 4096x2304


@dataclass
class Video:
    """Decoded frames (uint8, F x H x W x 3) and what made them."""

    frames: np.ndarray
    fps: int
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # not saved: outputs stay reproducible

    def save(self, path: str | os.PathLike, crf: int = DEFAULT_CRF) -> Path:
        """Write an MP4 to `path` and return it; see `encode_mp4`."""
        return encode_mp4(self.frames, path, fps=self.fps, metadata=self.metadata, crf=crf)


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


def encode_mp4(
    frames: np.ndarray,
    path: str | os.PathLike,
    *,
    fps: int,
    metadata: dict[str, Any] | None = None,
    crf: int = DEFAULT_CRF,
) -> Path:
    """Encode H.264 (yuv420p, `+faststart`) at exactly `fps`, one output frame per input frame.

    `metadata` goes into the container: the prompt as `title`, everything as JSON in
    `comment`, both shown by `ffmpeg -i`. The file appears only once it is complete.
    """
    check_encodable(frames)
    if not 0 <= crf <= 51:
        raise VideoEncodeError(f"crf={crf} is outside H.264's range 0 (lossless) to 51 (worst)")
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise VideoEncodeError(f"{path} must end in .mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = metadata or {}
    height, width = frames.shape[1:3]
    tags = ["-metadata", f"comment={json.dumps(metadata, sort_keys=True)}"]
    if "prompt" in metadata:
        tags += ["-metadata", f"title={metadata['prompt']}"]
    params = ["-crf", str(crf), "-preset", "medium", "-movflags", "+faststart", *tags]

    fd, tmp = tempfile.mkstemp(suffix=".mp4", dir=path.parent, prefix=f".{path.stem}.")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,  # the CRF in output_params decides quality
            macro_block_size=1,
            output_params=params,
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        raise VideoEncodeError(f"ffmpeg could not write {path}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("wrote %s (%d frames, %dx%d, %d fps)", path, len(frames), width, height, fps)
    return path
