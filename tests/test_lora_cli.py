"""`wanlora lora inspect` and `wanlora lora merge`, run as a user would."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from wanlora.tiny import tiny_transformer

from .builders import ALL_LAYOUTS, write_lora
from .conftest import run_cli
from .lora_helpers import assert_weights, snapshot


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-loras")
    model = tiny_transformer()
    made = {}
    for i, layout in enumerate(ALL_LAYOUTS):
        path = folder / f"{layout}.safetensors"
        made[layout] = (
            str(path),
            write_lora(path, model, layout, seed=i, metadata={"modelspec.trigger_phrase": "wanstyle"}),
        )
    return made


def test_inspect_prints_layout_ranks_targets_base_and_triggers(loras):
    result = run_cli("lora", "inspect", loras["kohya"][0], "--model", "tiny")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in (
        "kohya / musubi-tuner",
        "ranks: 4",
        "alpha: 2",
        "attn1.to_q",
        "ffn.net.2",
        "trigger words: wanstyle",
        "coverage: 20/20 block linears in 2/2 blocks of tiny",
    ):
        assert text in out, text


def test_inspect_json(loras):
    result = run_cli("lora", "inspect", loras["full-deltas"][0], "--json")
    info = json.loads(result.stdout)
    assert info["delta_kinds"] == ["full", "lora"] and info["tensors"] == 2 * (8 * 3 + 2 * 2 + 3) + 1  # 2 blocks + head
    assert "blocks.N" not in info["targets"] and "scale_shift_table" in info["targets"]


def test_merge_every_layout_bakes_exact_weights(loras, tmp_path):
    args = ["lora", "merge", "--model", "tiny", "--dtype", "fp32", "--out", str(tmp_path / "merged")]
    strengths = {layout: 0.5 + 0.1 * i for i, layout in enumerate(ALL_LAYOUTS)}
    for layout, (path, _) in loras.items():
        args += ["--lora", f"{path}:{strengths[layout]}"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "merged")
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged", subfolder="transformer")
    assert (tmp_path / "merged" / "model_index.json").is_file()
    base = snapshot(tiny_transformer())
    assert_weights(merged, base, [(loras[k][1], s) for k, s in strengths.items()], atol=1e-5)


@pytest.mark.parametrize("problem", ["missing", "html", "mismatch", "strength"])
def test_merge_refusals_exit_2_with_one_line_and_write_nothing(loras, tmp_path, problem):
    lora = {
        "missing": str(tmp_path / "nope.safetensors"),
        "html": str(tmp_path / "page.safetensors"),
        "mismatch": str(tmp_path / "big.safetensors"),
        "strength": f"{loras['original'][0]}:nan",
    }[problem]
    (tmp_path / "page.safetensors").write_text("<html><body>Please log in</body></html>")
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4),
        },
        tmp_path / "big.safetensors",
    )
    out = tmp_path / "out"
    result = run_cli(
        "lora", "merge", "--model", "tiny", "--lora", loras["original"][0], "--lora", lora, "--out", str(out)
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanlora: error:"), result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    if problem == "mismatch":
        assert "Wan2.1 1.3B" in lines[0]
