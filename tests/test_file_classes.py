"""Class test: no file or component is taken on its word.

Generated single-file checkpoints (each dtype and layout published, markers, scales per tensor
and per row, and defects: a scale missing, all of them, NaN, zero, negative, infinite, a count
that fits no weight, an integer weight, an fp8 NaN code, a quantization format not read) either
load right, every block linear its stored values times its scale, or are refused naming the
tensor at fault. Generated sequences of model folders whose VAE and text encoder differ, or are
the same files, or copies, or rewritten, loaded in place of each other as a batch does, each
end with the components a fresh load of that folder has.

WANLORA_CLASS_EXAMPLES sets the examples per property (CI's default keeps this file near 30 s);
the lead reruns it larger.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.resident import load_in_place_of
from wanlora.tiny import tiny_transformer, write_tiny_model
from wanlora.weights.formats.fp8 import dequantize, fp8_layers

from .builders import original_param_name, wan_checkpoint

pytestmark = pytest.mark.slow  # class runs: generated single files and model folders


def class_examples(default: int) -> int:
    raw = os.environ.get("WANLORA_CLASS_EXAMPLES", "").strip()
    return int(raw) if raw else default


SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}

# ------------------------------------------------------------------ single-file checkpoints

LAYOUTS = ("full", "fp8", "fp8-e5m2", "fp8-scaled", "fp8-comfy-quant")
DEFECTS = (
    "scale-missing",
    "all-scales-missing",
    "nan",
    "zero",
    "negative",
    "infinite",
    "count",
    "integer-weight",
    "fp8-nan",
    "format",
)


@st.composite
def checkpoints(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    scaled = layout in ("fp8-scaled", "fp8-comfy-quant")
    possible = [d for d in DEFECTS if scaled or d in ("integer-weight", "fp8-nan") and layout != "full"]
    if layout == "full":
        possible = ["integer-weight"]
    return {
        "layout": layout,
        "prefix": draw(st.sampled_from(["", "model.diffusion_model."])),
        "per_row": scaled and draw(st.booleans()),
        "block": draw(st.integers(0, 1)),
        "module": draw(st.sampled_from(["self_attn.q", "cross_attn.v", "ffn.2"])),
        "row": draw(st.integers(0, 23)),
        "defect": draw(st.none() | st.sampled_from(possible)),
        "seed": draw(st.integers(0, 3)),
    }


def write_checkpoint(path, case) -> tuple[dict[str, torch.Tensor], str | None]:
    """The file a case describes; returns its tensors and the tensor a refusal must name (None: it loads)."""
    layout = "fp8" if case["layout"] == "fp8-e5m2" else case["layout"]
    tensors = wan_checkpoint(tiny_transformer(seed=case["seed"]), layout)
    if case["layout"] == "fp8-e5m2":
        for key in [k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn]:
            tensors[key] = tensors[key].float().to(torch.float8_e5m2)
    scale_name = "scale_weight" if case["layout"] == "fp8-scaled" else "weight_scale"
    if case["per_row"]:
        for key in [k for k in tensors if k.endswith(scale_name)]:
            rows = tensors[key.rsplit(".", 1)[0] + ".weight"].shape[0]
            tensors[key] = tensors[key] * torch.linspace(0.5, 2.0, rows)  # each row its own
    module = f"blocks.{case['block']}.{case['module']}"
    weight, scale = f"{module}.weight", f"{module}.{scale_name}"
    named = {
        "scale-missing": weight,
        "all-scales-missing": "scaled_fp8" if case["layout"] == "fp8-scaled" else "with no scale beside it",
        "nan": scale,
        "zero": scale,
        "negative": scale,
        "infinite": scale,
        "count": scale,
        "integer-weight": weight,
        "fp8-nan": weight,
        "format": f"{module}.comfy_quant",
    }
    defect = case["defect"]
    values = {"nan": float("nan"), "zero": 0.0, "negative": -1e-3, "infinite": float("inf")}
    if defect == "scale-missing":
        tensors.pop(scale)
    elif defect == "all-scales-missing":
        for key in [k for k in tensors if k.endswith(scale_name)]:
            tensors.pop(key)
    elif defect in values:
        if tensors[scale].numel() > 1:
            tensors[scale][case["row"]] = values[defect]
        else:
            tensors[scale] = torch.tensor(values[defect])
    elif defect == "count":
        tensors[scale] = torch.ones(7)
    elif defect == "integer-weight":
        tensors[weight] = (
            tensors[weight].view(torch.uint8).clone()
            if tensors[weight].element_size() == 1
            else (tensors[weight].to(torch.int32))
        )
    elif defect == "fp8-nan":
        tensors[weight].view(torch.uint8)[case["row"], 1] = (
            0x7F if tensors[weight].dtype == torch.float8_e4m3fn else 0x7E
        )
    elif defect == "format":
        tensors[f"{module}.comfy_quant"] = torch.tensor(
            list(json.dumps({"format": "int8_blockwise"}).encode()), dtype=torch.uint8
        )
    save_file({case["prefix"] + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return tensors, None if defect is None else (case["prefix"] if " " not in named[defect] else "") + named[defect]


@settings(max_examples=class_examples(150), **SETTINGS)
@given(case=checkpoints())
def test_a_single_file_loads_right_or_is_refused_naming_the_tensor(tmp_path, case):
    path = tmp_path / "transformer.safetensors"
    tensors, named = write_checkpoint(path, case)
    event(f"{case['layout']}: {case['defect'] or 'sound'}")
    if named is not None:
        with pytest.raises(InvalidInput) as refused:
            WanLoraPipeline.from_pretrained("tiny", transformer=path)
        assert named in str(refused.value)
        return
    transformer = WanLoraPipeline.from_pretrained("tiny", transformer=path).transformer
    layers = fp8_layers(transformer)
    for name, param in transformer.state_dict().items():
        if name.endswith("weight_scale") or name.startswith("rope"):
            continue
        stored = tensors[original_param_name(name)]
        if name in layers:  # kept as stored, in its own dtype, with its file's scale per row
            assert torch.equal(param.view(torch.uint8), stored.view(torch.uint8)), name
            scale = tensors.get(original_param_name(name)[: -len("weight")] + "scale_weight")
            scale = tensors.get(original_param_name(name)[: -len("weight")] + "weight_scale", scale)
            want = torch.ones(param.shape[0]) if scale is None else scale.float().expand(param.shape[0])
            assert torch.equal(layers[name].weight_scale, want), name
            assert torch.isfinite(dequantize(param, layers[name].weight_scale)).all()
        else:
            assert torch.equal(param, stored.float()), name


# ------------------------------------------------------------------ folders with differing components


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders: a base, ones whose VAE or text encoder (or both) differ, a copy, one linking the base's
    components, and one whose VAE file was rewritten in place (the same path, new bytes)."""
    root = tmp_path_factory.mktemp("component-folders")
    base, other = write_tiny_model(root / "base"), write_tiny_model(root / "other", seed=7)
    made = {"base": base}
    for name, parts in (("vae", ["vae"]), ("text", ["text_encoder"]), ("both", ["vae", "text_encoder"])):
        shutil.copytree(base, root / name)
        for part in parts:
            shutil.rmtree(root / name / part)
            shutil.copytree(other / part, root / name / part)
        made[name] = root / name
    made["copy"] = shutil.copytree(base, root / "copy")
    made["linked"] = root / "linked"
    shutil.copytree(base, made["linked"], ignore=shutil.ignore_patterns("vae", "text_encoder", "tokenizer"))
    for part in ("vae", "text_encoder", "tokenizer"):
        (made["linked"] / part).symlink_to(base / part)
    made["rewritten"] = shutil.copytree(base, root / "rewritten")
    return made


def component_bits(pipe) -> dict[str, list[bytes]]:
    parts = pipe.diffusers_pipeline
    return {
        name: [
            t.detach().contiguous().view(torch.uint8).numpy().tobytes()
            for t in getattr(parts, name).state_dict().values()
        ]
        for name in ("vae", "text_encoder")
    }


@pytest.fixture(scope="module")
def fresh(folders):
    return {name: component_bits(WanLoraPipeline.from_pretrained(str(folder))) for name, folder in folders.items()}


def rewrite_vae(folders, times: int) -> None:
    """The rewritten folder's VAE file written over in place, with the base's or the other VAE's bytes in turn."""
    source = folders["vae" if times % 2 == 0 else "base"] / "vae" / "diffusion_pytorch_model.safetensors"
    (folders["rewritten"] / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(source.read_bytes())


@settings(max_examples=class_examples(36), **SETTINGS)
@given(
    order=st.lists(
        st.sampled_from(["base", "vae", "text", "both", "copy", "linked", "rewritten"]), min_size=2, max_size=3
    )
)
def test_models_loaded_in_place_of_each_other_have_their_own_components(folders, fresh, order):
    pipe, previous_name = None, None
    for step, name in enumerate(order):
        if name == "rewritten":  # the same path as before, other bytes: never the component loaded earlier
            rewrite_vae(folders, step)
            fresh[name] = component_bits(WanLoraPipeline.from_pretrained(str(folders[name])))
        previous = pipe
        pipe = load_in_place_of(pipe, str(folders[name]))
        assert component_bits(pipe) == fresh[name], f"{name} after {order}"
        if previous is not None and {name, previous_name} <= {"base", "linked"}:  # the same files: shared
            assert pipe.diffusers_pipeline.vae is previous.diffusers_pipeline.vae
        previous_name = name
