"""Single-file Wan transformers, as ComfyUI and Kijai's WanVideo_comfy publish them, fp8 ones included.

The file holds one transformer under the original Wan names (`blocks.0.self_attn.q.weight`,
with or without ComfyUI's `model.diffusion_model.` prefix); diffusers' own converter names
them. Three weight conventions occur, all read as W = stored * scale:
- full precision (bf16, fp16, fp32): no scale;
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
merge is quantize(dequantize(W0) + sum(s_i dW_i)). A block linear the author left in bf16
stays bf16 (unless `quantize="fp8"` asks otherwise). Everything else is dequantized to the
model's dtype. The layout was checked against ComfyUI's loader (comfy/ops.py, comfy/quant_ops.py);
the published files themselves cannot be downloaded where this was written.

Nothing in the file is taken on its word (`check_numbers`): a scaled file whose fp8 weight
has no scale (ComfyUI would run that layer at scale 1, thousands of times too large), a marker
with no scales, a scale that is not a finite number above 0 or does not fit its weight, an fp8
NaN code, a weight held as integers, a quantization format wanlora does not read: each is
refused, naming the tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..errors import InvalidInput, LoraError, LoraNotFound, ModelNotFound
from ..hub import download_file
from ..messages import listing
from ..models import ModelSpec, families_of_width
from ..pairs import EVERY_EXPERT, choose_files
from .checkpoint import Checkpoint, CheckpointFile, TensorRef
from .fp8 import BLOCK_PREFIX, FP8_DTYPES, Fp8Linear

logger = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's older and newer name for a weight's scale
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
MARKER = "scaled_fp8"  # ComfyUI's marker of a scaled-fp8 file: an empty tensor
IGNORED_KEYS = {MARKER}
READ_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # comfy_quant's, read here
FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16, *FP8_DTYPES)


def diffusers_names(file: CheckpointFile) -> tuple[dict[str, str], dict[str, str]]:
    """({diffusers parameter name: key in the file}, {weight key: its scale's key})."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = [key for key in file.header if key != "__metadata__" and key.removeprefix(COMFY_PREFIX) not in IGNORED_KEYS]
    scales = {}
    placeholders = {}
    for key in keys:
        if key.endswith(IGNORED_SUFFIXES):
            continue
        scale_of = next((key.removesuffix(s) + ".weight" for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if scale_of is not None:
            scales[scale_of] = key
            continue
        placeholders[key] = torch.empty(0, device="meta")  # the converter renames; it reads no values
    original = {id(value): key for key, value in placeholders.items()}
    converted = convert_wan_transformer_to_diffusers(
        {key.removeprefix(COMFY_PREFIX): value for key, value in placeholders.items()}
    )
    return {name: original[id(value)] for name, value in converted.items() if id(value) in original}, scales


def load_transformer_file(
    path: Path, spec: ModelSpec, dtype: torch.dtype, matmul: str
) -> tuple[WanTransformer3DModel, Checkpoint, bool]:
    """The transformer in `path` for `spec`, its checkpoint (W0 for merges), and whether it kept fp8 layers."""
    try:
        file = CheckpointFile(path)
    except OSError as exc:
        raise ModelNotFound(f"cannot read the transformer file {path}: {exc.strerror or exc}") from None
    except LoraError as exc:  # not a safetensors file, or a dtype no reader knows
        raise InvalidInput("transformer", str(path), f"a .safetensors transformer file ({exc})") from None
    names, scale_keys = diffusers_names(file)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters come from the file; buffers (rotary tables) built
        model = WanTransformer3DModel(**spec.arch.transformer_config())
    _check_fits(path, file, names, model, spec)
    check_numbers(path, file, names, scale_keys)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    refs: dict[str, TensorRef] = {}
    state: dict[str, torch.Tensor] = {}
    fp8_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, key in names.items():
        stored = file.read(key)  # memory of its own: a file cut short later cannot take the weights with it
        if stored.dtype in FP8_DTYPES and _has_fp8_nan(stored):  # checked here, as read: 14 GB are not read twice
            raise InvalidInput(
                "transformer", str(path), f"a file whose numbers load right; here {key} holds fp8 NaN codes"
            )
        scale = _scale(file, scale_keys.get(key), stored)
        if _fp8_block_weight(name, stored):
            rows = scale if scale is not None else torch.ones(stored.shape[0])  # plain fp8: a cast, scale 1
            fp8_weights[name] = (stored, rows)
            refs[name] = TensorRef(file, key, rows.clone())  # the layer's own scales change with each merge
            continue
        wanted = torch.float32 if keep_fp32 & set(name.split(".")) else dtype
        value = stored.float() * scale.view(-1, *[1] * (stored.dim() - 1)) if scale is not None else stored
        state[name] = value.to(wanted)
        if scale is None:
            refs[name] = TensorRef(file, key)
    for name, (weight, scale) in fp8_weights.items():
        module_name = name.removesuffix(".weight")
        bias = state.pop(f"{module_name}.bias", None)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, Fp8Linear(weight, scale, bias, matmul))
    model.load_state_dict(state, strict=False, assign=True)
    kept = len(fp8_weights)
    linears = sum(
        isinstance(module, torch.nn.Linear) for name, module in model.named_modules() if name.startswith(BLOCK_PREFIX)
    )
    logger.info("loaded %s's transformer from %s: %s", spec.name, path.name, _describe(fp8_weights, linears + kept))
    return model.eval(), Checkpoint(refs, dtype), kept > 0


def _fp8_block_weight(name: str, stored: torch.Tensor) -> bool:
    return (
        name.startswith(BLOCK_PREFIX) and name.endswith(".weight") and stored.dtype in FP8_DTYPES and stored.dim() == 2
    )


def _describe(fp8_weights: dict[str, tuple[torch.Tensor, torch.Tensor]], linears: int) -> str:
    """What the file's block linears were kept as, for the log: each in its own dtype, nothing widened."""
    by_dtype: dict[str, int] = {}
    for weight, _ in fp8_weights.values():
        kind = str(weight.dtype).removeprefix("torch.")
        by_dtype[kind] = by_dtype.get(kind, 0) + 1
    if not by_dtype:
        return "full precision"
    kept = ", ".join(f"{count} block linears in {kind}" for kind, count in sorted(by_dtype.items()))
    if "float8_e5m2" in by_dtype:
        kept += " (at 1 byte a weight, as stored; scaled fp8 matmuls take e4m3fn, so these compute weight-only)"
    rest = linears - len(fp8_weights)
    return kept + (f", {rest} left in full precision as the file has them" if rest else "")


def _scale(file: CheckpointFile, key: str | None, stored: torch.Tensor) -> torch.Tensor | None:
    """A weight's scale per output row (fp32), or None: a file's per-tensor scale is the same for every row."""
    if key is None:
        return None
    scale = file.read(key).float().flatten()
    rows = stored.shape[0] if stored.dim() else 1
    return scale.expand(rows).clone() if scale.numel() == 1 else scale


def check_numbers(path: Path, file: CheckpointFile, names: dict[str, str], scale_keys: dict[str, str]) -> None:
    """Refuse a file whose numbers would load wrong, naming the tensor: see the module's docstring. (fp8 NaN
    codes are looked for as the weights are read.)"""
    problems: list[str] = []
    keys = [key for key in file.header if key != "__metadata__"]
    marker = next((key for key in keys if key.removeprefix(COMFY_PREFIX) == MARKER), None)
    formats = _comfy_formats(file, keys, problems)
    if marker is not None and not scale_keys:
        problems.append(f"it is marked {marker} (weights stored divided by a scale) but holds no scale_weight")
    scaled_file = marker is not None or bool(scale_keys)
    for key in names.values():
        dtype = file.dtype(key)
        module = key.removesuffix(".weight")
        if dtype not in FLOATS:
            problems.append(f"{key} holds {file.header[key]['dtype']} values, where a weight holds floating point")
        elif dtype in FP8_DTYPES:
            if key not in scale_keys and (scaled_file or module in formats):
                problems.append(f"{key} is {dtype} with no scale beside it, in a scaled fp8 file")
            wanted = formats.get(module)
            if wanted is not None and wanted != dtype:
                problems.append(f"{key} is {dtype}, but its comfy_quant entry says {wanted}")
    for weight_key, scale_key in scale_keys.items():
        problems += _scale_problems(file, weight_key, scale_key)
    if problems:
        raise InvalidInput("transformer", str(path), listing("a file whose numbers load right; here", problems))


def _comfy_formats(file: CheckpointFile, keys: list[str], problems: list[str]) -> dict[str, torch.dtype]:
    """{module key: the fp8 dtype its comfy_quant entry names}; other formats are problems."""
    formats = {}
    for key in keys:
        if not key.endswith(".comfy_quant"):
            continue
        try:
            config = json.loads(bytes(file.read(key).view(torch.uint8).tolist()).decode())
            name = config["format"] if isinstance(config, dict) else None
        except (ValueError, KeyError, UnicodeDecodeError):
            problems.append(f"{key} is not ComfyUI's JSON quantization entry")
            continue
        if name not in READ_FORMATS:
            problems.append(f"{key} names the {str(name)[:40]!r} quantization, which wanlora does not read (fp8 only)")
            continue
        formats[key.removesuffix(".comfy_quant")] = READ_FORMATS[name]
    return formats


def _scale_problems(file: CheckpointFile, weight_key: str, scale_key: str) -> list[str]:
    if weight_key not in file.header:
        return [f"{scale_key} scales no weight of the file"]
    if file.dtype(scale_key) not in FLOATS[:4]:
        return [f"{scale_key} is {file.header[scale_key]['dtype']}, not a floating-point scale"]
    scale = file.read(scale_key).float().flatten()
    shape = file.shape(weight_key)
    rows = shape[0] if shape else 1
    if scale.numel() not in (1, rows):
        return [f"{scale_key} has {scale.numel()} values, for a weight of {rows} rows (one, or one per row)"]
    bad = [
        what
        for what, found in (
            ("NaN", scale.isnan()),
            ("infinite", scale.isinf()),
            ("zero", scale == 0),
            ("negative", scale < 0),
        )
        if bool(found.any())
    ]
    return [f"{scale_key} is {' and '.join(bad)} (a scale is a finite number above 0)"] if bad else []


def _has_fp8_nan(values: torch.Tensor) -> bool:
    """Whether fp8 bytes hold a NaN code (e4m3fn: S.1111.111; e5m2: an all-ones exponent, NaN or infinity)."""
    codes = values.view(torch.uint8)
    if values.dtype == torch.float8_e4m3fn:
        return bool((codes.bitwise_and(0x7F) == 0x7F).any())
    return bool((codes.bitwise_and(0x7C) == 0x7C).any())


def _check_fits(
    path: Path, file: CheckpointFile, names: dict[str, str], model: torch.nn.Module, spec: ModelSpec
) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(names))
    extra = sorted(set(names) - set(params))
    shapes = [
        f"{name} {tuple(file.header[key]['shape'])} vs {tuple(params[name].shape)}"
        for name, key in names.items()
        if name in params and tuple(file.header[key]["shape"]) != tuple(params[name].shape)
    ]
    if not (missing or extra or shapes):
        return
    width = file.header.get(names.get("blocks.0.attn1.to_q.weight", ""), {}).get("shape", [None])[0]
    families = families_of_width(width, image_branch=False) if width else []
    looks = f"; by its width ({width}) it is {' or '.join(families)}" if families else ""
    problems = shapes or [f"missing {name}" for name in missing] + [f"unexpected {name}" for name in extra]
    raise InvalidInput(
        "transformer", str(path), listing(f"a {spec.name} transformer file{looks}, or another --model", problems)
    )


TRANSFORMER_FORMS = (
    "a .safetensors transformer file, a folder holding one (or a Wan2.2 high/low pair), "
    "or OWNER/REPO/FILE.safetensors on the Hub"
)


def transformer_files(given: str | Path | Sequence[str | Path], spec: ModelSpec) -> dict[str, Path]:
    """The file for each of `spec`'s transformers: {expert name: path}."""
    if isinstance(given, (list, tuple)):
        paths = [_locate(str(item)) for item in given]
        if len(paths) != len(spec.experts):
            raise InvalidInput("transformer", [str(p) for p in paths], f"{len(spec.experts)} file(s) for {spec.name}")
        return dict(zip(spec.experts, paths, strict=True))
    path = _locate(str(given))
    if not path.is_dir():
        roles = [(EVERY_EXPERT, path)]
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
        try:
            roles = [(role, path / name) for role, name in choose_files(names, str(path), str(path))]
        except LoraNotFound as exc:
            raise InvalidInput("transformer", str(path), TRANSFORMER_FORMS + f" ({exc})") from None
    if [role for role, _ in roles] == [EVERY_EXPERT] and len(spec.experts) == 1:
        return {spec.experts[0]: roles[0][1]}
    if len(spec.experts) == 2 and {role for role, _ in roles} == set(spec.experts):
        return {role: file for role, file in roles}
    need = "one file" if len(spec.experts) == 1 else "the high-noise and the low-noise expert's files (a pair)"
    raise InvalidInput("transformer", str(given), f"{need} for {spec.name}")


def _locate(given: str) -> Path:
    path = Path(given).expanduser()
    if path.exists():
        return path
    parts = given.split("/")
    if len(parts) >= 3 and given.endswith(".safetensors") and not given.startswith((".", "/", "~")):
        return download_file("/".join(parts[:2]), "/".join(parts[2:]))
    raise InvalidInput("transformer", given, TRANSFORMER_FORMS)
