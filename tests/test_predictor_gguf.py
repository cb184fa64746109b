"""The predictor serves a GGUF transformer (WANLORA_TRANSFORMER) for the variant it names, and only for that one:
driven through the real service, on tiny stand-ins in a weights folder, as Cog's managed weights hold them."""

from __future__ import annotations

import numpy as np
import pytest

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.frontends.service import PredictorInputs, VideoService
from wanlora.models import tiny_spec
from wanlora.tiny import tiny_transformer, write_tiny_model
from wanlora.weights.formats.gguf import FORMAT
from wanlora.weights.gguf.linear import GgufLinear

from .conftest import probe, recorded
from .gguf_files import file_name, write_transformer

WIDE = tiny_spec(kind="t2v", wide=True)  # GGUF's K-quants need rows of whole 256-weight blocks
REQUEST = {"prompt": "a fox", "num_frames": 5, "sample_steps": 1, "fps": 12, "seed": 11}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A weights folder whose T2V 14B is a tiny wide stand-in and whose TI2V 5B a tiny one, and a Q4_K_M file of
    another transformer for the wide one, in city96's layout."""
    root = tmp_path_factory.mktemp("predictor-gguf")
    weights = root / "weights"
    wide = write_tiny_model(weights / "Wan-AI" / "Wan2.1-T2V-14B-Diffusers", kind="t2v", wide=True)
    write_tiny_model(weights / "Wan-AI" / "Wan2.2-TI2V-5B-Diffusers", kind="ti2v-5b")
    gguf = write_transformer(root / file_name("Q4_K_M"), tiny_transformer(WIDE.arch, seed=3), "Q4_K_M")
    return {"weights": weights, "wide": wide, "gguf": gguf, "root": root}


@pytest.fixture
def served(files, monkeypatch):
    """The environment of a predictor without a model override: the `model` input chooses, from the weights folder."""
    monkeypatch.setenv("WANLORA_WEIGHTS", str(files["weights"]))
    monkeypatch.delenv("WANLORA_TRANSFORMER", raising=False)
    return files


def run(service: VideoService, out_dir, model: str):
    out_dir.mkdir()
    return service.generate(PredictorInputs(model=model, **REQUEST), out_dir=out_dir)


def gguf_layers(service: VideoService) -> list[GgufLinear]:
    """The resident transformer's block linears that GGUF holds."""
    return list(FORMAT.layers(service.resident.pipe.transformer).values())


@pytest.mark.slow  # three tiny generations: about 8 s
def test_the_variant_with_an_entry_runs_the_gguf_file_as_the_library_does_and_others_their_own(
    served, monkeypatch, tmp_path
):
    monkeypatch.setenv("WANLORA_TRANSFORMER", f"t2v-14b={served['gguf']}")
    service = VideoService(override="", i2v_override="")
    gguf = run(service, tmp_path / "gguf", "14b")
    assert service.resident.model == "t2v-14b" and recorded(gguf.path)["weights"] == "gguf"
    layers = gguf_layers(service)
    assert len(layers) == 20 and all(isinstance(layer, GgufLinear) for layer in layers)

    library = WanLoraPipeline.from_pretrained(str(served["wide"]), transformer=str(served["gguf"]))
    video = library.generate("a fox", resolution="480p", seed=11, num_frames=5, num_inference_steps=1, fps=12)
    want = probe(video.save(tmp_path / "library.mp4", quality=80)).frames
    assert np.array_equal(probe(gguf.path).frames, want)  # the same file, seed and request: the same video

    other = run(service, tmp_path / "other", "2.2-5b")  # another variant loads in its place, with its own weights
    assert service.resident.model == "ti2v-5b" and recorded(other.path)["weights"] == "full precision"
    assert not gguf_layers(service)
    service.load("t2v-14b")  # and back in its place: the file again
    assert len(gguf_layers(service)) == 20


def test_entries_are_read_per_variant_a_pair_for_a14b(served, monkeypatch):
    high, low = served["root"] / "high.gguf", served["root"] / "low.gguf"
    for path in (high, low):
        path.write_bytes(b"")  # only named here: a file is read when its variant loads
    setting = f" t2v-14b = {served['gguf']} ; t2v-a14b={high}, {low};ti2v-5b={served['wide']}/transformer;"
    monkeypatch.setenv("WANLORA_TRANSFORMER", setting)
    assert VideoService(override="", i2v_override="").transformers == {
        "t2v-14b": str(served["gguf"]),
        "t2v-a14b": (str(high), str(low)),
        "ti2v-5b": f"{served['wide']}/transformer",  # a folder holding one
    }


@pytest.mark.parametrize(
    ("item", "allowed"),
    [
        ("t2v-14b", "VARIANT=PATH items separated by ; (e.g. t2v-14b=/src/weights/wan2.1-t2v-14b-Q4_K_M.gguf)"),
        ("=GGUF", "VARIANT=PATH items separated by ; (e.g. t2v-14b=/src/weights/wan2.1-t2v-14b-Q4_K_M.gguf)"),
        ("t2v-14b=", "VARIANT=PATH items separated by ; (e.g. t2v-14b=/src/weights/wan2.1-t2v-14b-Q4_K_M.gguf)"),
        ("t2v-7b=GGUF", "a variant before the =: t2v-14b, t2v-1.3b"),
        ("t2v-14b=ROOT/absent.gguf", "an existing file or folder: ROOT/absent.gguf is missing"),
        ("t2v-14b=ROOT/notes.txt", "a .safetensors or .gguf file or a folder: ROOT/notes.txt is not one"),
        ("t2v-14b=GGUF,GGUF", "a file or folder after t2v-14b="),
        ("t2v-a14b=GGUF,", "a file or folder, or HIGH,LOW: two files after t2v-a14b="),
        ("t2v-a14b=GGUF,ROOT", "a .safetensors or .gguf file: ROOT is not one"),
    ],
)
def test_a_setting_that_cannot_be_used_stops_the_predictor_at_startup_naming_the_item(
    item, allowed, served, monkeypatch
):
    (served["root"] / "notes.txt").write_text("not a transformer")
    item = item.replace("GGUF", str(served["gguf"])).replace("ROOT", str(served["root"]))
    allowed = allowed.replace("ROOT", str(served["root"]))
    monkeypatch.setenv("WANLORA_TRANSFORMER", f"t2v-1.3b={served['gguf']};{item}")  # the item at fault is named
    with pytest.raises(InvalidInput) as refused:
        VideoService(override="", i2v_override="")
    message = str(refused.value)
    assert message.startswith("WANLORA_TRANSFORMER=") and item in message
    named, why = message.split(" is not allowed: ")
    assert why.startswith(allowed) and "t2v-1.3b" not in named


def test_a_variant_named_twice_is_refused(served, monkeypatch):
    monkeypatch.setenv("WANLORA_TRANSFORMER", f"t2v-14b={served['gguf']};t2v-14b={served['wide']}")
    with pytest.raises(InvalidInput, match="one item per variant: t2v-14b has two$"):
        VideoService(override="", i2v_override="")
