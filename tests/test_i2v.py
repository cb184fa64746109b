"""Image-to-video on the tiny I2V model: resize rules, bad images, I2V LoRAs, CLI end to end."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.images import resize_image
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.models import tiny_spec
from wanlora.tiny import tiny_transformer

from .builders import ALL_LAYOUTS, write_lora
from .conftest import probe, run_cli
from .lora_helpers import assert_weights, merge, snapshot
from .test_reference import image2video_size

SMALL = {"num_frames": 9, "num_inference_steps": 2, "fps": 12, "seed": 5}
TINY_I2V_ARCH = tiny_spec(kind="i2v").arch


@pytest.fixture(scope="module")
def i2v_pipe():
    return WanLoraPipeline.from_pretrained("tiny-i2v")


def photo(tmp_path, size=(200, 120), name="photo.png"):
    image = Image.new("RGB", size, (30, 60, 90))
    image.paste((250, 250, 250), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    path = tmp_path / name
    image.save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("size", [(200, 120), (90, 160), (100, 104)])
def test_the_frame_keeps_the_image_aspect_unless_a_shape_is_asked_for(i2v_pipe, tmp_path, size):
    path = photo(tmp_path, size)
    area = 112 * 64  # the tiny model's 480p presets stand in for 832x480
    video = i2v_pipe.generate("a fox", image=path, **SMALL)
    assert video.frames.shape[1:3] == image2video_size(*size, area)[::-1]
    assert video.metadata["image_size"] == list(size) and video.metadata["framing"] == "the image's aspect"
    asked = i2v_pipe.generate("a fox", image=path, aspect_ratio="9:16", **SMALL)
    assert asked.frames.shape[1:3] == (112, 64) and asked.metadata["framing"] == "as asked"


def test_resize_modes():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 50, 100))  # a blue band on the left quarter
    fit = np.asarray(resize_image(image, (100, 100), "fit"))
    assert fit.shape == (100, 100, 3) and fit[50, 5, 0] > 200  # the band was cropped away: red at the left edge
    pad = np.asarray(resize_image(image, (100, 100), "pad"))
    assert pad[5, 50].max() == 0 and pad[50, 50, 0] > 200  # black bars above and below, the image in the middle
    stretch = np.asarray(resize_image(image, (100, 100), "stretch"))
    assert stretch[50, 5, 2] > 200 and stretch[50, 30, 0] > 200  # the band is squeezed, not cut
    with pytest.raises(InvalidInput, match="resize"):
        resize_image(image, (100, 100), "zoom")


@pytest.mark.slow
def test_the_pipeline_receives_the_resized_image(i2v_pipe, tmp_path, monkeypatch):
    seen = {}
    original = type(i2v_pipe.diffusers_pipeline).__call__

    def spy(self, *args, **kwargs):
        seen.update(image=kwargs["image"].size, last=kwargs.get("last_image") and kwargs["last_image"].size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(i2v_pipe.diffusers_pipeline), "__call__", spy)
    array = np.full((120, 200, 3), 128, np.uint8)
    i2v_pipe.generate("a fox", image=array, resize="pad", aspect_ratio="16:9", **SMALL)
    assert seen == {"image": (112, 64), "last": None}
    with pytest.raises(InvalidInput, match="takes one image; a last frame needs a first-last-frame model"):
        i2v_pipe.generate("a fox", image=array, last_image=Image.new("RGB", (64, 64)), **SMALL)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.png", "existing image file"),
        (lambda p: p.joinpath("notes.png"), "readable image"),
        (lambda p: photo(p, (10, 10), "tiny.png"), "at least 32 pixels"),
        (lambda p: np.zeros((64, 64, 3), np.float32), "uint8"),
    ],
)
def test_bad_images_are_clear_errors(i2v_pipe, tmp_path, make, message):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidInput, match=message):
        i2v_pipe.generate("a fox", image=make(tmp_path), **SMALL)


def test_an_image_link_that_drips_meets_the_download_deadline(offline_net, file_server, monkeypatch, tmp_path):
    """A server sending a byte now and then, each within the read timeout, must not hold a request for ever."""
    from wanlora.errors import LoraDownloadError
    from wanlora.images import load_image

    from .servers import Route

    monkeypatch.setenv("WANLORA_DOWNLOAD_TIMEOUT", "1")
    file_server.routes["/drip.png"] = Route(photo(tmp_path).read_bytes(), content_type="image/png", drip=0.1)
    with pytest.raises(LoraDownloadError, match=r"^image .*drip.png: fetching took longer than 1 s"):
        load_image(f"{file_server.url}/drip.png")


def test_task_and_image_must_agree(i2v_pipe, tiny_pipe, tmp_path):
    with pytest.raises(InvalidInput, match="needs a start image"):
        i2v_pipe.generate("a fox", **SMALL)
    with pytest.raises(InvalidInput, match="text-to-video; use an image-to-video model"):
        tiny_pipe.generate("a fox", image=photo(tmp_path), **SMALL)


@pytest.mark.slow
def test_image_tokens_and_text_tokens_stay_apart(i2v_pipe, tmp_path):
    """diffusers takes all but the last 512 context tokens as image tokens: the tiny model pads to 512."""
    seen = []
    handle = i2v_pipe.transformer.blocks[0].attn2.add_k_proj.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[1])
    )
    try:
        i2v_pipe.generate("a fox", image=photo(tmp_path), **SMALL)
    finally:
        handle.remove()
    clip_tokens = (32 // 8) ** 2 + 1  # the tiny CLIP: 32 px images, 8 px patches, one class token
    assert set(seen) == {clip_tokens}


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_i2v_loras_merge_the_image_layers_by_the_math(tmp_path, layout):
    model = tiny_transformer(TINY_I2V_ARCH)
    base = snapshot(model)
    expected = write_lora(tmp_path / "l.safetensors", model, layout, seed=4)
    if layout in ("original", "kohya", "loha"):
        assert any("add_k_proj" in name for name in expected)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 0.7)])
    assert_weights(model, base, [(expected, 0.7)])


def test_norm_k_img_and_img_emb_deltas(tmp_path):
    model = tiny_transformer(TINY_I2V_ARCH)
    base = snapshot(model)
    norm = torch.randn(24) * 0.01
    ff = torch.randn(32, 32) * 0.01
    save_file(
        {"diffusion_model.blocks.1.cross_attn.norm_k_img.diff": norm, "diffusion_model.img_emb.proj.1.diff": ff},
        tmp_path / "l.safetensors",
    )
    lora = read_lora(tmp_path / "l.safetensors")
    merge(LoraMerger(model), [(lora, 2.0)])
    assert_weights(
        model,
        base,
        [
            (
                {
                    "blocks.1.attn2.norm_added_k.weight": norm,
                    "condition_embedder.image_embedder.ff.net.0.proj.weight": ff,
                },
                2.0,
            )
        ],
    )


def test_cli_image_to_video_with_an_i2v_lora(tmp_path):
    folder = tmp_path / "tiny-i2v"
    assert run_cli("tiny-model", str(folder), "--i2v").returncode == 0
    assert (folder / "image_encoder" / "config.json").is_file()
    assert (folder / "image_processor" / "preprocessor_config.json").is_file()
    lora = tmp_path / "i2v.safetensors"
    write_lora(lora, tiny_transformer(TINY_I2V_ARCH), "original")
    out = tmp_path / "out.mp4"
    result = run_cli(
        "generate",
        "a fox runs",
        "--model",
        str(folder),
        "--image",
        str(photo(tmp_path, (90, 160))),
        "--lora",
        f"{lora}:0.8",
        "--frames",
        "9",
        "--steps",
        "2",
        "--fps",
        "12",
        "--seed",
        "1",
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    got = probe(out)
    width, height = image2video_size(90, 160, 112 * 64)  # the image's aspect, as the reference frames it
    assert (got.codec, got.pix_fmt, got.width, got.height, len(got.frames)) == ("h264", "yuv420p", width, height, 9)
    for bad, message in ((["--image", str(tmp_path / "nope.png")], "existing image file"), ([], "needs a start image")):
        refused = run_cli("generate", "a fox", "--model", str(folder), *bad, "-o", str(tmp_path / "x.mp4"))
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
    t2v = run_cli(
        "generate", "a fox", "--model", "tiny", "--image", str(photo(tmp_path)), "-o", str(tmp_path / "y.mp4")
    )
    assert t2v.returncode == 2 and "text-to-video" in t2v.stderr
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "y.mp4").exists()
