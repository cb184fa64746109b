"""Single-file Wan transformers, as ComfyUI and Kijai's WanVideo_comfy publish them, fp8 ones included.

The file holds one transformer under the original Wan names (`blocks.0.self_attn.q.weight`,
with or without ComfyUI's `model.diffusion_model.` prefix); diffusers' own converter names
them. Three weight conventions occur, all read as W = stored * scale:
- full precision (bf16, fp16, fp32): no scale;
- plain fp8 (`..._fp8_e4m3fn.safetensors`): block linears cast to float8, scale 1;
- scaled fp8 (`..._fp8_scaled.safetensors`): a per-tensor fp32 `scale_weight` beside each
  fp8 weight (ComfyUI's older layout, with a `scaled_fp8` marker), or `weight_scale` with a
  `comfy_quant` entry (its newer one). Input scales (`scale_input`, `input_scale`) are
  calibration for static activation scaling; wanlora scales activations per token instead.

Block linears stored in float8_e4m3fn stay fp8 (a per-tensor scale becomes a per-row one, the
same for every row): the file is their pristine W0, read back through the memory map, so a
LoRA merge is quantize(dequantize(W0) + sum(s_i dW_i)). Everything else is dequantized to the
model's dtype. The layout was checked against ComfyUI's loader (comfy/ops.py); the published
files themselves cannot be downloaded where this was written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from .checkpoint import Checkpoint, MappedFile, TensorRef
from .errors import InvalidInput, LoraNotFound, ModelNotFound
from .fp8 import BLOCK_PREFIX, FP8, Fp8Linear
from .hub import download_file
from .lora.pairs import EVERY_EXPERT, choose_files
from .messages import listing
from .models import ModelSpec, families_of_width

logger = logging.getLogger(__name__)

COMFY_PREFIX = "model.diffusion_model."
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's older and newer name for a weight's scale
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
IGNORED_KEYS = {"scaled_fp8"}  # ComfyUI's marker of a scaled-fp8 file: an empty tensor


def diffusers_names(file: MappedFile) -> tuple[dict[str, str], dict[str, str]]:
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
        file = MappedFile(path)
    except OSError as exc:
        raise ModelNotFound(f"cannot read the transformer file {path}: {exc.strerror or exc}") from None
    names, scale_keys = diffusers_names(file)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters come from the file; buffers (rotary tables) built
        model = WanTransformer3DModel(**spec.arch.transformer_config())
    _check_fits(path, file, names, model, spec)
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    refs: dict[str, TensorRef] = {}
    state: dict[str, torch.Tensor] = {}
    fp8_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, key in names.items():
        stored = file.tensor(key)
        scale = _scale(file, scale_keys.get(key), stored)
        if name.startswith(BLOCK_PREFIX) and name.endswith(".weight") and stored.dtype == FP8 and stored.dim() == 2:
            rows = scale if scale is not None else torch.ones(stored.shape[0])  # plain fp8: a cast, scale 1
            fp8_weights[name] = (stored.clone(), rows)
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
    logger.info("loaded %s's transformer from %s (%d block linears in fp8)", spec.name, path.name, kept)
    return model.eval(), Checkpoint(refs, dtype), kept > 0


def _scale(file: MappedFile, key: str | None, stored: torch.Tensor) -> torch.Tensor | None:
    """A weight's scale per output row (fp32), or None: a file's per-tensor scale is the same for every row."""
    if key is None:
        return None
    scale = file.tensor(key).float().flatten()
    rows = stored.shape[0] if stored.dim() else 1
    if scale.numel() not in (1, rows):
        raise ModelNotFound(f"{file.path}: {key} has {scale.numel()} values, for a weight of {rows} rows")
    return scale.expand(rows).clone() if scale.numel() == 1 else scale.clone()


def _check_fits(path: Path, file: MappedFile, names: dict[str, str], model: torch.nn.Module, spec: ModelSpec) -> None:
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
