"""Tiny GGUF Wan transformers in the published layouts: city96's Wan2.1 files, QuantStack's Wan2.2 ones.

Written from issue 32's research notes (ComfyUI-GGUF's convert.py, its llama.cpp patch and
fix_5d_tensors.py, checked against the published file sizes), with gguf's own writer:
- `general.architecture` "wan", `general.quantization_version` 2, `general.file_type` the ftype's id;
- original Wan names, no prefix, in the model's order;
- convert.py's base types: 2-D tensors F16 (BF16 from a bf16 source), 1-D ones, those of up to 1024
  values and `.modulation`s F32 (city96's fp32 sources); QuantStack's Wan2.2 files have them 2 bytes
  (F16), from an fp16 source;
- llama-quantize with the patch: only 2-D tensors outside the embeddings, the head and the
  modulations; per ftype a default type, another for `.v.weight` (self and cross attention, counted in
  file order) and for `.ffn.2.weight` (`FTYPES`); a K-quant tensor whose rows are not whole 256-weight
  blocks falls back to F16;
- `patch_embedding.weight` F32 with its 5 dimensions, right after `patch_embedding.bias`
  (fix_5d_tensors); `blocks.N.modulation` (1, 6, dim).
K-quant bytes come from wanlora's quantizers (gguf-py has none; they are held to a reference in
test_gguf_quants), the others from gguf-py's.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wanlora.weights.gguf.quantize import quantize as wanlora_quantize

from .builders import original_param_name

# ftype -> (general.file_type, default type, type of the n-th `.v.weight`, type of `.ffn.2.weight`)
FTYPES: dict[str, tuple[int, str, Callable[[int], str], str]] = {
    "F16": (1, "F16", lambda i: "F16", "F16"),
    "BF16": (32, "BF16", lambda i: "BF16", "BF16"),
    "Q8_0": (7, "Q8_0", lambda i: "Q8_0", "Q8_0"),
    "Q6_K": (18, "Q6_K", lambda i: "Q6_K", "Q6_K"),
    "Q5_K_M": (17, "Q5_K", lambda i: "Q6_K", "Q6_K"),
    "Q5_K_S": (16, "Q5_K", lambda i: "Q5_K", "Q5_K"),
    "Q5_1": (9, "Q5_1", lambda i: "Q5_1", "Q5_1"),
    "Q5_0": (8, "Q5_0", lambda i: "Q5_0", "Q5_1"),
    "Q4_K_M": (15, "Q4_K", lambda i: "Q6_K", "Q6_K"),
    "Q4_K_S": (14, "Q4_K", lambda i: "Q5_K" if i < 4 else "Q4_K", "Q5_K"),
    "Q4_1": (3, "Q4_1", lambda i: "Q4_1", "Q4_1"),
    "Q4_0": (2, "Q4_0", lambda i: "Q4_0", "Q4_1"),
    "Q3_K_L": (13, "Q3_K", lambda i: "Q5_K", "Q5_K"),
    "Q3_K_M": (12, "Q3_K", lambda i: "Q5_K" if i < 2 else "Q4_K", "Q4_K"),
    "Q3_K_S": (11, "Q3_K", lambda i: "Q3_K", "Q3_K"),
    "Q2_K": (10, "Q2_K", lambda i: "Q3_K", "Q2_K"),
}
KEPT_AS_IS = (  # never quantized (the patch's list; and only 2-D tensors are)
    "modulation",
    "patch_embedding.",
    "text_embedding.",
    "time_projection.",
    "time_embedding.",
    "img_emb.",
    "head.",
)
PUBLISHERS = ("city96", "quantstack")


def file_name(ftype: str, publisher: str = "city96", kind: str = "t2v", expert: str | None = None) -> str:
    """The published names: city96's `wan2.1-t2v-14b-Q4_K_M.gguf`; QuantStack's
    `HighNoise/Wan2.2-I2V-A14B-HighNoise-Q4_K_M.gguf` (A14B experts) and `Wan2.2-TI2V-5B-Q4_K_M.gguf`."""
    if publisher == "city96":
        return f"wan2.1-{kind}-14b-{ftype}.gguf"
    if expert is None:
        return f"Wan2.2-TI2V-5B-{ftype}.gguf"
    role = {"high": "HighNoise", "low": "LowNoise"}[expert]
    return f"{role}/Wan2.2-{kind.upper()}-A14B-{role}-{ftype}.gguf"


def gguf_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def tensor_type(name: str, value: torch.Tensor, ftype: str, v_count: int, small: str = "F32") -> str:
    """The type llama-quantize (with ComfyUI-GGUF's patch) gives tensor `name` of a converted file."""
    if value.dim() == 2 and not any(part in name for part in KEPT_AS_IS):  # a block linear: quantized
        _, default, v_type, ffn_2_type = FTYPES[ftype]
        wanted = default
        if name.endswith(".v.weight"):
            wanted = v_type(v_count)
        elif name.endswith(".ffn.2.weight"):
            wanted = ffn_2_type
        whole = 256 if wanted.endswith("_K") else 32 if wanted.startswith("Q") else 1
        return wanted if value.shape[1] % whole == 0 else "F16"  # the patch's fallback: rows not whole blocks
    if value.dim() <= 1 or value.numel() <= 1024 or "modulation" in name:
        return small
    return "BF16" if ftype == "BF16" else "F16"


def encode(value: torch.Tensor, type_name: str) -> np.ndarray:
    """The tensor's bytes (or float array) as gguf's writer takes them for `type_name`."""
    import gguf

    array = value.detach().float().numpy()
    if type_name == "F32":
        return array.astype(np.float32)
    if type_name == "F16":
        return array.astype(np.float16)
    if type_name.endswith("_K"):
        return wanlora_quantize(value.detach().float(), type_name).numpy()
    return gguf.quants.quantize(array, gguf_type(type_name))


def gguf_tensors(
    model: torch.nn.Module, ftype: str, small: str = "F32", flat_modulation: bool = False, prefix: str = ""
) -> list[tuple[str, torch.Tensor, str]]:
    """(name, value, type) of each tensor of `model` as a published GGUF file of `ftype` holds it, in file order."""
    out = []
    v_count = 0
    patch = None
    for param_name, param in model.state_dict().items():
        name = original_param_name(param_name)
        value = param.detach().float()
        if name == "patch_embedding.weight":
            patch = value  # fix_5d_tensors inserts it after the bias, F32 with its 5 dimensions
            continue
        if name.endswith("modulation") and flat_modulation:
            value = value.reshape(value.shape[-2], value.shape[-1])
        kind = tensor_type(name, value, ftype, v_count, small)
        v_count += name.endswith(".v.weight")
        out.append((prefix + name, value, kind))
        if name == "patch_embedding.bias" and patch is not None:
            out.append((prefix + "patch_embedding.weight", patch, "F32"))
    return out


def write_gguf(
    path: Path,
    tensors: list[tuple[str, torch.Tensor, str]],
    file_type: int,
    architecture: str | None = "wan",
) -> Path:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch=architecture or "wan")
    if architecture is None:  # another converter's file: no architecture at all
        writer.kv_data[0].pop("general.architecture", None)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(file_type)
    for name, value, kind in tensors:
        array = encode(value, kind)
        if kind in ("F32", "F16"):
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=gguf_type(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_transformer(
    path: Path,
    model: torch.nn.Module,
    ftype: str,
    publisher: str = "city96",
    flat_modulation: bool = False,
    prefix: str = "",
    architecture: str | None = "wan",
) -> Path:
    """`model` as `publisher` publishes a GGUF transformer of `ftype` (small tensors F32 for city96, F16 for
    QuantStack)."""
    small = "F32" if publisher == "city96" else "F16"
    tensors = gguf_tensors(model, ftype, small, flat_modulation, prefix)
    return write_gguf(path, tensors, FTYPES[ftype][0], architecture)


def write_pair(folder: Path, high: torch.nn.Module, low: torch.nn.Module, ftype: str, kind: str = "i2v") -> dict:
    """A Wan2.2 A14B pair as QuantStack lays it out: HighNoise/ and LowNoise/ folders, one file each."""
    return {
        expert: write_transformer(folder / file_name(ftype, "quantstack", kind, expert), model, ftype, "quantstack")
        for expert, model in (("high", high), ("low", low))
    }


# ------------------------------------------------------------------------------------ damaged files


def tensor_info_offset(path: Path, name: str) -> int:
    """Where tensor `name`'s info (after its name: n_dims, dims, type, offset) starts in the header."""
    data = path.read_bytes()
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def set_tensor_type(path: Path, name: str, type_id: int) -> None:
    """Rewrite tensor `name`'s GGML type id in place (to one a reader does not know, say)."""
    at = tensor_info_offset(path, name)
    data = bytearray(path.read_bytes())
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))
