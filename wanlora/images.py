"""Input images for image-to-video: reading, choosing the frame size, and resizing."""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageOps

from .errors import InvalidInput
from .settings import RESIZE_MODES

MIN_IMAGE_SIDE = 32
MAX_IMAGE_BYTES = 64 << 20  # a linked image's most: a 64-megapixel PNG rarely needs more
MAX_IMAGE_PIXELS = 64_000_000  # 8000 x 8000; a frame is at most 1920 a side, and decoding costs memory
TOO_MANY_PIXELS = f"an image of at most {MAX_IMAGE_PIXELS // 10**6} megapixels; scale it down"

EXIF_ORIENTATION = 0x0112
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageHeader:
    """An image checked without being read: a file whose header declares a usable image, or a link
    checked by its form alone. A batch checks every line's images so, and reads each when its job
    runs: 300 lines with a 1080p image cost nothing up front, and a link that fails fails its job."""

    source: str  # the path or link, as given
    size: tuple[int, int] | None  # (width, height) once upright; None for a link, not fetched yet


ImageInput = str | os.PathLike | Image.Image | np.ndarray


def load_image(image: ImageInput | ImageHeader, field: str = "image") -> Image.Image:
    """An RGB PIL image from a path, an https:// link, a PIL image or an H x W x 3 uint8 array
    (or the file or link an `ImageHeader` names, read now)."""
    if isinstance(image, ImageHeader):
        image = image.source
    if isinstance(image, str) and image.lower().startswith(("https://", "http://")):
        loaded = _decoded(fetch_image(image, field), field, "(the image at the link)")
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InvalidInput(field, str(image), "a path to an existing image file, or an https:// link")
        loaded = _decoded(path, field, str(image))
    elif isinstance(image, Image.Image):
        loaded = image
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise InvalidInput(field, f"array {image.dtype} {image.shape}", "a uint8 array of shape H x W x 3")
        loaded = Image.fromarray(image)
    else:
        allowed = "a path, an https:// link, a PIL image or a uint8 H x W x 3 array"
        raise InvalidInput(field, type(image).__name__, allowed)
    _check_pixels(field, loaded.size)
    if min(loaded.size) < MIN_IMAGE_SIDE:
        raise InvalidInput(field, f"{loaded.size[0]}x{loaded.size[1]}", f"at least {MIN_IMAGE_SIDE} pixels a side")
    return loaded.convert("RGB")


def check_image(image: object, field: str = "image") -> ImageHeader:
    """A path or link checked as `load_image` would take it, without reading the pixels or fetching."""
    if isinstance(image, str) and image.lower().startswith(("https://", "http://")):
        check_link(image, field)
        return ImageHeader(image, None)
    if not isinstance(image, (str, os.PathLike)):
        allowed = "a path to an image file, or an https:// link"
        raise InvalidInput(field, type(image).__name__, allowed)
    path = Path(image).expanduser()
    if not path.is_file():
        raise InvalidInput(field, str(image), "a path to an existing image file, or an https:// link")
    try:
        with Image.open(path) as opened:  # reads the header: the format, the size, EXIF
            size = opened.size
            if _orientation(opened) in TURNED:
                size = (size[1], size[0])
    except Image.DecompressionBombError:
        raise InvalidInput(field, str(image), TOO_MANY_PIXELS) from None
    except Exception as exc:  # a decoder's complaint, whatever its type
        raise InvalidInput(field, str(image), f"a readable image (PNG, JPEG, WebP...): {exc}") from None
    _check_pixels(field, size)
    if min(size) < MIN_IMAGE_SIDE:
        raise InvalidInput(field, f"{size[0]}x{size[1]}", f"at least {MIN_IMAGE_SIDE} pixels a side")
    return ImageHeader(str(path), size)


def _orientation(opened: Image.Image) -> int | None:
    """The EXIF orientation an opened image declares in what was read of it (PNG's `getexif` would decode it)."""
    raw = opened.info.get("exif")
    if raw:
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(EXIF_ORIENTATION)
    return None if opened.format == "PNG" else opened.getexif().get(EXIF_ORIENTATION)


def check_link(url: str, field: str) -> None:
    """An image link's form, as the fetch will judge it: https (http only where private addresses are
    allowed, for tests) and a host. Its address is checked when it is fetched."""
    from .lora.refs import display_ref
    from .settings import private_urls_allowed

    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise InvalidInput(field, display_ref(url), "a valid link") from None
    if parts.scheme != "https" and not (parts.scheme == "http" and private_urls_allowed()):
        raise InvalidInput(field, display_ref(url), "an https:// link: only https:// links are allowed here")
    if not host:
        raise InvalidInput(field, display_ref(url), "a link with a host name")


def _decoded(source: Path | io.BytesIO, field: str, shown: str) -> Image.Image:
    """The image in a file or in fetched bytes, its size judged from the header before it is decoded."""
    try:
        with Image.open(source) as opened:
            _check_pixels(field, opened.size)  # from the header: a small file can declare gigapixels
            opened.load()
            return ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError:
        raise InvalidInput(field, shown, f"an image of at most {MAX_IMAGE_PIXELS // 10**6} megapixels") from None
    except InvalidInput:
        raise
    except Exception as exc:  # a decoder's complaint, whatever its type (PIL raises SyntaxError for a bad PNG)
        raise InvalidInput(field, shown, f"a readable image (PNG, JPEG, WebP...): {exc}") from None


def fetch_image(url: str, field: str = "image") -> io.BytesIO:
    """The bytes at an image link, fetched as LoRA links are: https only, every redirect's address
    checked, retried when that is worth it, at most MAX_IMAGE_BYTES, and within WANLORA_DOWNLOAD_TIMEOUT
    in all (a server that drips bytes, each within the read timeout, would hold the request for ever)."""
    from .lora.refs import display_ref
    from .net import http_session, in_background, open_url, with_retries

    label = f"{field} {display_ref(url)}"

    def attempt() -> io.BytesIO:
        with http_session() as session, open_url(session, url, {}, label) as response:
            body = io.BytesIO()
            for chunk in response.iter_content(1 << 20):
                body.write(chunk)
                if body.tell() > MAX_IMAGE_BYTES:
                    raise InvalidInput(field, display_ref(url), f"an image of at most {MAX_IMAGE_BYTES >> 20} MiB")
        body.seek(0)
        return body

    return in_background(lambda: with_retries(attempt, label, "the download", url), label)


def _check_pixels(field: str, size: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        shown = f"{size[0]}x{size[1]}"
        raise InvalidInput(field, shown, TOO_MANY_PIXELS)


def reference_frame_size(image_size: tuple[int, int], area: int, vae_scale: int, per_side: bool) -> tuple[int, int]:
    """(width, height) of the frame Wan's reference code gives an image: its aspect at about `area` pixels.

    `per_side` (Wan2.1 I2V and FLF2V, Wan2.2 I2V-A14B: image2video.py) sizes each side on its
    own, sqrt(area x aspect) floored to whole 2x2 patches of VAE cells. Otherwise (TI2V-5B:
    textimage2video.py's best_output_size) one side is floored to whole patches first and the
    other fills the area; of the two ways, width first or height first, the one whose aspect
    is nearer the image's wins, and height first on a tie. The arithmetic is done in the
    reference's order, so that ties and floors fall the same way.
    """
    width, height = image_size
    if per_side:
        aspect = height / width
        cells = (math.sqrt(area / aspect) // vae_scale // 2 * 2, math.sqrt(area * aspect) // vae_scale // 2 * 2)
        return int(cells[0]) * vae_scale, int(cells[1]) * vae_scale
    step = 2 * vae_scale
    ratio = width / height
    ideal_width = (area * ratio) ** 0.5
    ideal_height = area / ideal_width
    w1, h2 = int(ideal_width // step * step), int(ideal_height // step * step)
    h1 = int(area / w1 // step * step) if w1 else 0
    w2 = int(area / h2 // step * step) if h2 else 0
    if not (w1 and h1 and w2 and h2):  # an aspect too extreme for the area: no frame (the caller refuses it)
        return (w1, h1) if w1 and h1 else (w2, h2)
    width_first, height_first = w1 / h1, w2 / h2
    if max(ratio / width_first, width_first / ratio) < max(ratio / height_first, height_first / ratio):
        return w1, h1
    return w2, h2


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
