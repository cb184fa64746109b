"""The key tables of every published Wan LoRA layout (docs/lora-formats.md): who wrote a key, which module
it names, and which factor it holds. A new layout is a new row here; the reader (layouts.py) uses them.

A file's keys are `<prefix><module><separator><factor>`. The prefix says who wrote it, the
module is named in original-Wan or diffusers terms (dotted, or flattened with `_` by kohya
and LyCORIS), and the factor says which piece of which delta it holds.
"""

from __future__ import annotations

import re

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

# Keys for a text encoder, which some trainers save beside the transformer's (kohya's `lora_te_`, `lora_te1_`;
# diffusers' and PEFT's `text_encoder.`; ComfyUI's `text_encoders.`). wanlora merges into the transformer only.
TEXT_ENCODER = re.compile(r"(lora_te\d*_|text_encoders?(_\d+)?\.)")

# ai-toolkit's Wan2.2 A14B trainer (extensions_built_in/diffusion_models/wan22/wan22_14b_model.py, save_lora)
# with `split_multistage_loras` off saves one "combo" file for both experts: its network wraps a
# DualWanTransformer3DModel, so each key names the expert right after `diffusion_model.`
# (`diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight`). transformer_1 is the high-noise one.
EXPERT_MARKERS = {"transformer_1.": "high", "transformer_2.": "low"}
MARKED_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # the prefixes such a marker follows
MARKER_OF = {expert: marker.rstrip(".") for marker, expert in EXPERT_MARKERS.items()}  # "high" -> "transformer_1"

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
