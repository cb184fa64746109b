"""Input images for image-to-video: reading, choosing the frame size, and resizing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInput
from .settings import ASPECT_RATIOS, RESIZE_MODES

MIN_IMAGE_SIDE = 32

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def load_image(image: ImageInput, field: str = "image") -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an H x W x 3 uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InvalidInput(field, str(image), "a path to an existing image file")
        try:
            with Image.open(path) as opened:
                opened.load()
                loaded = ImageOps.exif_transpose(opened)
        except (UnidentifiedImageError, OSError) as exc:
            raise InvalidInput(field, str(image), f"a readable image (PNG, JPEG, WebP...): {exc}") from exc
    elif isinstance(image, Image.Image):
        loaded = image
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise InvalidInput(field, f"array {image.dtype} {image.shape}", "a uint8 array of shape H x W x 3")
        loaded = Image.fromarray(image)
    else:
        raise InvalidInput(field, type(image).__name__, "a path, a PIL image or a uint8 H x W x 3 array")
    if min(loaded.size) < MIN_IMAGE_SIDE:
        raise InvalidInput(field, f"{loaded.size[0]}x{loaded.size[1]}", f"at least {MIN_IMAGE_SIDE} pixels a side")
    return loaded.convert("RGB")


def nearest_aspect_ratio(image: Image.Image, choices: tuple[str, ...] = ASPECT_RATIOS) -> str:
    """The aspect ratio among `choices` closest to the image's, compared on a log scale."""
    width, height = image.size
    ratios = {name: int(name.split(":")[0]) / int(name.split(":")[1]) for name in choices}
    return min(ratios, key=lambda name: abs(np.log(width / height) - np.log(ratios[name])))


def resize_image(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """Bring `image` to exactly `size` (width, height).

    fit: scale to cover, then center-crop the remainder (keeps the aspect).
    pad: scale to fit inside, then pad with black (keeps the aspect and the whole image).
    stretch: scale each side independently.
    """
    if mode not in RESIZE_MODES:
        raise InvalidInput("resize", mode, f"one of {', '.join(RESIZE_MODES)}")
    if mode == "stretch":
        return image.resize(size, Image.Resampling.LANCZOS)
    if mode == "fit":
        return ImageOps.fit(image, size, Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    return ImageOps.pad(image, size, Image.Resampling.LANCZOS, color=(0, 0, 0), centering=(0.5, 0.5))
