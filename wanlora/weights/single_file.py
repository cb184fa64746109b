"""Single-file Wan transformers, as ComfyUI and Kijai's WanVideo_comfy publish them.

The file holds one transformer under the original Wan names (`blocks.0.self_attn.q.weight`,
with or without ComfyUI's `model.diffusion_model.` prefix); diffusers' own converter names
them. Weights are full precision (bf16, fp16, fp32), or stored in a registered weight format
whose `FileConventions` say how such files hold it (wanlora.weights.formats: a scale per row or
per tensor beside a weight, read as W = stored * scale; markers and entries to skip).

Block linears stored in a format stay in it, in their own dtype; the file is their pristine W0,
read back from the checkpoint, so a LoRA merge is the format's rounding of decode(W0) +
sum(s_i dW_i). A block linear the author left in full precision stays so (unless `quantize`
asks otherwise). Everything else is decoded to the model's dtype.

Nothing in the file is taken on its word (`check_numbers`): a weight held as integers or in a
dtype no format stores, a scale that is not a finite number above 0 or does not fit its weight,
values the format cannot use (its `bad_values`), and whatever its conventions refuse: each is
refused, naming the tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from ..errors import InvalidInput, LoraError, LoraNotFound, ModelNotFound
from ..hub import download_file
from ..messages import listing
from ..models import ModelSpec, families_of_width
from ..pairs import EVERY_EXPERT, choose_files
from . import formats
from .checkpoint import Checkpoint, CheckpointFile, TensorRef
from .formats.base import BLOCK_PREFIX, FileConventions, WeightFormat
from .pristine import PristineSource

logger = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
SCALE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def conventions() -> list[FileConventions]:
    """The file conventions of every registered format that single files can hold."""
    return [fmt.files for fmt in formats.every() if fmt.files is not None]


def _suffixes(kind: str) -> tuple[str, ...]:
    return tuple(suffix for c in conventions() for suffix in getattr(c, kind))


def diffusers_names(file: CheckpointFile) -> tuple[dict[str, str], dict[str, str]]:
    """({diffusers parameter name: key in the file}, {weight key: its scale's key})."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ignored_keys = {key for c in conventions() for key in c.ignored_keys}
    ignored_suffixes, scale_suffixes = _suffixes("ignored_suffixes"), _suffixes("scale_suffixes")
    keys = [key for key in file.header if key != "__metadata__" and key.removeprefix(COMFY_PREFIX) not in ignored_keys]
    scales = {}
    placeholders = {}
    for key in keys:
        if key.endswith(ignored_suffixes):
            continue
        scale_of = next((key.removesuffix(s) + ".weight" for s in scale_suffixes if key.endswith(s)), None)
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
    path: Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device
) -> tuple[WanTransformer3DModel, PristineSource, set[str]]:
    """The transformer in `path` for `spec`, its checkpoint (W0 for merges), and the formats it kept block
    linears in (their matmuls chosen for `device`). A file of a format's own (`file_suffixes`) is that format's
    to read."""
    own = next((fmt for fmt in formats.every() if path.suffix.lower() in fmt.file_suffixes), None)
    if own is not None:
        return own.load_file(path, spec, dtype, device)
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
    kept: dict[str, tuple[WeightFormat, torch.Tensor, torch.Tensor]] = {}
    for name, key in names.items():
        stored = file.read(key)  # memory of its own: a file cut short later cannot take the weights with it
        fmt = formats.format_of_dtype(stored.dtype)
        assert fmt is not None, "check_numbers refuses dtypes no format stores"
        why = fmt.files.bad_values(stored) if fmt.files is not None else None  # here, as read: 14 GB are read once
        if why:
            raise InvalidInput("transformer", str(path), f"a file whose numbers load right; here {key} holds {why}")
        scale = _scale(file, scale_keys.get(key), stored)
        if fmt.files is not None and _block_weight(name, stored):
            rows = scale if scale is not None else torch.ones(stored.shape[0])  # no scale: a cast, scale 1
            kept[name] = (fmt, stored, rows)
            refs[name] = TensorRef(file, key, rows.clone())  # the layer's own scales change with each merge
            continue
        wanted = torch.float32 if keep_fp32 & set(name.split(".")) else dtype
        value = stored.float() * scale.view(-1, *[1] * (stored.dim() - 1)) if scale is not None else stored
        state[name] = value.to(wanted)
        if scale is None:
            refs[name] = TensorRef(file, key)
    matmuls = {fmt.name: fmt.choose_matmul("auto", device) for fmt, _, _ in kept.values()}
    for name, (fmt, weight, scale) in kept.items():
        module_name = name.removesuffix(".weight")
        bias = state.pop(f"{module_name}.bias", None)
        parent, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent), child, fmt.layer_from_file(weight, scale, bias, matmuls[fmt.name]))
    model.load_state_dict(state, strict=False, assign=True)
    linears = sum(
        isinstance(module, torch.nn.Linear) for name, module in model.named_modules() if name.startswith(BLOCK_PREFIX)
    )
    logger.info("loaded %s's transformer from %s: %s", spec.name, path.name, _describe(kept, linears + len(kept)))
    return model.eval(), Checkpoint(refs, dtype), {fmt.name for fmt, _, _ in kept.values()}


def _block_weight(name: str, stored: torch.Tensor) -> bool:
    return name.startswith(BLOCK_PREFIX) and name.endswith(".weight") and stored.dim() == 2


def _describe(kept: dict[str, tuple[WeightFormat, torch.Tensor, torch.Tensor]], linears: int) -> str:
    """What the file's block linears were kept as, for the log: each in its own dtype, nothing widened."""
    by_dtype: dict[torch.dtype, int] = {}
    notes: dict[torch.dtype, str] = {}
    for fmt, weight, _ in kept.values():
        by_dtype[weight.dtype] = by_dtype.get(weight.dtype, 0) + 1
        notes[weight.dtype] = fmt.files.note(weight.dtype) if fmt.files is not None else ""
    if not by_dtype:
        return "full precision"
    described = sorted((str(dtype).removeprefix("torch."), count, notes[dtype]) for dtype, count in by_dtype.items())
    text = ", ".join(f"{count} block linears in {kind}" for kind, count, _ in described)
    text += "".join(note for _, _, note in described)
    rest = linears - len(kept)
    return text + (f", {rest} left in full precision as the file has them" if rest else "")


def _scale(file: CheckpointFile, key: str | None, stored: torch.Tensor) -> torch.Tensor | None:
    """A weight's scale per output row (fp32), or None: a file's per-tensor scale is the same for every row."""
    if key is None:
        return None
    scale = file.read(key).float().flatten()
    rows = stored.shape[0] if stored.dim() else 1
    return scale.expand(rows).clone() if scale.numel() == 1 else scale


def check_numbers(path: Path, file: CheckpointFile, names: dict[str, str], scale_keys: dict[str, str]) -> None:
    """Refuse a file whose numbers would load wrong, naming the tensor: see the module's docstring. (Values a
    format cannot use are looked for as the weights are read.)"""
    problems: list[str] = []
    keys = [key for key in file.header if key != "__metadata__"]
    for convention in conventions():
        problems += convention.problems(file, keys, names, scale_keys)
    for key in names.values():
        dtype = file.dtype(key)
        fmt = None if dtype is None else formats.format_of_dtype(dtype)
        if fmt is None or (fmt is not formats.full_precision() and fmt.files is None):  # no format reads it here
            problems.append(f"{key} holds {file.header[key]['dtype']} values, where a weight holds floating point")
    for weight_key, scale_key in scale_keys.items():
        problems += _scale_problems(file, weight_key, scale_key)
    if problems:
        raise InvalidInput("transformer", str(path), listing("a file whose numbers load right; here", problems))


def _scale_problems(file: CheckpointFile, weight_key: str, scale_key: str) -> list[str]:
    if weight_key not in file.header:
        return [f"{scale_key} scales no weight of the file"]
    if file.dtype(scale_key) not in SCALE_DTYPES:
        return [f"{scale_key} is {file.header[scale_key]['dtype']}, not a floating-point scale"]
    shape, scale_shape = file.shape(weight_key), file.shape(scale_key)
    rows = shape[0] if shape else 1
    if math.prod(scale_shape) not in (1, rows):  # checked before it is read: a header may say gigabytes
        return [f"{scale_key} has {math.prod(scale_shape)} values, for a weight of {rows} rows (one, or one per row)"]
    if scale_shape not in ((), (1,), (1, 1), (rows,), (rows, 1)):  # (1, rows) would scale columns, as torch broadcasts
        return [f"{scale_key} has shape {list(scale_shape)}: one per row of its weight is [{rows}] or [{rows}, 1]"]
    scale = file.read(scale_key).float().flatten()
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


def suffixes() -> tuple[str, ...]:
    """The transformer files read: .safetensors, and every format's own (.gguf)."""
    return (".safetensors", *(suffix for fmt in formats.every() for suffix in fmt.file_suffixes))


def transformer_forms() -> str:
    others = " or ".join(suffixes()[1:])
    return (
        "a .safetensors transformer file, a folder holding one (or a Wan2.2 high/low pair, there or in two "
        "subfolders), or OWNER/REPO/FILE.safetensors on the Hub" + (f"; a {others} file likewise" if others else "")
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
        names = _files_in(path)
        try:
            roles = [(role, path / name) for role, name in choose_files(names, str(path), str(path))]
        except LoraNotFound as exc:
            raise InvalidInput("transformer", str(path), transformer_forms() + f" ({exc})") from None
    if [role for role, _ in roles] == [EVERY_EXPERT] and len(spec.experts) == 1:
        return {spec.experts[0]: roles[0][1]}
    if len(spec.experts) == 2 and {role for role, _ in roles} == set(spec.experts):
        return {role: file for role, file in roles}
    need = "one file" if len(spec.experts) == 1 else "the high-noise and the low-noise expert's files (a pair)"
    raise InvalidInput("transformer", str(given), f"{need} for {spec.name}")


def _files_in(folder: Path) -> list[str]:
    """The transformer files in `folder`, else in its subfolders (QuantStack's HighNoise/ and LowNoise/), by
    their paths there."""

    def found(where: Path) -> list[str]:
        return sorted(p.relative_to(folder).as_posix() for p in where.iterdir() if p.suffix.lower() in suffixes())

    here = found(folder)
    if here:
        return here
    return sorted(name for sub in folder.iterdir() if sub.is_dir() for name in found(sub))


def _locate(given: str) -> Path:
    path = Path(given).expanduser()
    if path.exists():
        return path
    parts = given.split("/")
    if len(parts) >= 3 and given.lower().endswith(suffixes()) and not given.startswith((".", "/", "~")):
        return download_file("/".join(parts[:2]), "/".join(parts[2:]))
    raise InvalidInput("transformer", given, transformer_forms())
