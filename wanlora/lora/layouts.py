"""Every published Wan LoRA layout (docs/lora-formats.md), read into one canonical form keyed by diffusers names.

The key tables are in keys.py and the delta kinds in deltas.py; this is the reader. Nothing
is dropped silently: a key that fits no row is an error that names it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoraFileGone, LoraFormatError
from ..messages import listing
from ..models import families_of_width
from .deltas import Delta, FullDelta, LohaDelta, LokrDelta, LoraDelta
from .keys import (
    BLOCK,
    DIFFUSERS_MARKERS,
    EXPERT_MARKERS,
    FACTORS,
    I2V_ONLY,
    MARKED_PREFIXES,
    ORIGINAL_MARKERS,
    PARAMETER_TARGETS,
    PREFIXES,
    TEXT_ENCODER,
    UNSUPPORTED_FACTORS,
    to_diffusers_name,
)

logger = logging.getLogger(__name__)


@dataclass
class LoraFile:
    """A LoRA read from one file: canonical deltas keyed by diffusers parameter names."""

    path: str
    layout: str
    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    tensor_count: int = 0
    trigger_words: list[str] = field(default_factory=list)
    civitai_base_model: str | None = None  # its Civitai version's base model, where Civitai's API named one
    label: str = ""  # the reference as it may be shown; the path when read directly
    expert: str | None = None  # the Wan2.2 A14B expert its keys name (ai-toolkit's transformer_1 / _2), if any

    def __post_init__(self) -> None:
        self.label = self.label or self.path

    @property
    def ranks(self) -> list[int]:
        return sorted({d.rank for d in self.deltas.values() if d.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({round(d.alpha_scale * d.rank, 6) for d in self.deltas.values() if d.rank is not None})

    @property
    def module_kinds(self) -> list[str]:
        """Targeted kinds, e.g. `attn1.to_q` or `proj_out`, block indices removed."""
        modules = (name.removesuffix(".weight").removesuffix(".bias") for name in self.deltas)
        return sorted({re.sub(r"^blocks\.\d+\.", "", module) for module in modules})

    @property
    def is_i2v(self) -> bool:
        return any(I2V_ONLY.search(name) for name in self.deltas)

    def inner_dims(self) -> set[int]:
        """The model widths the LoRA was made for, read off its attention and FFN deltas."""
        dims = set()
        for name, delta in self.deltas.items():
            if re.search(r"attn[12]\.to_[qkvo]|to_out\.0|ffn\.net\.2\.weight", name) and name.endswith("weight"):
                dims.add(delta.dense_shape()[0])
        return dims

    def base_model_hint(self) -> str:
        """A readable guess at the base model, e.g. "Wan2.1 14B image-to-video (dim 5120)", from the catalogue.

        Wan2.2's A14B experts have Wan2.1 14B's shapes, so a 5120-wide LoRA without
        image-branch parts fits either; only Wan2.1 I2V has an image branch.
        """
        dims = sorted(self.inner_dims())
        if not dims:
            return "a Wan model of unknown width (no attention or FFN deltas)"
        task = " image-to-video" if self.is_i2v else ""
        names = [" or ".join(families_of_width(d, self.is_i2v)) + task or f"an unknown Wan{task} model" for d in dims]
        return f"{' / '.join(names)} (dim {', '.join(map(str, dims))})"


# ---------------------------------------------------------------------------- reading


def read_lora(path: str | Path, label: str | None = None) -> LoraFile:
    """Read a safetensors LoRA of any layout in docs/lora-formats.md into a `LoraFile`.

    `label` names the file in errors (the reference the user gave); default its path. A file
    that holds both halves of a Wan2.2 pair (ai-toolkit's combo file) is read by `read_lora_files`.
    """
    return parse_state_dict(*_read_tensors(str(path), label or str(path)), str(path), label)


def read_lora_files(path: str | Path, label: str | None = None) -> list[LoraFile]:
    """The LoRAs one file holds: itself, or the high- and the low-noise half of an ai-toolkit combo file."""
    return parse_halves(*_read_tensors(str(path), label or str(path)), str(path), label)


def _read_tensors(path: str, label: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except FileNotFoundError:
        raise LoraFileGone(f"{label}: its file is gone (removed while in use, by `cache clear`?)", label) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraFormatError(f"{label} is not a readable safetensors file: {exc}", label) from exc
    if not tensors:
        raise LoraFormatError(f"{label} holds no tensors", label)
    return tensors, metadata


def parse_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str = "<memory>", label: str | None = None
) -> LoraFile:
    """One LoRA from a state dict; a combo file's two halves are refused here (`parse_halves` reads them)."""
    label = label or path
    loras = parse_halves(tensors, metadata, path, label)
    if len(loras) > 1:
        raise LoraFormatError(
            f"{label} holds both Wan2.2 experts' LoRAs (ai-toolkit's transformer_1 and transformer_2 keys), "
            "where one LoRA was expected: load it on a Wan2.2 A14B model, whose experts each take their half",
            label,
        )
    return loras[0]


def parse_halves(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str = "<memory>", label: str | None = None
) -> list[LoraFile]:
    """One `LoraFile`, or one per expert (high first) when the keys name Wan2.2 experts (keys.EXPERT_MARKERS)."""
    label = label or path
    tensors = _without_text_encoder(tensors, label)
    tensors = _numeric(tensors, label)
    _check_finite(tensors, label)
    stripped, namespace = _strip_prefixes(tensors, label)
    experts = {expert for expert, _ in stripped.values()}
    if None in experts and len(experts) > 1:  # a key without an expert in a combo file: whose is it?
        unmarked = [key for key, (expert, _) in stripped.items() if expert is None]
        raise LoraFormatError(
            listing(f"{label} names a Wan2.2 expert (transformer_1/transformer_2) in some keys but not in", unmarked),
            label,
        )
    return [
        _parse_half(
            {key: part for key, (expert, part) in stripped.items() if expert == half},
            namespace,
            metadata,
            path,
            label,
            half,
        )
        for half in ("high", "low", None)
        if half in experts
    ]


def _parse_half(
    stripped: dict[str, tuple[str, torch.Tensor]],
    namespace: str,
    metadata: dict[str, str],
    path: str,
    label: str,
    expert: str | None,
) -> LoraFile:
    """The LoRA of the keys `stripped` holds (all of a file's, or one expert's half), by their stripped names."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    keys_of: dict[tuple[str, str], str] = {}  # (module, role) -> the key that gave it
    unexplained: list[str] = []
    for key, (rest, tensor) in stripped.items():
        for suffix, why in UNSUPPORTED_FACTORS.items():
            if rest.endswith(suffix):
                raise LoraFormatError(f"{label} uses {why} ({key}), which wanlora does not support yet", label)
        for suffix, role in FACTORS:
            if rest.endswith(suffix) or (role == "diff_m" and rest.endswith("_diff_m")):
                module = rest[: -len(suffix)]
                if (module, role) in keys_of:  # one factor under two names (lora_A and lora_down, two prefixes)
                    raise LoraFormatError(
                        f"{label} holds one factor twice, as {keys_of[module, role]} and as {key}: "
                        "which of them is meant cannot be told",
                        label,
                    )
                keys_of[module, role] = key
                groups[module][role] = tensor
                break
        else:
            unexplained.append(key)
    if unexplained:
        raise LoraFormatError(listing(f"{label} has keys that are not LoRA factors", unexplained), label)

    adapter = _peft_adapter_config(metadata, label)
    deltas: dict[str, Delta] = {}
    kinds: set[str] = set()
    unknown: list[str] = []
    for module, parts in groups.items():
        target = to_diffusers_name(module, namespace)
        if target is None:
            unknown.append(module)
            continue
        for param, delta in _module_deltas(module, target, parts, adapter, label):
            if param in deltas:
                raise LoraFormatError(f"{label} has two deltas for {param} (from {module})", label)
            deltas[param] = delta
            kinds.add(delta.kind)
    if unknown:
        raise LoraFormatError(listing(f"{label} targets modules that Wan does not have", unknown), label)
    return LoraFile(
        path=path,
        layout=_describe_layout(list(stripped), namespace, kinds),
        deltas=deltas,
        metadata=metadata,
        tensor_count=len(stripped),
        label=label,
        expert=expert,
    )


def _without_text_encoder(tensors: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """The file's tensors but its text encoder's, which are skipped with a warning; a file of those alone is
    refused: it has nothing for the transformer, and taking it would change nothing without a word."""
    kept = {key: tensor for key, tensor in tensors.items() if not TEXT_ENCODER.match(key)}
    skipped = [key for key in tensors if key not in kept]
    if skipped and not kept:
        raise LoraFormatError(
            listing(f"{label} holds only text-encoder keys (wanlora applies LoRAs to the transformer only)", skipped),
            label,
        )
    if skipped:
        logger.warning(
            "%s: skipping its %d text-encoder tensors (wanlora applies LoRAs to the transformer; the text "
            "encoder stays as it is): %s",
            label,
            len(skipped),
            listing("", skipped, limit=3).lstrip(": "),
        )
    return kept


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _numeric(tensors: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Tensors whose values the math can use: float8 factors as bf16 (which holds every float8 value exactly),
    whole numbers only as an alpha; booleans, unsigned and anything else refused by name."""
    usable = {}
    for key, tensor in tensors.items():
        if tensor.dtype in FLOAT8_DTYPES:
            tensor = tensor.to(torch.bfloat16)
        elif tensor.dtype not in FLOAT_DTYPES and not (key.endswith("alpha") and tensor.dtype in INTEGER_DTYPES):
            what = "an alpha" if key.endswith("alpha") else "a LoRA factor"
            raise LoraFormatError(f"{label}: {key[:120]} holds {tensor.dtype} values, which {what} cannot be", label)
        usable[key] = tensor
    return usable


def _check_finite(tensors: dict[str, torch.Tensor], label: str) -> None:
    """A NaN or Inf anywhere makes every frame black or noise: refuse the file, naming the tensor."""
    bad = [key for key, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise LoraFormatError(listing(f"{label} holds NaN or infinite values, in", bad), label)


Stripped = dict[str, tuple[str | None, tuple[str, torch.Tensor]]]  # key -> (its expert, (its rest, its tensor))


def _strip_prefixes(tensors: dict[str, torch.Tensor], label: str) -> tuple[Stripped, str]:
    """Drop every known prefix, and the expert marker an ai-toolkit combo file puts after `diffusion_model.`;
    decide the namespace: by prefix, then by telling words."""
    stripped: Stripped = {}
    votes: set[str] = set()
    for key, tensor in tensors.items():
        rest, expert = key, None
        changed = True
        while changed:
            changed = False
            for prefix, namespace in PREFIXES:
                if rest.startswith(prefix):
                    rest = rest[len(prefix) :]
                    if namespace:
                        votes.add(namespace)
                    changed = True
                    if prefix in MARKED_PREFIXES and expert is None:
                        expert, rest = _expert_marker(rest)
        stripped[key] = (expert, (rest, tensor))
    if len(votes) != 1:
        names = " ".join(rest for _, (rest, _) in stripped.values())
        votes = {"diffusers"} if any(m in names for m in DIFFUSERS_MARKERS) else {"original"}
        if any(m in names for m in ORIGINAL_MARKERS) and "diffusers" in votes:
            raise LoraFormatError(
                f"{label} mixes original-Wan and diffusers module names; it cannot be read safely", label
            )
    return stripped, votes.pop()


def _expert_marker(rest: str) -> tuple[str | None, str]:
    """(the expert `rest` starts by naming, `rest` without it), or (None, `rest`)."""
    for marker, expert in EXPERT_MARKERS.items():
        if rest.startswith(marker):
            return expert, rest[len(marker) :]
    return None, rest


def _module_deltas(module: str, target: str, parts: dict[str, torch.Tensor], adapter: dict, label: str):
    """Yield (diffusers parameter name, Delta) for the tensors of one module."""
    weight = target if target.endswith(PARAMETER_TARGETS) else f"{target}.weight"
    roles = set(parts) - {"alpha"}
    alpha = None
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            raise LoraFormatError(
                f"{label}: {module}.alpha must be one number, not a {list(parts['alpha'].shape)}", label
            )
        alpha = float(parts["alpha"])  # int64 in some files (Wan2.2-Lightning): still alpha
        if alpha == 0:  # kohya's, musubi-tuner's and LyCORIS's modules read alpha 0 as "alpha is the rank"
            alpha = None

    def need(*names: str, matrix: bool = True) -> list[torch.Tensor]:
        missing = [n for n in names if n not in parts]
        if missing:
            raise LoraFormatError(f"{label}: {module} has {sorted(roles)} but lacks {missing}", label)
        for name in names:
            tensor = parts[name]
            if tensor.numel() == 0 or tensor.dim() == 0 or (matrix and tensor.dim() < 2):
                raise LoraFormatError(
                    f"{label}: {module}'s {name} factor has shape {list(tensor.shape)}; "
                    + ("a matrix with no empty side is needed" if matrix else "it is empty"),
                    label,
                )
        return [parts[n] for n in names]

    if "down" in roles or "up" in roles:
        up, down = need("up", "down")
        rank = down.shape[0]
        if math.prod(up.shape[1:]) != rank:  # a conv up is (out, rank, 1, 1, 1): flattened, it must be (out, rank)
            raise LoraFormatError(
                f"{label}: {module}'s up factor has shape {list(up.shape)}, which does not fit "
                f"its down factor's rank {rank}",
                label,
            )
        if alpha is None:
            alpha = _peft_alpha(adapter, target, rank, label)
        yield weight, LoraDelta((up, down), alpha / rank)
    if any(r.startswith("hada_") for r in roles):
        w1a, w1b, w2a, w2b = need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        ranks_fit = w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0]
        products_fit = w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1]
        if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or not (ranks_fit and products_fit):
            shapes = ", ".join(str(list(t.shape)) for t in (w1a, w1b, w2a, w2b))
            raise LoraFormatError(f"{label}: {module}'s LoHa factors do not fit together ({shapes})", label)
        yield weight, LohaDelta((w1a, w1b, w2a, w2b), 1.0 if alpha is None else alpha / w1b.shape[0])
    if any(r.startswith("lokr_") for r in roles):
        yield weight, _lokr(parts, alpha, module, label)
    if "diff" in roles:
        yield weight, FullDelta(tuple(need("diff", matrix=False)))
    if "diff_b" in roles:
        if target.endswith(PARAMETER_TARGETS) or not target:
            raise LoraFormatError(f"{label}: {module} is a parameter table and has no bias for diff_b", label)
        yield f"{target}.bias", FullDelta(tuple(need("diff_b", matrix=False)))
    if "diff_m" in roles:
        if not (target == "" or BLOCK.fullmatch(target)):
            raise LoraFormatError(f"{label}: diff_m belongs to a block or the head, not to {module}", label)
        table = f"{target}.scale_shift_table" if target else "scale_shift_table"
        yield table, FullDelta(tuple(need("diff_m", matrix=False)))
    if roles == set():
        raise LoraFormatError(f"{label}: {module} has an alpha but no factors", label)


def _lokr(parts: dict[str, torch.Tensor], alpha: float | None, module: str, label: str) -> Delta:
    """LoKr: kron(w1, w2), each full or a low-rank pair; alpha/rank only for a low-rank one."""
    rank = None
    factors = []
    for n in ("1", "2"):
        names = [f"lokr_w{n}"] if f"lokr_w{n}" in parts else [f"lokr_w{n}_a", f"lokr_w{n}_b"]
        if any(name not in parts for name in names):
            raise LoraFormatError(f"{label}: {module} is LoKr but lacks lokr_w{n} (or lokr_w{n}_a and _b)", label)
        tensors = [parts[name] for name in names]
        if any(t.numel() == 0 or t.dim() < 2 for t in tensors) or (n == "1" and tensors[0].dim() != 2):
            raise LoraFormatError(f"{label}: {module}'s LoKr factors must be matrices with no empty side", label)
        if len(tensors) == 2 and (tensors[0].dim() != 2 or tensors[0].shape[1] != tensors[1].shape[0]):
            shapes = " and ".join(str(list(t.shape)) for t in tensors)
            raise LoraFormatError(f"{label}: {module}'s LoKr w{n} factors do not fit together ({shapes})", label)
        if len(tensors) == 1:
            factors.append(tensors[0])
        else:
            factors.append(tensors[0].float() @ tensors[1].float().flatten(1))
            rank = tensors[1].shape[0]
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return LokrDelta(tuple(factors), scale)


def _peft_adapter_config(metadata: dict[str, str], label: str) -> dict[str, Any]:
    """diffusers stores the PEFT LoraConfig (lora_alpha, r, patterns) in the file's metadata: as it is (a model's
    `save_lora_adapter`), or with each key under its component's prefix (a pipeline's `save_lora_weights`:
    {"transformer.lora_alpha": 16, ...}, which diffusers' loader strips again)."""
    raw = metadata.get("lora_adapter_metadata") or metadata.get("transformer.lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{label}: its lora_adapter_metadata is not JSON: {exc}", label) from exc
    except (ValueError, RecursionError) as exc:  # past Python's parser: nested thousands deep, a number too long
        why = "is JSON nested too deeply or with a number too long to be real"
        raise LoraFormatError(f"{label}: its lora_adapter_metadata {why}", label) from exc
    if not isinstance(config, dict):
        return {}
    prefixed = {
        key.removeprefix("transformer."): value for key, value in config.items() if key.startswith("transformer.")
    }
    config = prefixed or config.get("transformer", config)
    return config if isinstance(config, dict) else {}


MODULE_PATTERN = re.compile(r"[\w.]+")  # alpha_pattern keys as diffusers writes them: module names (no backtracking)


def _peft_alpha(adapter: dict[str, Any], module: str, rank: int, label: str) -> float:
    """Alpha for a module without an `.alpha` key: PEFT's config if present, else rank (scale 1)."""
    if not adapter.get("lora_alpha"):
        return float(rank)
    patterns = adapter.get("alpha_pattern")
    try:
        alpha = float(adapter["lora_alpha"])
        for pattern, value in patterns.items() if isinstance(patterns, dict) else ():
            if not MODULE_PATTERN.fullmatch(pattern):  # a file's regex could backtrack for hours
                raise LoraFormatError(
                    f"{label}: its lora_adapter_metadata's alpha_pattern holds {pattern[:80]!r}: wanlora takes module "
                    "names there (as diffusers writes them), not other regular expressions",
                    label,
                )
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = float(value)
    except (TypeError, ValueError) as exc:
        raise LoraFormatError(f"{label}: its lora_adapter_metadata has an unusable alpha: {exc}", label) from exc
    if not math.isfinite(alpha):
        raise LoraFormatError(f"{label}: its lora_adapter_metadata gives alpha {alpha}", label)
    rslora = adapter.get("use_rslora") or False
    if not isinstance(rslora, bool):  # "false" as text would read as true
        why = f"its lora_adapter_metadata's use_rslora is {rslora!r}, not true or false"
        raise LoraFormatError(f"{label}: {why}", label)
    # rsLoRA scales by alpha/sqrt(r); express it as an alpha over r.
    return alpha * math.sqrt(rank) if rslora else alpha


def _describe_layout(keys: list[str], namespace: str, kinds: set[str]) -> str:
    """A short human name for the file's layout, as docs/lora-formats.md names them."""
    any_key = lambda s: any(s in k for k in keys)  # noqa: E731
    if "loha" in kinds:
        family = "LyCORIS LoHa"
    elif "lokr" in kinds:
        family = "LyCORIS LoKr"
    elif any_key(".lora_A.default."):
        family = "DiffSynth-Studio PEFT"
    elif any(k.startswith("lora_unet_") for k in keys):
        family = "kohya / musubi-tuner"
    elif any_key(".lora_A.") and namespace == "diffusers":
        family = "diffusers PEFT" if any(k.startswith("transformer.") for k in keys) else "bare PEFT"
    elif any_key(".lora_A."):
        family = "original-Wan names, PEFT factors (ai-toolkit, diffusion-pipe)"
    elif any_key(".lora_down."):
        family = "original-Wan names, lora_down/up (ComfyUI, kijai)"
    else:
        family = "full deltas only"
    if "full" in kinds and "only" not in family:
        family += " + full deltas"
    return family
