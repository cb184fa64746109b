"""Every limit, choice list and environment variable of wanlora, defined once.

Pure Python, imported by the CLI before anything heavy. The front ends derive their
choices and ranges from here; predict.py keeps literal copies for Cog's static schema,
and a test holds them equal.

Environment variables have one policy: unset or empty means the default, and a value
that cannot be used is an `InvalidInput` that names the variable, never a traceback or a
silent fallback.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InvalidInput

# ---------------------------------------------------------------------------- generation limits

MIN_SIDE, MAX_SIDE = 16, 1920  # pixels; each model sets the multiple (16, or 32 on Wan2.2 TI2V-5B)
MIN_FRAMES = 5  # the most frames is the model's own (81 for Wan2.1)
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MIN_SHIFT, MAX_SHIFT = 0.1, 20.0
MAX_FPS = 60
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 1_000_000  # the text encoder reads 512 tokens; this only bounds the work

# ---------------------------------------------------------------------------- choices

RESOLUTIONS = ("480p", "720p")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
DEFAULT_MODEL = "t2v-14b"  # the CLI's --model, and a batch line's model, when none is given
FAST_MODES = ("off", "balanced", "fast")
OFFLOAD_MODES = ("auto", "none", "encoder", "experts", "model", "group")
RESIZE_MODES = ("fit", "pad", "stretch")

# ---------------------------------------------------------------------------- output and LoRAs

QUALITY_RANGE = (0, 100)  # higher is better; see wanlora.video.quality_to_crf
DEFAULT_QUALITY = 80
LORA_SCALE_RANGE = (-1.0, 3.0)  # the predictor's bound (Replicate's inputs)
# The library's and the CLI's bound: wide enough for any LoRA in use (a step-distillation LoRA at 3,
# a style pushed to 5, negated), narrow enough that a typo (:99, :1e30) is refused before it saturates
# every frame to black.
LORA_STRENGTH_RANGE = (-10.0, 10.0)
MAX_REF_CHARS = 4096  # a LoRA reference longer than this is not a reference

# ---------------------------------------------------------------------------- the environment

CIVITAI_URL = "https://civitai.com"
REPLICATE_URL = "https://replicate.com"
DEFAULT_CACHE_MAX_GB = 50.0
DEFAULT_MAX_LORA_GB = 4.0
DEFAULT_DOWNLOAD_TIMEOUT_S = 1800.0


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def _number(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise InvalidInput(name, raw, f"a finite number, {minimum:g} or more (unset: {default:g})")
    return value


def _flag(name: str) -> bool:
    raw = _raw(name)
    if raw is None or raw == "0":
        return False
    if raw == "1":
        return True
    raise InvalidInput(name, raw, "1 to enable, 0 or unset to disable")


def cache_dir() -> Path:
    """WANLORA_CACHE: the LoRA download cache; default the user cache folder (XDG_CACHE_HOME)."""
    configured = _raw("WANLORA_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(_raw("XDG_CACHE_HOME") or Path.home() / ".cache") / "wanlora"


def cache_max_bytes() -> int:
    """WANLORA_CACHE_MAX_GB: the cache is trimmed, least recently used first, to this size."""
    return int(_number("WANLORA_CACHE_MAX_GB", DEFAULT_CACHE_MAX_GB) * 2**30)


def max_lora_bytes() -> int:
    """WANLORA_MAX_LORA_GB: the largest LoRA file wanlora downloads or unpacks."""
    return int(_number("WANLORA_MAX_LORA_GB", DEFAULT_MAX_LORA_GB) * 2**30)


def download_timeout() -> float:
    """WANLORA_DOWNLOAD_TIMEOUT: seconds one LoRA or image-link download may take in all, retries included."""
    return _number("WANLORA_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT_S, minimum=1.0)


def private_urls_allowed() -> bool:
    """WANLORA_ALLOW_PRIVATE_URLS=1: plain http and loopback/private addresses, for tests only."""
    return _flag("WANLORA_ALLOW_PRIVATE_URLS")


def civitai_url() -> str:
    """WANLORA_CIVITAI_URL: where Civitai's API lives (a stand-in in tests)."""
    return (_raw("WANLORA_CIVITAI_URL") or CIVITAI_URL).rstrip("/")


def replicate_url() -> str:
    """WANLORA_REPLICATE_URL: where Replicate's model pages live (a stand-in in tests)."""
    return (_raw("WANLORA_REPLICATE_URL") or REPLICATE_URL).rstrip("/")


def clean_token(field: str, value: object) -> str | None:
    """A token as pasted, without surrounding whitespace; refused, never shown, if anything else is off."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, type(value).__name__, "a token (text), or empty")
    token = value.strip()
    if any(not (char.isascii() and char.isprintable()) or char.isspace() for char in token):
        hidden = f"(a token of {len(token)} characters, not shown)"
        raise InvalidInput(field, hidden, "a token without spaces, line breaks or other control characters inside")
    return token or None


def civitai_token() -> str | None:
    """CIVITAI_API_TOKEN: the operator's Civitai token, used when a request brings none."""
    return clean_token("CIVITAI_API_TOKEN", _raw("CIVITAI_API_TOKEN"))


def model_override(image: bool) -> str | None:
    """The predictor's base model (e.g. a folder) for requests without an image (WANLORA_MODEL) or with one
    (WANLORA_I2V_MODEL). It follows the request, not the task: model=2.2-5b runs TI2V-5B either way."""
    return _raw("WANLORA_I2V_MODEL" if image else "WANLORA_MODEL")


def quantize_mode(choices: Sequence[str]) -> str | None:
    """WANLORA_QUANTIZE: the predictor's weight format, one of `choices` (wanlora.weights.formats' quantize
    choices, "none" among them), or None for "none" or unset."""
    raw = _raw("WANLORA_QUANTIZE")
    if raw is None or raw == "none":
        return None
    if raw not in choices:
        raise InvalidInput("WANLORA_QUANTIZE", raw, f"{', '.join(c for c in choices if c != 'none')} or none")
    return raw


TransformerPath = str | tuple[str, str]  # a file or folder, or a Wan2.2 A14B (high, low) pair of files
TRANSFORMER_FORM = "VARIANT=PATH items separated by ; (e.g. t2v-14b=/src/weights/wan2.1-t2v-14b-Q4_K_M.gguf)"


def transformer_overrides(variants: Mapping[str, int], suffixes: Sequence[str]) -> dict[str, TransformerPath]:
    """WANLORA_TRANSFORMER: the predictor's transformer file for some variants, {variant: path}.

    `VARIANT=PATH` items separated by `;`: VARIANT one of `variants` (catalogue name -> how many transformers
    it has), PATH a file ending in one of `suffixes`, a folder holding one (or a Wan2.2 pair), or for a
    two-transformer variant `HIGH,LOW`, two files. Each path must exist now: a server refuses to start
    rather than fail its first request for that variant. Unset: none.
    """
    raw = _raw("WANLORA_TRANSFORMER")
    overrides: dict[str, TransformerPath] = {}
    for item in (part.strip() for part in (raw or "").split(";")):
        if not item:
            continue  # a trailing `;`
        variant, equals, given = (text.strip() for text in item.partition("="))
        if not equals or not variant or not given:
            raise InvalidInput("WANLORA_TRANSFORMER", item, TRANSFORMER_FORM)
        if variant not in variants:
            raise InvalidInput("WANLORA_TRANSFORMER", item, f"a variant before the =: {', '.join(variants)}")
        if variant in overrides:
            raise InvalidInput("WANLORA_TRANSFORMER", item, f"one item per variant: {variant} has two")
        paths = [path.strip() for path in given.split(",")]
        if len(paths) > variants[variant] or not all(paths):
            why = "a file or folder" if variants[variant] == 1 else "a file or folder, or HIGH,LOW: two files"
            raise InvalidInput("WANLORA_TRANSFORMER", item, f"{why} after {variant}=")
        for path in paths:
            _check_transformer_path(item, Path(path).expanduser(), suffixes, pair=len(paths) > 1)
        overrides[variant] = paths[0] if len(paths) == 1 else (paths[0], paths[1])
    return overrides


def _check_transformer_path(item: str, path: Path, suffixes: Sequence[str], pair: bool) -> None:
    files = f"a {' or '.join(suffixes)} file"
    if not path.exists():
        raise InvalidInput("WANLORA_TRANSFORMER", item, f"an existing file or folder: {path} is missing")
    if path.is_dir() and not pair:
        return
    if not path.is_file() or path.suffix.lower() not in suffixes:
        raise InvalidInput("WANLORA_TRANSFORMER", item, f"{files}{'' if pair else ' or a folder'}: {path} is not one")


def weights_dir() -> Path | None:
    """WANLORA_WEIGHTS: a folder of pre-fetched Hub repos (`OWNER/NAME/...`), such as Cog's managed weights."""
    configured = _raw("WANLORA_WEIGHTS")
    return Path(configured).expanduser() if configured else None


def gpu_workers() -> int | None:
    """WANLORA_GPUS: how many GPU workers the predictor starts; unset: one per visible GPU."""
    raw = _raw("WANLORA_GPUS")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise InvalidInput("WANLORA_GPUS", raw, "a whole number, 1 or more")
    return int(raw)
