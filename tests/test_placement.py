"""Wan2.2 A14B: a LoRA file given for both experts goes on the one its metadata, then its name, says.

The files carry the metadata keys each trainer really writes (read from their code):
- musubi-tuner (kohya's): `lora_unet_` keys; src/musubi_tuner/utils/sai_model_spec.py writes `modelspec.*`,
  with `modelspec.timestep_range` "min,max" only when --min_timestep/--max_timestep were given, and
  training/trainer_base.py `ss_base_model_version` "wan" for every Wan task;
- ai-toolkit: `diffusion_model.` keys (lora_A/lora_B); ss_base_model_version "wan_2.2_14b" in both files, and
  the expert only in the name (wan22_14b_model.py save_lora: NAME_high_noise / NAME_low_noise);
- ai-toolkit's one "combo" file for both experts (split_multistage_loras off), whose keys name the expert:
  `diffusion_model.transformer_1.` (high noise) and `diffusion_model.transformer_2.` (low noise);
- kohya's sd-scripts metadata with neither;
- Civitai's API: a model page's `modelVersions[].baseModel`, a version's top-level `baseModel`
  (/api/v1/model-versions/V), stood in for on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from wanlora import WanLoraPipeline
from wanlora.errors import InvalidInput, LoraFormatError, LoraMismatch
from wanlora.logs import NOTICE
from wanlora.lora.fetch import Credentials
from wanlora.lora.inspect import inspect_lora
from wanlora.lora.layouts import parse_halves, parse_state_dict
from wanlora.lora.loader import LoraLoader
from wanlora.lora.placement import place
from wanlora.lora.selection import LoraRequest
from wanlora.tiny import tiny_transformer

from .builders import ai_toolkit_combo, ai_toolkit_split, write_lora
from .conftest import run_cli
from .lora_helpers import assert_bitwise, assert_weights, snapshot
from .servers import Route, civitai_version

MUSUBI = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "wan2.1/lora",  # musubi's ARCH_WAN for every task, Wan2.2 A14B included
    "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1",
    "modelspec.title": "motion",
    "modelspec.resolution": "1280x720",
    "ss_base_model_version": "wan",
    "ss_network_module": "networks.lora_wan",
    "ss_network_dim": "4",
    "ss_network_alpha": "4",
    "ss_sd_model_name": "wan2.2_t2v_low_noise_14B_fp16.safetensors",
}
AI_TOOLKIT = {
    "ss_base_model_version": "wan_2.2_14b",
    "software": json.dumps({"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit", "version": "0.7"}),
    "format": "pt",
    "training_info": json.dumps({"step": 5000, "epoch": 3}),
    "ss_output_name": "mystyle",
}
KOHYA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "4",
    "ss_base_model_version": "wan",
}


@pytest.fixture(scope="module")
def a14b():
    return WanLoraPipeline.from_pretrained("tiny-t2v-a14b")


def on_experts(pipe) -> dict[str, int]:
    return {expert.name: len(expert.loras.active) for expert in pipe.experts}


@pytest.mark.parametrize(
    ("name", "layout", "metadata", "expert", "why"),
    [
        (
            "motion.safetensors",
            "kohya",
            {**MUSUBI, "modelspec.timestep_range": "875,1000"},
            "high",
            "its modelspec.timestep_range 875,1000 (musubi-tuner) is the high-noise end",
        ),
        (
            "motion.safetensors",
            "kohya",
            {**MUSUBI, "modelspec.timestep_range": "0,900"},
            "low",
            "its modelspec.timestep_range 0,900 (musubi-tuner) is the low-noise end",
        ),
        (
            "mystyle_000005000_high_noise.safetensors",
            "original-peft",
            AI_TOOLKIT,
            "high",
            "its file name mystyle_000005000_high_noise.safetensors says high-noise",
        ),
        (
            "mystyle_low_noise.safetensors",
            "original-peft",
            AI_TOOLKIT,
            "low",
            "its file name mystyle_low_noise.safetensors says low-noise",
        ),
        ("wan22-SmoothMotion-LowNoise.safetensors", "kohya", KOHYA, "low", "says low-noise"),
    ],
)
def test_a_file_for_both_goes_on_the_expert_its_metadata_or_name_says(
    a14b, tmp_path, caplog, name, layout, metadata, expert, why
):
    path = tmp_path / name
    write_lora(path, tiny_transformer(), layout, metadata=metadata, seed=3)
    caplog.set_level(logging.INFO, logger="wanlora")
    a14b.set_loras([(str(path), 0.8)])
    assert on_experts(a14b) == {"high": int(expert == "high"), "low": int(expert == "low")}
    (line,) = [r for r in caplog.records if "expert only" in r.getMessage()]
    assert line.levelno == NOTICE and f"goes on the {expert}-noise expert only" in line.getMessage()
    assert why in line.getMessage()


def test_a_file_that_says_nothing_goes_on_both_and_an_explicit_expert_always_wins(a14b, tmp_path, caplog):
    plain, musubi_high = tmp_path / "style.safetensors", tmp_path / "motion.safetensors"
    write_lora(plain, tiny_transformer(), "kohya", metadata=KOHYA, seed=4)
    write_lora(musubi_high, tiny_transformer(), "kohya", metadata={**MUSUBI, "modelspec.timestep_range": "875,1000"})
    caplog.set_level(logging.INFO, logger="wanlora")
    a14b.set_loras([(str(plain), 1.0)])
    assert on_experts(a14b) == {"high": 1, "low": 1}
    assert "style.safetensors goes on both experts: neither its metadata nor its name says" in caplog.text
    a14b.set_loras([(str(musubi_high), 1.0, "low")])  # `--lora-low`: the user's word over the file's
    assert on_experts(a14b) == {"high": 0, "low": 1}
    a14b.set_loras([LoraRequest(str(musubi_high), 1.0, "both", explicit=True)])  # fal's transformer: "both"
    assert on_experts(a14b) == {"high": 1, "low": 1}
    a14b.set_loras([(str(musubi_high), {"high": 1.0, "low": 0.5})])
    assert on_experts(a14b) == {"high": 1, "low": 1}


def test_placement_reads_ranges_it_can_trust_only():
    assert place({"modelspec.timestep_range": "900, 1000"}, "x.safetensors").expert == "high"
    assert place({"modelspec.timestep_range": "0,1000"}, "x.safetensors").expert is None  # all the steps
    assert place({"modelspec.timestep_range": "1000,0"}, "x.safetensors").expert is None  # not a range
    assert place({"modelspec.timestep_range": "high"}, "x_low_noise.safetensors").expert == "low"  # then the name
    assert place({"ss_base_model_version": "wan_2.2_5b"}, "x.safetensors").base_model == "Wan2.2 TI2V-5B"
    assert place({"ss_base_model_version": "wan"}, "x.safetensors").base_model is None  # musubi: every Wan model


def test_lora_inspect_shows_what_it_read_and_decided(tmp_path):
    path = tmp_path / "mystyle_high_noise.safetensors"
    write_lora(path, tiny_transformer(), "original-peft", metadata=AI_TOOLKIT)
    info = json.loads(run_cli("lora", "inspect", str(path), "--json").stdout)
    assert (info["expert"], info["metadata_base_model"]) == ("high", "Wan2.2 A14B")
    assert info["expert_reason"] == "its file name mystyle_high_noise.safetensors says high-noise"
    musubi = tmp_path / "motion.safetensors"
    write_lora(musubi, tiny_transformer(), "kohya", metadata={**MUSUBI, "modelspec.timestep_range": "0,875"})
    shown = run_cli("lora", "inspect", str(musubi))
    assert shown.returncode == 0, shown.stderr
    assert "the low-noise expert (Wan2.2 A14B): its modelspec.timestep_range 0,875 (musubi-tuner)" in shown.stdout


def test_a_lora_whose_metadata_names_another_model_is_refused_before_any_merge(a14b, tmp_path):
    five_b = tmp_path / "style.safetensors"
    write_lora(
        five_b, tiny_transformer(), "original-peft", metadata={**AI_TOOLKIT, "ss_base_model_version": "wan_2.2_5b"}
    )
    a14b.set_loras([])
    with pytest.raises(LoraMismatch) as caught:
        a14b.set_loras([(str(five_b), 1.0)])
    assert "is for Wan2.2 TI2V-5B, as its ss_base_model_version wan_2.2_5b (ai-toolkit) says" in str(caught.value)
    assert "tiny-t2v-a14b is Wan2.2 A14B" in str(caught.value) and caught.value.widths == (3072,)
    assert on_experts(a14b) == {"high": 0, "low": 0}
    wan21 = tmp_path / "wan21.safetensors"  # "wan_2.1" is 1.3B or 14B: the shapes decide, as before
    write_lora(wan21, tiny_transformer(), "original-peft", metadata={**AI_TOOLKIT, "ss_base_model_version": "wan_2.1"})
    a14b.set_loras([(str(wan21), 1.0)])
    assert on_experts(a14b) == {"high": 1, "low": 1}


def civitai_page(file_server, model_id: int, version: int, base_model: str, body: bytes) -> str:
    """A Civitai model page on 127.0.0.1, answering as civitai.com's /api/v1/models/ID does."""
    answer = {"id": model_id, "modelVersions": [{"id": version, "baseModel": base_model, "trainedWords": []}]}
    file_server.routes[f"/api/v1/models/{model_id}"] = Route(json.dumps(answer).encode())
    file_server.routes[f"/api/download/models/{version}"] = Route(body)
    return f"https://civitai.com/models/{model_id}"


def test_civitais_base_model_is_read_for_a_model_page_and_checked(
    a14b, tmp_path, offline_net, file_server, monkeypatch
):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "kohya", metadata=KOHYA)
    body = (tmp_path / "a.safetensors").read_bytes()
    fits = civitai_page(file_server, 11, 111, "Wan Video 2.2 T2V-A14B", body)
    (report,) = inspect_lora(fits)
    assert (report.metadata_base_model, report.expert) == ("Wan2.2 A14B", None)
    a14b.set_loras([(fits, 1.0)])
    assert on_experts(a14b) == {"high": 1, "low": 1}
    other = civitai_page(file_server, 12, 112, "Wan Video 1.3B t2v", body)
    with pytest.raises(LoraMismatch, match="is for Wan2.1 1.3B, as its Civitai base model 'Wan Video 1.3B t2v' says"):
        a14b.set_loras([(other, 1.0)])
    assert on_experts(a14b) == {"high": 1, "low": 1}  # the set before it, untouched


def test_civitais_base_model_is_read_for_a_version_reference_and_checked(
    a14b, tmp_path, offline_net, file_server, monkeypatch
):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "kohya", metadata=KOHYA)
    body = (tmp_path / "a.safetensors").read_bytes()
    a14b.set_loras([])
    for ref in (
        civitai_version(file_server, 121, body, "Wan Video 1.3B t2v"),
        "https://civitai.com/api/download/models/121?type=Model&format=SafeTensor",
    ):
        with pytest.raises(LoraMismatch, match="is for Wan2.1 1.3B, as its Civitai base model 'Wan Video 1.3B t2v'"):
            a14b.set_loras([(ref, 1.0)])
        assert on_experts(a14b) == {"high": 0, "low": 0}
    a14b.set_loras([(civitai_version(file_server, 122, body, "Wan Video 14B t2v"), 1.0)])  # 14B's shapes: fits
    assert on_experts(a14b) == {"high": 1, "low": 1}


def test_a_civitai_version_for_i2v_a14b_passes_on_a_tiny_i2v_a14b(tmp_path, offline_net, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "kohya", metadata=KOHYA)
    body = (tmp_path / "a.safetensors").read_bytes()
    ref = civitai_version(file_server, 131, body, "Wan Video 2.2 I2V-A14B")
    (report,) = inspect_lora(ref)
    assert (report.metadata_base_model, report.expert) == ("Wan2.2 A14B", None)
    pipe = WanLoraPipeline.from_pretrained("tiny-i2v-a14b")
    pipe.set_loras([(ref, 1.0)])
    assert on_experts(pipe) == {"high": 1, "low": 1}
    five_b = civitai_version(file_server, 132, body, "Wan Video 2.2 TI2V-5B")
    with pytest.raises(LoraMismatch, match="is for Wan2.2 TI2V-5B, as its Civitai base model 'Wan Video 2.2 TI2V-5B'"):
        pipe.set_loras([(five_b, 1.0)])
    assert on_experts(pipe) == {"high": 1, "low": 1}


# ------------------------------------------------------------------ ai-toolkit's combo file: the expert in its keys


def write_combo(folder, experts=("high", "low")) -> tuple:
    """An ai-toolkit combo file `mystyle.safetensors` and, in `folder/split/`, the pair save_lora would have
    written from it with split_multistage_loras on; returns (combo path, split folder, deltas per expert)."""
    tensors, deltas = ai_toolkit_combo(tiny_transformer(), experts, seed=31)
    (folder / "split").mkdir(parents=True)
    save_file(tensors, str(folder / "mystyle.safetensors"), metadata=AI_TOOLKIT)
    for expert in experts:
        split = ai_toolkit_split(tensors, expert)
        save_file(split, str(folder / "split" / f"mystyle_{expert}_noise.safetensors"), metadata=AI_TOOLKIT)
    return folder / "mystyle.safetensors", folder / "split", deltas


def expert_weights(pipe) -> dict:
    return {expert.name: snapshot(expert.module) for expert in pipe.experts}


def test_an_ai_toolkit_combo_file_is_a_pair_each_half_on_its_expert_as_its_two_files_are(a14b, tmp_path, caplog):
    combo, split, deltas = write_combo(tmp_path)
    assert any(k.startswith("diffusion_model.transformer_1.blocks.0.self_attn.q.lora_A") for k in keys_of(combo))
    a14b.set_loras([])
    bases = expert_weights(a14b)
    for strength in (0.8, {"high": 2.0, "low": 0.5}):
        caplog.clear()
        caplog.set_level(logging.INFO, logger="wanlora")
        a14b.set_loras([(str(combo), strength)])
        lines = [r for r in caplog.records if "is a Wan2.2 pair" in r.getMessage()]  # a line per request
        assert all(line.levelno == NOTICE for line in lines) and len(lines) == (1 if strength == 0.8 else 2)
        said = " ".join(line.getMessage() for line in lines)  # each request names the half it placed
        assert said.count("mystyle.safetensors's transformer_1 keys on the high-noise expert") == 1
        assert said.count("mystyle.safetensors's transformer_2 keys on the low-noise expert") == 1
        from_combo = expert_weights(a14b)
        a14b.set_loras([(str(split), strength)])  # the same LoRA as ai-toolkit's two files
        for expert in a14b.experts:
            assert_bitwise(expert.module, from_combo[expert.name])
            scale = strength if isinstance(strength, float) else strength[expert.name]
            assert_weights(expert.module, bases[expert.name], [(deltas[expert.name], scale)], atol=1e-5)
    a14b.set_loras([(str(combo), 1.0, "low")])  # aimed at one expert: only its half, as with a pair
    assert on_experts(a14b) == {"high": 0, "low": 1}
    assert_bitwise(a14b.experts[0].module, bases["high"])


def keys_of(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@pytest.mark.parametrize("expert", ["high", "low"])
def test_a_combo_file_with_one_half_goes_on_that_expert_with_a_notice(a14b, tmp_path, caplog, expert):
    combo, split, _ = write_combo(tmp_path, (expert,))
    a14b.set_loras([(str(split), 1.0)])
    from_file = expert_weights(a14b)
    caplog.set_level(logging.INFO, logger="wanlora")
    caplog.clear()  # the split file's own notice, caught where an earlier test left the logger at NOTICE
    a14b.set_loras([(str(combo), 1.0)])
    assert on_experts(a14b) == {"high": int(expert == "high"), "low": int(expert == "low")}
    (line,) = [r for r in caplog.records if "expert only" in r.getMessage()]
    marker = {"high": "transformer_1", "low": "transformer_2"}[expert]
    assert line.levelno == NOTICE
    assert f"goes on the {expert}-noise expert only: its keys name ai-toolkit's {marker}" in line.getMessage()
    for module in a14b.experts:
        assert_bitwise(module.module, from_file[module.name])


def test_a_combo_file_on_a_one_transformer_model_is_refused_and_nothing_changes(tmp_path, tiny_pipe):
    combo, _, _ = write_combo(tmp_path)
    before = snapshot(tiny_pipe.transformer)
    with pytest.raises(InvalidInput, match=r"a Wan2.2 high/low pair in one file \(ai-toolkit's transformer_1 and tra"):
        tiny_pipe.set_loras([(str(combo), 1.0)])
    assert_bitwise(tiny_pipe.transformer, before)


def test_lora_inspect_reports_each_half_of_a_combo_file(tmp_path):
    combo, _, deltas = write_combo(tmp_path)
    high, low = inspect_lora(str(combo), tiny_transformer(), "tiny-t2v-a14b")
    assert (high.expert, low.expert) == ("high", "low") and high.path == low.path == str(combo)
    half = len(keys_of(combo)) // 2
    assert high.tensors == low.tensors == half and high.parameters == len(deltas["high"])
    assert high.expert_reason == (
        "the high-noise half of an ai-toolkit file that holds both experts' LoRAs: "
        f"{half} of its {2 * half} tensors, under transformer_1"
    )
    assert low.coverage is not None and low.coverage.fits and high.metadata_base_model == "Wan2.2 A14B"


def test_lora_inspect_says_does_not_fit_where_generating_would_refuse(tmp_path, offline_net, file_server, monkeypatch):
    """Shapes alone fit in both cases; the model's row says what generate refuses: a pair on one transformer, a
    base model of another family."""
    from wanlora.models import tiny_spec

    combo, _, _ = write_combo(tmp_path)
    for report in inspect_lora(str(combo), tiny_transformer(), "tiny", spec=tiny_spec()):
        assert not report.coverage.fits
        assert report.coverage.verdict == (
            "does not fit: it is half of a Wan2.2 high/low pair, and tiny has one transformer"
        )
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    write_lora(tmp_path / "a.safetensors", tiny_transformer(), "kohya", metadata=KOHYA)
    ref = civitai_version(file_server, 151, (tmp_path / "a.safetensors").read_bytes(), "Wan Video 1.3B t2v")
    a14b = tiny_spec(kind="t2v-a14b")
    (report,) = inspect_lora(ref, tiny_transformer(), a14b.name, spec=a14b)
    assert not report.coverage.fits and "as its Civitai base model 'Wan Video 1.3B t2v' says" in report.coverage.verdict
    assert report.base_model_said_by == "its Civitai base model 'Wan Video 1.3B t2v'"  # not "its metadata"
    right = civitai_version(file_server, 152, (tmp_path / "a.safetensors").read_bytes(), "Wan Video 2.2 T2V-A14B")
    (fits,) = inspect_lora(right, tiny_transformer(), a14b.name, spec=a14b)
    assert fits.coverage.fits and fits.coverage.verdict == "fits"


def test_a_combo_file_whose_keys_do_not_all_name_an_expert_is_refused(tmp_path):
    tensors, _ = ai_toolkit_combo(tiny_transformer(), ("high",))
    stray = {k.replace("transformer_1.", ""): v for k, v in tensors.items() if "blocks.1." in k}
    with pytest.raises(LoraFormatError, match="names a Wan2.2 expert .* in some keys but not in: diffusion_model.blo"):
        parse_halves({**tensors, **stray}, {}, label="mixed.safetensors")
    both, _ = ai_toolkit_combo(tiny_transformer())
    assert [lora.expert for lora in parse_halves(both, {})] == ["high", "low"]
    with pytest.raises(LoraFormatError, match="holds both Wan2.2 experts' LoRAs"):
        parse_state_dict(both, {})  # one LoRA asked for: a combo is two


def test_a_private_combo_file_is_two_loras_each_time_the_loader_rechecks_it(
    tmp_path, offline_net, file_server, monkeypatch
):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    combo, _, _ = write_combo(tmp_path)
    ref = civitai_version(file_server, 141, combo.read_bytes(), "Wan Video 2.2 T2V-A14B", token="good")
    loader = LoraLoader()
    first = loader.load(ref, Credentials(civitai_token="good"))
    again = loader.load(ref, Credentials(civitai_token="good"))  # access re-checked, the file not read again
    assert [role for role, _ in again] == ["high", "low"]
    assert all(a is b for (_, a), (_, b) in zip(first, again, strict=True))


def test_a_pair_whose_file_name_and_keys_disagree_is_refused(a14b, tmp_path):
    tensors, _ = ai_toolkit_combo(tiny_transformer(), ("low",))
    (tmp_path / "pair").mkdir()
    save_file(tensors, str(tmp_path / "pair" / "mystyle_high_noise.safetensors"))  # transformer_2 keys, named high
    save_file(ai_toolkit_split(tensors, "low"), str(tmp_path / "pair" / "mystyle_low_noise.safetensors"))
    a14b.set_loras([])
    with pytest.raises(LoraFormatError, match="is the high-noise file of a Wan2.2 pair by its name, but its keys are"):
        a14b.set_loras([(str(tmp_path / "pair"), 1.0)])
    assert on_experts(a14b) == {"high": 0, "low": 0}
