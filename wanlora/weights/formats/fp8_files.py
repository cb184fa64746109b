"""fp8 in single-file Wan transformers, as ComfyUI and Kijai's WanVideo_comfy publish them.

Two conventions occur beside full precision, both read as W = stored * scale:
- plain fp8 (`..._fp8_e4m3fn.safetensors`, Kijai's `..._fp8_e5m2.safetensors`): block linears
  cast to float8, scale 1;
- scaled fp8 (`..._fp8_scaled.safetensors`): an fp32 `scale_weight` beside each fp8 weight
  (ComfyUI's older layout, with a `scaled_fp8` marker), or `weight_scale` with a `comfy_quant`
  entry (its newer one); one scale per tensor, or one per row. Input scales (`scale_input`,
  `input_scale`) are calibration for static activation scaling; wanlora scales activations
  per token instead.

Block linears stored in float8 stay fp8 in their own dtype (e4m3fn, or e5m2 as Kijai's files:
a 14B stays 14 GB rather than 28.6 GB in bf16); a per-tensor scale becomes a per-row one, the
same for every row. The file is their pristine W0, read back from the checkpoint, so a LoRA
merge is quantize(dequantize(W0) + sum(s_i dW_i)). The layout was checked against ComfyUI's
loader (comfy/ops.py, comfy/quant_ops.py); the published files themselves cannot be downloaded
where this was written.

Refused, naming the tensor: a scaled file whose fp8 weight has no scale (ComfyUI would run that
layer at scale 1, thousands of times too large), a marker with no scales, a `comfy_quant` entry
naming another quantization or another dtype than its weight's, and fp8 NaN codes.
"""

from __future__ import annotations

import json

import torch

from .base import FileConventions

COMFY_PREFIX = "model.diffusion_model."
MARKER = "scaled_fp8"  # ComfyUI's marker of a scaled-fp8 file: an empty tensor
READ_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # comfy_quant's, read here
FILE_DTYPES = tuple(READ_FORMATS.values())
MAX_ENTRY_BYTES = 4096  # a comfy_quant entry is a JSON object of a few fields: {"format": "float8_e4m3fn"}


class Fp8Files(FileConventions):
    scale_suffixes = (".scale_weight", ".weight_scale")  # ComfyUI's older and newer name for a weight's scale
    ignored_suffixes = (".scale_input", ".input_scale", ".comfy_quant")
    ignored_keys = frozenset({MARKER})

    def problems(self, file, keys: list[str], names: dict[str, str], scale_keys: dict[str, str]) -> list[str]:
        problems: list[str] = []
        marker = next((key for key in keys if key.removeprefix(COMFY_PREFIX) == MARKER), None)
        formats = _comfy_formats(file, keys, problems)
        if marker is not None and not scale_keys:
            problems.append(f"it is marked {marker} (weights stored divided by a scale) but holds no scale_weight")
        scaled_file = marker is not None or bool(scale_keys)
        for key in names.values():
            dtype = file.dtype(key)
            if dtype not in FILE_DTYPES:
                continue
            module = key.removesuffix(".weight")
            if key not in scale_keys and (scaled_file or module in formats):
                problems.append(f"{key} is {dtype} with no scale beside it, in a scaled fp8 file")
            wanted = formats.get(module)
            if wanted is not None and wanted != dtype:
                problems.append(f"{key} is {dtype}, but its comfy_quant entry says {wanted}")
        return problems

    def bad_values(self, stored: torch.Tensor) -> str | None:
        """fp8 NaN codes (e4m3fn: S.1111.111; e5m2: an all-ones exponent, NaN or infinity)."""
        codes = stored.view(torch.uint8)
        mask, nan = (0x7F, 0x7F) if stored.dtype == torch.float8_e4m3fn else (0x7C, 0x7C)
        return "fp8 NaN codes" if bool((codes.bitwise_and(mask) == nan).any()) else None

    def note(self, dtype: torch.dtype) -> str:
        if dtype == torch.float8_e5m2:
            return " (at 1 byte a weight, as stored; scaled fp8 matmuls take e4m3fn, so these compute weight-only)"
        return ""


def _comfy_formats(file, keys: list[str], problems: list[str]) -> dict[str, torch.dtype]:
    """{module key: the fp8 dtype its comfy_quant entry names}; other formats are problems."""
    formats = {}
    for key in keys:
        if not key.endswith(".comfy_quant"):
            continue
        start, end = file.header[key]["data_offsets"]
        if end - start > MAX_ENTRY_BYTES:  # read before it is parsed, and a header may say gigabytes
            problems.append(f"{key} is {end - start} bytes, not ComfyUI's JSON quantization entry (a few dozen)")
            continue
        try:
            config = json.loads(file.read(key).view(torch.uint8).numpy().tobytes().decode())
            name = config["format"] if isinstance(config, dict) else None
        except (ValueError, KeyError, UnicodeDecodeError, RecursionError):
            problems.append(f"{key} is not ComfyUI's JSON quantization entry")
            continue
        if name not in READ_FORMATS:
            problems.append(f"{key} names the {str(name)[:40]!r} quantization, which wanlora does not read (fp8 only)")
            continue
        formats[key.removesuffix(".comfy_quant")] = READ_FORMATS[name]
    return formats


CONVENTIONS = Fp8Files()
