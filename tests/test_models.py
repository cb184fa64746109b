import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from wanlora.errors import InvalidInput, ModelNotFound
from wanlora.models import CATALOGUE, TINY_KINDS, resolve_model, tiny_spec
from wanlora.options import GenerationOptions
from wanlora.request import resolve_settings


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_catalogue_transformer_matches_published_size(name):
    spec = CATALOGUE[name]
    with torch.device("meta"):
        model = WanTransformer3DModel(**spec.arch.transformer_config())
    assert sum(p.numel() for p in model.parameters()) == spec.published_params


def test_catalogue_repos_and_sizes():
    assert CATALOGUE["t2v-1.3b"].source == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert CATALOGUE["t2v-14b"].source == "Wan-AI/Wan2.1-T2V-14B-Diffusers"
    for spec in (s for s in CATALOGUE.values() if "Wan2.1" in s.source):
        for resolution in spec.resolutions:
            for aspect in ("16:9", "9:16", "1:1"):
                width, height = spec.size(resolution, aspect)
                assert width % 16 == 0 and height % 16 == 0
    t2v = CATALOGUE["t2v-14b"]
    assert t2v.size("480p", "16:9") == (832, 480) and t2v.size("720p", "9:16") == (720, 1280)
    assert CATALOGUE["i2v-14b-480p"].arch.in_channels == 36


# Wan2.2's reference configs (wan/configs/wan_t2v_A14B.py, wan_i2v_A14B.py, wan_ti2v_5B.py):
# steps, (high, low) guidance, shift, boundary, frames, fps; and SUPPORTED_SIZES.
WAN22 = {
    "t2v-a14b": (40, (4.0, 3.0), 12.0, 0.875, 81, 16, {(1280, 720), (720, 1280), (832, 480), (480, 832)}),
    "i2v-a14b": (40, (3.5, 3.5), 5.0, 0.9, 81, 16, {(1280, 720), (720, 1280), (832, 480), (480, 832)}),
    "ti2v-5b": (50, (5.0, None), 5.0, None, 121, 24, {(1280, 704), (704, 1280)}),
}


@pytest.mark.parametrize("name", list(WAN22))
def test_wan22_defaults_match_the_reference_configs(name):
    spec = CATALOGUE[name]
    steps, guidance, shift, boundary, frames, fps, sizes = WAN22[name]
    assert spec.default_steps == steps
    assert (spec.default_guidance, spec.default_guidance_2) == guidance
    assert spec.default_shift(832, 480) == spec.default_shift(1280, 720) == shift
    assert spec.boundary_ratio == boundary and spec.experts == (("high", "low") if boundary else ("transformer",))
    assert (spec.default_frames, spec.max_frames, spec.default_fps) == (frames, frames, fps)
    assert {wh for presets in spec.presets.values() for wh in presets.values()} == sizes
    assert all(w % spec.side_multiple == 0 and h % spec.side_multiple == 0 for w, h in sizes)
    assert spec.source == f"Wan-AI/Wan2.2-{name.split('-')[0].upper()}-{name.split('-')[1].upper()}-Diffusers"


def test_wan22_sizes_and_guidance_are_checked(monkeypatch):
    a14b, ti2v = CATALOGUE["t2v-a14b"], CATALOGUE["ti2v-5b"]
    with pytest.raises(InvalidInput, match="t2v-a14b was trained at 16:9, 9:16 only"):
        a14b.size("480p", "1:1")
    with pytest.raises(InvalidInput, match="ti2v-5b supports 720p only"):
        ti2v.size("480p")
    with pytest.raises(InvalidInput, match="a multiple of 32"):
        resolve_settings(ti2v, GenerationOptions("p", width=1280, height=720))
    both = resolve_settings(a14b, GenerationOptions("p"))
    assert (both.guidance_scale, both.guidance_scale_2) == (4.0, 3.0)
    same = resolve_settings(
        a14b, GenerationOptions("p", guidance_scale=6.0)
    )  # diffusers: one scale given serves both experts
    assert (same.guidance_scale, same.guidance_scale_2) == (6.0, 6.0)
    assert resolve_settings(a14b, GenerationOptions("p", guidance_scale_2=1.5)).guidance_scale_2 == 1.5
    with pytest.raises(InvalidInput, match="guidance_scale_2.*ti2v-5b has one transformer"):
        resolve_settings(ti2v, GenerationOptions("p", guidance_scale_2=2.0))
    with pytest.raises(InvalidInput, match="guidance_scale_2"):
        resolve_settings(a14b, GenerationOptions("p", guidance_scale_2=21.0))


def test_small_model_refuses_720p_by_name():
    with pytest.raises(InvalidInput, match="t2v-1.3b supports 480p only"):
        CATALOGUE["t2v-1.3b"].size("720p")


def test_resolve_tiny_folder_and_repo_ids(tiny_dir, tmp_path):
    assert resolve_model("tiny").name == "tiny"
    assert resolve_model(str(tiny_dir)).name == "tiny" and resolve_model(str(tiny_dir)).source == str(tiny_dir)
    assert resolve_model("Wan-AI/Wan2.1-T2V-1.3B-Diffusers").name == "t2v-1.3b"
    assert resolve_model("someone/wan-finetune").source == "someone/wan-finetune"
    with pytest.raises(ModelNotFound, match="not a catalogue variant"):
        resolve_model("t2v-7b")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelNotFound, match="model_index.json"):
        resolve_model(str(tmp_path))


def test_every_tiny_stand_in_is_told_apart_by_its_folder():
    """A folder is identified by its transformer config and pipeline layout: a new variant whose tiny
    stand-in looks like another's needs none (the other stands in for both) or a layout of its own."""
    looks = {}
    for kind in TINY_KINDS:
        spec = tiny_spec(kind=kind)
        look = (spec.arch, spec.boundary_ratio is not None, spec.expand_timesteps)
        assert look not in looks, f"tiny {kind} looks like tiny {looks.get(look)}"
        looks[look] = kind


def test_folder_with_real_config_gets_catalogue_defaults(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer").mkdir()
    config = CATALOGUE["t2v-1.3b"].arch.transformer_config()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(tmp_path))
    assert spec.resolutions == ("480p",) and spec.source == str(tmp_path)


def docs_hook():
    """docs/hooks.py, the mkdocs hook that writes the generated tables into their pages, loaded as mkdocs loads
    it (a file, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "hooks.py"
    spec = importlib.util.spec_from_file_location("docs_hooks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "page, command",
    [("models.md", ("models",)), ("memory.md", ("models", "--memory"))],
    ids=["catalogue", "memory"],
)
def test_the_docs_site_shows_each_table_as_the_cli_prints_it(cli, page, command):
    """The pages hold a marker, not a pasted table (a new variant touches no page); the site's build puts in
    what the command prints."""
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    marker = f"<!-- generated: wanlora {' '.join(command)} -->\n"
    assert source.count(marker) == 1
    note = source.split(marker, 1)[1].split("\n", 1)[0]  # what the reader of the raw file sees in its place
    assert "from the catalogue" in note and f"`wanlora {' '.join(command)}` prints" in note
    assert "| variant |" not in source  # no pasted copy to fall behind the catalogue
    built = docs_hook().on_page_markdown(source, page=None, config=None, files=None)
    assert built == source.replace(marker, marker + cli(*command).stdout + "\n")


def test_the_docs_hook_refuses_a_marker_it_has_no_table_for():
    from mkdocs.exceptions import PluginError

    with pytest.raises(PluginError, match="wanlora modles"):
        docs_hook().on_page_markdown("<!-- generated: wanlora modles -->\n", page=None, config=None, files=None)


def test_each_task_record_says_how_many_images_its_requests_take():
    from dataclasses import replace

    from PIL import Image

    from wanlora.models import I2V
    from wanlora.request import resolve_images

    first, last = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), "white")
    taken = {}
    for name, spec in CATALOGUE.items():
        taken[name] = []
        for images in ((), (first,), (first, last)):
            try:
                taken[name].append(len(resolve_images(spec, *images, *[None] * (2 - len(images)))))
            except InvalidInput:
                pass
    assert {name: counts for name, counts in taken.items() if counts != [0]} == {  # text-to-video takes none
        "i2v-14b-480p": [1],
        "i2v-14b-720p": [1],
        "flf2v-14b": [1, 2],  # a last frame, on the transformer that embeds two
        "i2v-a14b": [1],
        "ti2v-5b": [0, 1],
    }
    two_frames = replace(CATALOGUE["flf2v-14b"], task=replace(I2V, min_images=2))  # a task that needs both
    with pytest.raises(InvalidInput, match="needs a last frame too"):
        resolve_images(two_frames, first, None)


def test_each_task_loads_as_its_diffusers_pipeline_class():
    import diffusers

    from wanlora.tiny import tiny_pipeline

    for kind in TINY_KINDS:
        task = tiny_spec(kind=kind).task
        assert type(tiny_pipeline(kind=kind)) is getattr(diffusers, task.pipeline_class), kind


def test_a_task_compared_with_a_name_is_an_error_not_false():
    spec = CATALOGUE["t2v-14b"]
    with pytest.raises(TypeError, match="ask the record"):
        assert spec.task == "t2v"
    assert spec.task == CATALOGUE["t2v-1.3b"].task != CATALOGUE["i2v-a14b"].task and spec.task.name == "t2v"
    assert hash(spec.task) == hash(CATALOGUE["t2v-1.3b"].task)  # a record stays hashable
