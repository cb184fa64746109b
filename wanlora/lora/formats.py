"""Every published Wan LoRA layout (docs/lora-formats.md), read into one canonical form keyed by diffusers names.

A file's keys are `<prefix><module><separator><factor>`. The prefix says who wrote it, the
module is named in original-Wan or diffusers terms (dotted, or flattened with `_` by
kohya and LyCORIS), and the factor says which piece of which delta it holds. All three are
tables below; a new layout is a new row. Nothing is dropped silently: a key that fits no
row is an error that names it.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoraFileGone, LoraFormatError
from ..messages import listing
from ..models import families_of_width

# Prefixes that mean "the transformer", longest first. The namespace they imply, if any.
PREFIXES: list[tuple[str, str | None]] = [
    ("model.diffusion_model.", "original"),
    ("diffusion_model.", "original"),
    ("base_model.model.", None),
    ("transformer.", "diffusers"),
    ("pipe.dit.", "original"),
    ("lora_unet__", "original"),
    ("lora_unet_", "original"),
    ("lycoris_", None),
]

# Factor suffixes, longest first: (suffix, role). A role names one input of the delta math.
FACTORS: list[tuple[str, str]] = [
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
    (".diff", "diff"),
]
UNSUPPORTED_FACTORS = {
    ".dora_scale": "DoRA magnitude vectors",
    ".lora_magnitude_vector": "DoRA magnitude vectors",
    ".lora_mid.weight": "LoCon Tucker factors",
    ".hada_t1": "LoHa Tucker factors",
    ".hada_t2": "LoHa Tucker factors",
    ".lokr_t2": "LoKr Tucker factors",
}

# Original Wan module → diffusers module. {N} is a block index. Parameters (not modules)
# are written with their parameter name: the modulation tables.
NAME_MAP: list[tuple[str, str]] = [
    ("blocks.{N}.self_attn.q", "blocks.{N}.attn1.to_q"),
    ("blocks.{N}.self_attn.k", "blocks.{N}.attn1.to_k"),
    ("blocks.{N}.self_attn.v", "blocks.{N}.attn1.to_v"),
    ("blocks.{N}.self_attn.o", "blocks.{N}.attn1.to_out.0"),
    ("blocks.{N}.self_attn.norm_q", "blocks.{N}.attn1.norm_q"),
    ("blocks.{N}.self_attn.norm_k", "blocks.{N}.attn1.norm_k"),
    ("blocks.{N}.cross_attn.q", "blocks.{N}.attn2.to_q"),
    ("blocks.{N}.cross_attn.k", "blocks.{N}.attn2.to_k"),
    ("blocks.{N}.cross_attn.v", "blocks.{N}.attn2.to_v"),
    ("blocks.{N}.cross_attn.o", "blocks.{N}.attn2.to_out.0"),
    ("blocks.{N}.cross_attn.norm_q", "blocks.{N}.attn2.norm_q"),
    ("blocks.{N}.cross_attn.norm_k", "blocks.{N}.attn2.norm_k"),
    ("blocks.{N}.cross_attn.k_img", "blocks.{N}.attn2.add_k_proj"),
    ("blocks.{N}.cross_attn.v_img", "blocks.{N}.attn2.add_v_proj"),
    ("blocks.{N}.cross_attn.norm_k_img", "blocks.{N}.attn2.norm_added_k"),
    ("blocks.{N}.ffn.0", "blocks.{N}.ffn.net.0.proj"),
    ("blocks.{N}.ffn.2", "blocks.{N}.ffn.net.2"),
    ("blocks.{N}.norm3", "blocks.{N}.norm2"),  # the swap: original norm3 is the cross-attn norm
    ("blocks.{N}.norm2", "blocks.{N}.norm3"),
    ("blocks.{N}.modulation", "blocks.{N}.scale_shift_table"),
    ("blocks.{N}", "blocks.{N}"),  # the owner of `blocks.N.diff_m`
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("head", ""),  # the owner of `head.diff_m`: lightx2v's name for the head's modulation
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("patch_embedding", "patch_embedding"),
]
PARAMETER_TARGETS = ("scale_shift_table",)  # targets that are parameters, not modules
BLOCK = re.compile(r"blocks\.\d+")

# Words that only one namespace uses: they decide a file whose prefix does not.
ORIGINAL_MARKERS = (
    "self_attn",
    "cross_attn",
    "head.head",
    "head_head",
    "ffn.0",
    "ffn_0",
    "ffn.2",
    "ffn_2",
    "modulation",
    "text_embedding",
    "time_embedding",
    "img_emb",
    "diff_m",
)
DIFFUSERS_MARKERS = ("attn1", "attn2", "proj_out", "condition_embedder", "ffn.net", "ffn_net", "scale_shift_table")

# Modules that exist only in image-to-video models.
I2V_ONLY = re.compile(r"(attn2\.(add_k_proj|add_v_proj|norm_added_k)|condition_embedder\.image_embedder)\b")


def _name_pattern(template: str, sep: str) -> re.Pattern[str]:
    parts = [re.escape(p) if p != "{N}" else r"(\d+)" for p in template.split(".")]
    return re.compile(re.escape(sep).join(parts))


def _build_lookup(namespace: str) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, diffusers template) for the dotted and the flattened names of a namespace."""
    if namespace == "original":
        pairs = NAME_MAP
    else:
        pairs = [(target, target) for _, target in NAME_MAP]
    return [(_name_pattern(src, sep), dst) for src, dst in pairs for sep in (".", "_")]


LOOKUPS = {ns: _build_lookup(ns) for ns in ("original", "diffusers")}


def to_diffusers_name(module: str, namespace: str) -> str | None:
    """The diffusers name of `module` (dotted or flattened) in `namespace`, or None."""
    for pattern, target in LOOKUPS[namespace]:
        match = pattern.fullmatch(module)
        if match:
            return target.replace("{N}", match.group(1)) if match.groups() else target
    return None


# ---------------------------------------------------------------------------- deltas


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors
class Delta:
    """One parameter's change, in one of the published parameterisations (docs/lora-formats.md).

    `kind` is "lora", "loha", "lokr" or "full"; `factors` holds its tensors; `scale` is
    the alpha/rank factor. `compute` returns the dense delta in float32 with `shape`.
    """

    kind: str
    factors: tuple[torch.Tensor, ...]
    scale: float = 1.0

    @property
    def rank(self) -> int | None:
        if self.kind == "lora":
            return self.factors[1].shape[0]
        if self.kind == "loha":
            return self.factors[1].shape[0]
        return None

    def dense_shape(self) -> tuple[int, int] | tuple[int, ...]:
        """The shape of the delta before any reshape onto a conv kernel."""
        f = self.factors
        if self.kind == "lora":
            return (f[0].shape[0], math.prod(f[1].shape[1:]))
        if self.kind == "loha":
            return (f[0].shape[0], f[1].shape[1])
        if self.kind == "lokr":
            w1, w2 = f
            return (w1.shape[0] * w2.shape[0], w1.shape[1] * math.prod(w2.shape[1:]))
        return tuple(f[0].shape)

    def compute(self, device: torch.device | None = None) -> torch.Tensor:
        f = [t.to(device=device, dtype=torch.float32) for t in self.factors]
        if self.kind == "lora":
            up, down = f[0].flatten(1), f[1].flatten(1)
            return (up @ down).mul_(self.scale)
        if self.kind == "loha":
            w1a, w1b, w2a, w2b = f
            return ((w1a @ w1b) * (w2a @ w2b)).mul_(self.scale)
        if self.kind == "lokr":
            w1, w2 = f[0], f[1].flatten(1)
            return torch.kron(w1, w2).mul_(self.scale)
        return f[0]

    def gemm_factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up, down) as 2-D matrices in `dtype` when that cast is exact, else None.

        Exact means the factors already have `dtype`, or `dtype` is float32 (which holds
        every bf16/fp16 value). Then one GEMM, which accumulates in fp32 and rounds once,
        can add this delta to a weight with no fp32 copy of the weight.
        """
        if self.kind != "lora" or any(t.dtype not in (dtype, torch.bfloat16, torch.float16) for t in self.factors):
            return None
        if dtype != torch.float32 and any(t.dtype != dtype for t in self.factors):
            return None
        up, down = (t.to(device=device, dtype=dtype).flatten(1) for t in self.factors)
        return up, down

    def row_adder(self, shape: torch.Size, device: torch.device):
        """A function `add(acc, start, stop, strength)` that adds rows start:stop of the delta.

        The delta is seen as a (rows, -1) matrix of the parameter's shape. LoRA rows come
        from `up[start:stop] @ down`, so a dense delta is never built; other kinds are
        computed once, here.
        """
        if self.kind == "lora":
            up = self.factors[0].to(device=device, dtype=torch.float32).flatten(1)
            down = self.factors[1].to(device=device, dtype=torch.float32).flatten(1)

            def add_lora(acc: torch.Tensor, start: int, stop: int, strength: float) -> None:
                acc.addmm_(up[start:stop], down, alpha=strength * self.scale)

            return add_lora
        dense = self.compute(device).reshape(shape[0], -1)

        def add_dense(acc: torch.Tensor, start: int, stop: int, strength: float) -> None:
            acc.add_(dense[start:stop], alpha=strength)

        return add_dense

    @cached_property
    def bound(self) -> float:
        """An upper bound on any element of the dense delta, from the factors alone (may be inf)."""
        peak = [float(t.detach().abs().max()) if t.numel() else 0.0 for t in self.factors]
        if self.kind == "lora":
            value = self.rank * peak[0] * peak[1]
        elif self.kind == "loha":
            value = (self.factors[0].shape[1] * peak[0] * peak[1]) * (self.factors[2].shape[1] * peak[2] * peak[3])
        elif self.kind == "lokr":
            value = peak[0] * peak[1]
        else:
            return peak[0]
        return value * abs(self.scale)

    def fits(self, shape: torch.Size) -> bool:
        """Whether the delta has the parameter's shape, or its size for a conv kernel."""
        dense = self.dense_shape()
        if tuple(dense) == tuple(shape):
            return True
        return math.prod(dense) == math.prod(shape) and (self.kind == "full" or dense[0] == shape[0])


@dataclass
class LoraFile:
    """A LoRA read from one file: canonical deltas keyed by diffusers parameter names."""

    path: str
    layout: str
    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    tensor_count: int = 0
    trigger_words: list[str] = field(default_factory=list)
    label: str = ""  # the reference as it may be shown; the path when read directly

    def __post_init__(self) -> None:
        self.label = self.label or self.path

    @property
    def ranks(self) -> list[int]:
        return sorted({d.rank for d in self.deltas.values() if d.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({round(d.scale * d.rank, 6) for d in self.deltas.values() if d.rank is not None})

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

    `label` names the file in errors (the reference the user gave); default its path.
    """
    path = str(path)
    label = label or path
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
    return parse_state_dict(tensors, metadata, path, label)


def parse_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str = "<memory>", label: str | None = None
) -> LoraFile:
    label = label or path
    tensors = _numeric(tensors, label)
    _check_finite(tensors, label)
    stripped, namespace = _strip_prefixes(tensors, label)
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unexplained: list[str] = []
    for key, (rest, tensor) in stripped.items():
        for suffix, why in UNSUPPORTED_FACTORS.items():
            if rest.endswith(suffix):
                raise LoraFormatError(f"{label} uses {why} ({key}), which wanlora does not support yet", label)
        for suffix, role in FACTORS:
            if rest.endswith(suffix) or (role == "diff_m" and rest.endswith("_diff_m")):
                module = rest[: -len(suffix)]
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
        layout=_describe_layout(tensors, namespace, kinds),
        deltas=deltas,
        metadata=metadata,
        tensor_count=len(tensors),
        label=label,
    )


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _numeric(tensors: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """Tensors whose values the math can use: fp8 factors as bf16 (which holds every fp8 value exactly),
    whole numbers only as an alpha; booleans, unsigned and anything else refused by name."""
    usable = {}
    for key, tensor in tensors.items():
        if tensor.dtype in FP8_DTYPES:
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


def _strip_prefixes(tensors: dict[str, torch.Tensor], label: str) -> tuple[dict[str, tuple[str, torch.Tensor]], str]:
    """Drop every known prefix and decide the namespace: by prefix, then by telling words."""
    stripped = {}
    votes: set[str] = set()
    for key, tensor in tensors.items():
        rest = key
        changed = True
        while changed:
            changed = False
            for prefix, namespace in PREFIXES:
                if rest.startswith(prefix):
                    rest = rest[len(prefix) :]
                    if namespace:
                        votes.add(namespace)
                    changed = True
        stripped[key] = (rest, tensor)
    if len(votes) != 1:
        names = " ".join(rest for rest, _ in stripped.values())
        votes = {"diffusers"} if any(m in names for m in DIFFUSERS_MARKERS) else {"original"}
        if any(m in names for m in ORIGINAL_MARKERS) and "diffusers" in votes:
            raise LoraFormatError(
                f"{label} mixes original-Wan and diffusers module names; it cannot be read safely", label
            )
    return stripped, votes.pop()


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
        if up.shape[1] != rank:
            raise LoraFormatError(f"{label}: {module}'s up factor has rank {up.shape[1]}, its down one {rank}", label)
        if alpha is None:
            alpha = _peft_alpha(adapter, target, rank, label)
        yield weight, Delta("lora", (up, down), alpha / rank)
    if any(r.startswith("hada_") for r in roles):
        w1a, w1b, w2a, w2b = need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        ranks_fit = w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0]
        products_fit = w1a.shape[0] == w2a.shape[0] and w1b.shape[1] == w2b.shape[1]
        if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or not (ranks_fit and products_fit):
            shapes = ", ".join(str(list(t.shape)) for t in (w1a, w1b, w2a, w2b))
            raise LoraFormatError(f"{label}: {module}'s LoHa factors do not fit together ({shapes})", label)
        yield weight, Delta("loha", (w1a, w1b, w2a, w2b), 1.0 if alpha is None else alpha / w1b.shape[0])
    if any(r.startswith("lokr_") for r in roles):
        yield weight, _lokr(parts, alpha, module, label)
    if "diff" in roles:
        yield weight, Delta("full", tuple(need("diff", matrix=False)))
    if "diff_b" in roles:
        if target.endswith(PARAMETER_TARGETS) or not target:
            raise LoraFormatError(f"{label}: {module} is a parameter table and has no bias for diff_b", label)
        yield f"{target}.bias", Delta("full", tuple(need("diff_b", matrix=False)))
    if "diff_m" in roles:
        if not (target == "" or BLOCK.fullmatch(target)):
            raise LoraFormatError(f"{label}: diff_m belongs to a block or the head, not to {module}", label)
        table = f"{target}.scale_shift_table" if target else "scale_shift_table"
        yield table, Delta("full", tuple(need("diff_m", matrix=False)))
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
    return Delta("lokr", tuple(factors), scale)


def _peft_adapter_config(metadata: dict[str, str], label: str) -> dict[str, Any]:
    """diffusers stores the PEFT LoraConfig (lora_alpha, r, patterns) in the file's metadata."""
    raw = metadata.get("lora_adapter_metadata") or metadata.get("transformer.lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise LoraFormatError(f"{label}: its lora_adapter_metadata is not JSON: {exc}", label) from exc
    config = config.get("transformer", config) if isinstance(config, dict) else {}
    return config if isinstance(config, dict) else {}


def _peft_alpha(adapter: dict[str, Any], module: str, rank: int, label: str) -> float:
    """Alpha for a module without an `.alpha` key: PEFT's config if present, else rank (scale 1)."""
    if not adapter.get("lora_alpha"):
        return float(rank)
    patterns = adapter.get("alpha_pattern")
    try:
        alpha = float(adapter["lora_alpha"])
        for pattern, value in patterns.items() if isinstance(patterns, dict) else ():
            if re.search(rf"(^|\.){pattern}$", module):
                alpha = float(value)
    except (TypeError, ValueError, re.error) as exc:
        raise LoraFormatError(f"{label}: its lora_adapter_metadata has an unusable alpha: {exc}", label) from exc
    if not math.isfinite(alpha):
        raise LoraFormatError(f"{label}: its lora_adapter_metadata gives alpha {alpha}", label)
    # rsLoRA scales by alpha/sqrt(r); express it as an alpha over r.
    return alpha * math.sqrt(rank) if adapter.get("use_rslora") else alpha


def _describe_layout(tensors: dict[str, torch.Tensor], namespace: str, kinds: set[str]) -> str:
    """A short human name for the file's layout, as docs/lora-formats.md names them."""
    keys = list(tensors)
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
