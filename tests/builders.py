"""LoRA files in every published layout, and real-shaped random models: for tests and benchmarks.

Test scaffolding, so it lives beside the tests and ships in no wheel. Benchmarks import it
too: run them from the repository root (`python -m benchmarks.lora_swap`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from wanlora.models import Architecture, latent_shape, token_count

# ------------------------------------------------------------------ LoRA files in every layout
#
# Written from docs/lora-formats.md's tables directly, not from wanlora.lora.layouts, so
# tests that read these files check the reader against an independent transcription.

BLOCK_ORIGINAL_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
TOP_ORIGINAL_NAMES = {
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
}

# layout -> (prefix, namespace, flatten names?, down suffix, up suffix, writes alpha?)
LORA_LAYOUTS = {
    "original": ("diffusion_model.", "original", False, "lora_down.weight", "lora_up.weight", True),
    "original-peft": ("diffusion_model.", "original", False, "lora_A.weight", "lora_B.weight", True),
    "kohya": ("lora_unet_", "original", True, "lora_down.weight", "lora_up.weight", True),
    "diffusers": ("transformer.", "diffusers", False, "lora_A.weight", "lora_B.weight", False),
    "diffsynth": ("", "original", False, "lora_A.default.weight", "lora_B.default.weight", False),
    "bare-peft": ("", "diffusers", False, "lora_A.weight", "lora_B.weight", False),
}
ALL_LAYOUTS = (*LORA_LAYOUTS, "loha", "lokr", "full-deltas", "non-block")
PREFIX_VARIANTS = ("model.diffusion_model.", "pipe.dit.", "lora_unet__", "base_model.model.")


def original_name(module: str) -> str:
    """The original-Wan name of a diffusers module name (docs/lora-formats.md, "Module names")."""
    if module.startswith("blocks."):
        _, index, rest = module.split(".", 2)
        return f"blocks.{index}.{BLOCK_ORIGINAL_NAMES[rest]}"
    return TOP_ORIGINAL_NAMES[module]


def block_linears(shapes: dict[str, tuple[int, ...]], blocks: list[int] | None = None) -> list[str]:
    """Every block linear a model has (10 per T2V block, 12 per I2V block), as module names."""
    names = []
    for param, shape in shapes.items():
        module = param.removesuffix(".weight")
        parts = module.split(".", 2)
        if parts[0] == "blocks" and len(shape) == 2 and parts[2] in BLOCK_ORIGINAL_NAMES:
            if blocks is None or int(parts[1]) in blocks:
                names.append(module)
    return names


def lora_tensors(
    shapes: dict[str, tuple[int, ...]],
    layout: str,
    *,
    targets: list[str] | None = None,
    rank: int = 4,
    seed: int = 0,
    prefix: str | None = None,
    dtype: torch.dtype = torch.float32,
    with_deltas: bool = True,
    alpha: bool | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA state dict in `layout` (docs/lora-formats.md, "Layouts") and the fp32 deltas it means.

    `shapes` maps diffusers parameter names to shapes (from any model, meta or real);
    `targets` are module names (default: every block linear). The second dict maps each
    changed parameter to its delta, computed with the doc's "The math"; with `with_deltas=False`
    it stays empty (a dense delta per linear is 283 MB at the 14B shape: benchmarks want the file only).
    `alpha` writes `.alpha` keys or leaves them out (default: as the layout's trainers do).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        """Random values already rounded to `dtype`, so `expected` is exact for the file."""
        return (torch.randn(shape, generator=gen) * scale).to(dtype).float()

    targets = targets or block_linears(shapes)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}

    def low_rank(module: str, key_base: str, down_suffix: str, up_suffix: str, alpha: float | None):
        shape = shapes[f"{module}.weight"]
        down = randn(rank, *shape[1:], scale=1 / rank)
        up = randn(shape[0], rank, *([1] * (len(shape) - 2)), scale=0.1)
        tensors[f"{key_base}.{down_suffix}"], tensors[f"{key_base}.{up_suffix}"] = down, up
        scale = 1.0
        if alpha is not None:
            tensors[f"{key_base}.alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        if with_deltas:
            expected[f"{module}.weight"] = (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale

    if layout in LORA_LAYOUTS:
        default_prefix, namespace, flat, down_suffix, up_suffix, with_alpha = LORA_LAYOUTS[layout]
        with_alpha = with_alpha if alpha is None else alpha
        for module in targets:
            name = original_name(module) if namespace == "original" else module
            name = name.replace(".", "_") if flat else name
            key = f"{default_prefix if prefix is None else prefix}{name}"
            low_rank(module, key, down_suffix, up_suffix, rank / 2 if with_alpha else None)
    elif layout in ("loha", "lokr"):
        for module in targets:
            out_features, in_features = shapes[f"{module}.weight"]
            key = f"lycoris_{original_name(module).replace('.', '_')}"
            alpha = rank / 2
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
            if layout == "loha":
                w1a, w2a = (randn(out_features, rank, scale=0.3) for _ in range(2))
                w1b, w2b = (randn(rank, in_features, scale=0.3) for _ in range(2))
                for suffix, value in zip(("w1_a", "w1_b", "w2_a", "w2_b"), (w1a, w1b, w2a, w2b), strict=True):
                    tensors[f"{key}.hada_{suffix}"] = value
                expected[f"{module}.weight"] = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)
            else:
                w1 = randn(2, 2)
                w2a = randn(out_features // 2, rank, scale=0.1)
                w2b = randn(rank, in_features // 2, scale=0.1)
                tensors.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2a, f"{key}.lokr_w2_b": w2b})
                expected[f"{module}.weight"] = torch.kron(w1, w2a @ w2b) * (alpha / rank)
    elif layout == "full-deltas":  # lightx2v-style: LoRA on attention, full deltas elsewhere
        for module in targets:
            key = f"diffusion_model.{original_name(module)}"
            if ".attn" in module:
                low_rank(module, key, "lora_down.weight", "lora_up.weight", float(rank))
                continue
            delta = randn(*shapes[f"{module}.weight"], scale=0.01)
            bias = randn(*shapes[f"{module}.bias"], scale=0.01)
            tensors[f"{key}.diff"], tensors[f"{key}.diff_b"] = delta, bias
            expected[f"{module}.weight"], expected[f"{module}.bias"] = delta, bias
        blocks = sorted({int(m.split(".")[1]) for m in targets if m.startswith("blocks.")})
        for n in blocks:
            for original, param in (
                (f"blocks.{n}.norm3.diff", f"blocks.{n}.norm2.weight"),
                (f"blocks.{n}.self_attn.norm_q.diff", f"blocks.{n}.attn1.norm_q.weight"),
                (f"blocks.{n}.diff_m", f"blocks.{n}.scale_shift_table"),
            ):
                delta = randn(*shapes[param], scale=0.01)
                tensors[f"diffusion_model.{original}"] = expected[param] = delta
        head = randn(*shapes["proj_out.weight"], scale=0.01)
        tensors["diffusion_model.head.head.diff"] = expected["proj_out.weight"] = head
    elif layout == "non-block":  # non-block layers, original names, lora_down/up factors
        for module in [m for m in TOP_ORIGINAL_NAMES if f"{m}.weight" in shapes and "norm" not in m]:
            low_rank(module, f"diffusion_model.{original_name(module)}", "lora_down.weight", "lora_up.weight", None)
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(ALL_LAYOUTS)}")
    return {k: v.to(dtype).contiguous() for k, v in tensors.items()}, expected


def write_lora(
    path: str | Path,
    model: torch.nn.Module,
    layout: str,
    *,
    metadata: dict[str, str] | None = None,
    **options,
) -> dict[str, torch.Tensor]:
    """Write a LoRA for `model`'s shapes in `layout`; return the deltas it means (see lora_tensors)."""
    from safetensors.torch import save_file

    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    tensors, expected = lora_tensors(shapes, layout, **options)
    save_file(tensors, str(path), metadata=metadata)
    return expected


# ai-toolkit's Wan2.2 A14B trainer wraps both experts in one DualWanTransformer3DModel, whose modules are
# `transformer_1.*` (high noise) and `transformer_2.*` (low noise). Its PEFT-format keys (no alpha) pass
# convert_to_original (`transformer.` -> `diffusion_model.`, original-Wan module names), and save_lora
# (extensions_built_in/diffusion_models/wan22/wan22_14b_model.py) writes them as they are into one "combo"
# file when `split_multistage_loras` is off, or else drops `.transformer_N.` from each key into
# NAME_high_noise.safetensors and NAME_low_noise.safetensors.
AI_TOOLKIT_TRANSFORMERS = {"high": "transformer_1", "low": "transformer_2"}


def ai_toolkit_combo(
    model: torch.nn.Module, experts: tuple[str, ...] = ("high", "low"), seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The tensors of an ai-toolkit combo LoRA for `model`'s shapes, one half per expert in `experts`
    (`diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A.weight`), and each half's deltas."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    tensors, deltas = {}, {}
    for offset, expert in enumerate(experts):
        prefix = f"diffusion_model.{AI_TOOLKIT_TRANSFORMERS[expert]}."
        half, deltas[expert] = lora_tensors(shapes, "original-peft", prefix=prefix, seed=seed + offset, alpha=False)
        tensors.update(half)
    return tensors, deltas


def ai_toolkit_split(tensors: dict[str, torch.Tensor], expert: str) -> dict[str, torch.Tensor]:
    """One expert's file, as save_lora splits a combo: its keys with `.transformer_N.` taken out."""
    marker = f".{AI_TOOLKIT_TRANSFORMERS[expert]}."
    return {key.replace(marker, "."): value for key, value in tensors.items() if marker in key}


# ------------------------------------------------------------------ real-shaped models for benchmarks


# ------------------------------------------------------------------ single-file transformers, as published
#
# The original Wan names of every parameter (Wan2.1's wan/modules/model.py), beside the
# module names above: how ComfyUI and Kijai's WanVideo_comfy files store a whole transformer.

BLOCK_ORIGINAL_PARAMS = {
    "scale_shift_table": "modulation",
    "attn1.norm_q.weight": "self_attn.norm_q.weight",
    "attn1.norm_k.weight": "self_attn.norm_k.weight",
    "attn2.norm_q.weight": "cross_attn.norm_q.weight",
    "attn2.norm_k.weight": "cross_attn.norm_k.weight",
    "attn2.norm_added_k.weight": "cross_attn.norm_k_img.weight",
    "norm2.weight": "norm3.weight",
    "norm2.bias": "norm3.bias",
}
TOP_ORIGINAL_PARAMS = {
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.norm1.weight": "img_emb.proj.0.weight",
    "condition_embedder.image_embedder.norm1.bias": "img_emb.proj.0.bias",
    "condition_embedder.image_embedder.norm2.weight": "img_emb.proj.4.weight",
    "condition_embedder.image_embedder.norm2.bias": "img_emb.proj.4.bias",
}
CHECKPOINT_LAYOUTS = ("full", "fp8", "fp8-scaled", "fp8-comfy-quant")


def original_param_name(name: str) -> str:
    module, _, leaf = name.rpartition(".")
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        if rest in BLOCK_ORIGINAL_PARAMS:
            return f"blocks.{index}.{BLOCK_ORIGINAL_PARAMS[rest]}"
    elif name in TOP_ORIGINAL_PARAMS:
        return TOP_ORIGINAL_PARAMS[name]
    return f"{original_name(module)}.{leaf}"


def wan_checkpoint(model: torch.nn.Module, layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`model` as one single-file checkpoint under the original Wan names, in `layout`:
    "full" (as it is), "fp8" (block linears cast to float8_e4m3fn, as Kijai's `_fp8_e4m3fn` files),
    "fp8-scaled" (ComfyUI's older scaled fp8: a per-tensor `scale_weight` and a `scaled_fp8` marker) or
    "fp8-comfy-quant" (its newer one: `weight_scale` and a `comfy_quant` JSON entry per layer)."""
    import json

    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():
        key = prefix + original_param_name(name)
        value = param.detach().clone()
        quantized = layout != "full" and name.startswith("blocks.") and name.endswith(".weight") and value.dim() == 2
        if quantized and layout == "fp8":
            value = value.to(torch.float8_e4m3fn)
        elif quantized:
            scale = value.abs().max().float() / 448
            value = (value / scale).to(torch.float8_e4m3fn)
            base = key.removesuffix(".weight")
            if layout == "fp8-scaled":
                tensors[f"{base}.scale_weight"] = scale.reshape(())
            else:
                tensors[f"{base}.weight_scale"] = scale.reshape(())
                config = json.dumps({"format": "float8_e4m3fn"}).encode()
                tensors[f"{base}.comfy_quant"] = torch.tensor(list(config), dtype=torch.uint8)
        tensors[key] = value.contiguous()
    if layout == "fp8-scaled":
        tensors[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return tensors


def materialize(module: torch.nn.Module, device: str, dtype_of, seed: int = 0) -> torch.nn.Module:
    """Give a `meta` module random weights (normal, std 0.02) on `device`, each parameter made straight in
    its own dtype (`dtype_of(name)`): a 14B model costs its bf16 bytes, never an fp32 detour. Buffers are
    zeros; a module that computes its buffers (the rotary tables) rebuilds them."""
    generator = torch.Generator(device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}  # a tied weight stays one tensor
    for prefix, owner in module.named_modules():
        for name, param in owner._parameters.items():
            if param is not None and id(param) not in made:
                full = f"{prefix}.{name}" if prefix else name
                data = torch.empty(param.shape, dtype=dtype_of(full), device=device)
                made[id(param)] = torch.nn.Parameter(data.normal_(0, 0.02, generator=generator), requires_grad=False)
            if param is not None:
                owner._parameters[name] = made[id(param)]
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype, device=device)
    return module.eval().requires_grad_(False)


def random_transformer(
    arch: Architecture, num_layers: int | None = None, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> WanTransformer3DModel:
    """A transformer at `arch`'s real shapes (optionally fewer blocks) with random weights, made on `device`
    in `dtype`; the modules diffusers keeps in fp32 stay fp32."""
    from dataclasses import replace

    config = replace(arch, num_layers=num_layers or arch.num_layers).transformer_config()
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    keep = set(model._keep_in_fp32_modules or [])
    materialize(model, device, lambda name: torch.float32 if keep & set(name.split(".")) else dtype)
    model.rope = type(model.rope)(arch.attention_head_dim, (1, 2, 2), arch.rope_max_seq_len).to(device)
    return model


def step_inputs(
    arch: Architecture, frames: int, height: int, width: int, batch: int = 1, dtype=torch.bfloat16, device="cpu"
) -> dict[str, torch.Tensor]:
    """Transformer inputs for one denoising step of a video of that size (512 text tokens)."""
    generator = torch.Generator(device).manual_seed(1)
    latents = (batch, arch.in_channels, *latent_shape(frames, height, width))
    inputs = {
        "hidden_states": torch.randn(latents, generator=generator, device=device).to(dtype),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 512, arch.text_dim, generator=generator, device=device).to(dtype),
    }
    if arch.image_dim:
        inputs["encoder_hidden_states_image"] = torch.randn(
            batch, 257, arch.image_dim, generator=generator, device=device
        ).to(dtype)
    return inputs


def forward_flops(arch: Architecture, frames: int, height: int, width: int) -> float:
    """Matmul FLOPs of one transformer forward: block linears, self-attention and cross-attention."""
    tokens = token_count(width, height, frames)
    dim, text = arch.dim, 512
    per_token_linear = 2 * (4 * dim * dim + 2 * dim * dim + 2 * dim * arch.ffn_dim)  # attn1, attn2 q/o, ffn
    text_kv = 2 * 2 * dim * dim * text  # attn2 k/v on the text tokens, once per block
    attention = 4 * tokens * tokens * dim + 4 * tokens * text * dim
    return arch.num_layers * (tokens * per_token_linear + text_kv + attention)
