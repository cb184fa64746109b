"""Generated inputs: whatever a request holds, only wanlora's own errors come out, short and secret-free.

WANLORA_FUZZ_EXAMPLES sets the examples per suite (default 25, under a minute in all):
`WANLORA_FUZZ_EXAMPLES=500 pytest tests/test_malformed_inputs.py` for a deeper run. Network inputs go to a
server on 127.0.0.1 only; nothing here resolves a real host name.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save

from wanlora.errors import InvalidInput, WanLoraError
from wanlora.lora.fetch import Credentials, check_reference
from wanlora.lora.layouts import read_lora
from wanlora.lora.selection import parse_requests
from wanlora.models import tiny_spec
from wanlora.options import GenerationOptions
from wanlora.request import resolve_request
from wanlora.settings import LORA_STRENGTH_RANGE

from .lora_helpers import assert_bitwise, fetch_lora, snapshot
from .servers import FileServer, Route

pytestmark = pytest.mark.slow  # generated inputs (WANLORA_FUZZ_EXAMPLES of each kind)

EXAMPLES = int(os.environ.get("WANLORA_FUZZ_EXAMPLES", "25"))
SECRET = "S3CR3Tvalue"
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 25, suppress_health_check=list(HealthCheck)
)


@contextmanager
def only_our_errors():
    """The block may fail only with a WanLoraError, in under 2,000 characters, naming no secret."""
    try:
        yield
    except WanLoraError as exc:
        message = str(exc)
        assert len(message) < 2000, message[:300]
        assert SECRET not in message
        error = exc.__cause__ or exc.__context__
        while error is not None:  # nor does anything chained below it
            assert SECRET not in str(error)
            error = error.__cause__ or error.__context__


# ------------------------------------------------------------------ reference strings

pieces = st.sampled_from(
    [
        "https://",
        "http://",
        "civitai:",
        "owner/repo",
        "/",
        "//",
        "..",
        "@",
        ":",
        "?",
        "#",
        "%2e",
        "token=" + SECRET,
        "sig=" + SECRET,
        "user:" + SECRET + "@",
        "huggingface.co/",
        "civitai.com",
        "/api/download/models/",
        "replicate.com/",
        "models/12?modelVersionId=",
        "x.safetensors",
        "\x00",
        "\n",
        " ",
        "\udcff",
        "é",
        "[::1",
        "~",
        "\\",
        "12",
        "-1.5",
    ]
)
references = st.lists(st.one_of(pieces, st.text(max_size=8)), max_size=12).map("".join)


@FUZZ
@given(ref=references, strength=st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3)))
def test_any_reference_is_parsed_or_refused_in_our_words(ref, strength):
    with only_our_errors():
        check_reference(ref, Credentials(local_files=False))
    with only_our_errors():
        parse_requests([(ref, strength)])


# ------------------------------------------------------------------ safetensors files

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.bool,
]
KEYS = """lora_unet_blocks_0_self_attn_q.lora_down.weight lora_unet_blocks_0_self_attn_q.lora_up.weight
lora_unet_blocks_0_self_attn_q.alpha diffusion_model.blocks.1.ffn.0.diff diffusion_model.blocks.0.diff_m
diffusion_model.head.head.diff_b lycoris_blocks_0_ffn_2.hada_w1_a lycoris_blocks_0_ffn_2.hada_w1_b
lycoris_blocks_0_ffn_2.hada_w2_a lycoris_blocks_0_ffn_2.hada_w2_b lycoris_blocks_1_ffn_0.lokr_w1
lycoris_blocks_1_ffn_0.lokr_w2 transformer.blocks.0.attn2.to_k.lora_A.weight
transformer.blocks.0.attn2.to_k.lora_B.weight blocks.9.nothing.lora_A.weight junk""".split()
shapes = st.lists(st.sampled_from([0, 1, 2, 4, 12, 24, 32]), max_size=4).map(tuple)
tensors = st.builds(
    lambda dtype, shape, scale: (torch.randn(shape) * scale).to(dtype),
    st.sampled_from(DTYPES),
    shapes,
    st.sampled_from([0.0, 0.01, 1.0, 1e30]),
)
state_dicts = st.dictionaries(st.sampled_from(KEYS), tensors, min_size=1, max_size=6)


@FUZZ
@given(contents=state_dicts, strength=st.floats(*LORA_STRENGTH_RANGE))
def test_any_safetensors_contents_merge_exactly_or_change_nothing(contents, strength, tmp_path_factory, fuzz_pipe):
    path = tmp_path_factory.mktemp("st") / "lora.safetensors"
    path.write_bytes(save(contents))
    before = snapshot(fuzz_pipe.transformer)
    try:
        fuzz_pipe.set_loras([(str(path), strength)])
    except WanLoraError as exc:
        assert len(str(exc)) < 2000
        assert_bitwise(fuzz_pipe.transformer, before)
    fuzz_pipe.set_loras([])


headers = st.one_of(
    st.dictionaries(
        st.text(max_size=12),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "BF16", "F8_E4M3", "BOOL", "X", 3]),
                "shape": st.lists(st.integers(-2, 5), max_size=3),
                "data_offsets": st.lists(st.integers(-1, 64), max_size=3),
            }
        ),
        max_size=3,
    ).map(json.dumps),
    st.text(max_size=40),
)


@FUZZ
@given(header=headers, length=st.one_of(st.none(), st.integers(0, 2**64 - 1)), tail=st.binary(max_size=64))
def test_any_safetensors_header_is_read_or_refused_in_our_words(header, length, tail, tmp_path_factory):
    raw = header.encode("utf-8", "surrogatepass")
    path = tmp_path_factory.mktemp("hd") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + tail)
    with only_our_errors():
        from wanlora.weights.sniff import read_header

        read_header(path, "x")
        read_lora(path)


@pytest.fixture(scope="module")
def fuzz_pipe():
    from wanlora import WanLoraPipeline

    return WanLoraPipeline.from_pretrained("tiny")


# ------------------------------------------------------------------ HTTP answers

statuses = st.sampled_from([200, 201, 204, 206, 301, 302, 307, 308, 304, 400, 401, 403, 404, 410, 416, 429, 500, 503])
encodings = st.sampled_from([None, "gzip", "br", "deflate", "gzip, gzip, gzip, gzip, gzip, gzip", "x-nonsense"])
locations = st.sampled_from(
    [
        "/ok.safetensors",
        "http://[::1",
        "http://127.0.0.1:1/x",
        "ftp://h/x",
        "//",
        "/loop",
        f"/ok.safetensors?token={SECRET}",
        "http://169.254.169.254/latest",
    ]
)
bodies = st.sampled_from([b"", b"<html>login</html>", b'{"error": 1}', b"\x80\x04junk", b"PK\x03\x04zip", b"\x00" * 64])


@FUZZ
@given(status=statuses, encoding=encodings, location=locations, body=bodies, html=st.booleans())
def test_any_http_answer_is_a_lora_or_our_error(status, encoding, location, body, html, loopback):
    server = loopback
    redirect = location if status in (301, 302, 307, 308) else None
    server.routes["/x"] = Route(
        body,
        status=status,
        redirect=redirect,
        encoding=encoding,
        content_type="text/html" if html else "application/octet-stream",
    )
    with only_our_errors():
        fetch_lora(f"{server.url}/x?sig={SECRET}")


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """A loopback server for the module, with a fresh cache, loopback allowed, fast retries and a short deadline."""
    from wanlora import net

    patch = pytest.MonkeyPatch()
    patch.setenv("WANLORA_CACHE", str(tmp_path_factory.mktemp("fuzz-cache")))
    patch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1")
    patch.setenv("WANLORA_DOWNLOAD_TIMEOUT", "10")
    patch.setattr(net, "BACKOFF_SECONDS", 0.001)
    patch.setattr(net, "MAX_RETRY_AFTER", 0)
    with FileServer() as server:
        server.routes["/ok.safetensors"] = Route(save({"junk": torch.zeros(1)}))
        server.routes["/loop"] = Route(redirect="/loop")
        yield server
    patch.undo()


# ------------------------------------------------------------------ tar members

member_names = "lora.safetensors ../x.safetensors /abs.safetensors a/b/c.safetensors x.txt . dir/".split() + [""]
member = st.tuples(st.sampled_from(member_names), st.sampled_from(["file", "dir", "symlink"]), st.binary(max_size=32))
members = st.lists(member, max_size=5)


@FUZZ
@given(entries=members)
def test_any_tar_is_unpacked_to_its_one_lora_or_refused_in_our_words(entries, loopback):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[kind]
            info.linkname = "/etc/passwd" if kind == "symlink" else ""
            info.size = len(data) if kind == "file" else 0
            try:
                tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
            except (ValueError, tarfile.TarError):
                reject()  # tarfile itself will not write this member
    loopback.routes["/t.tar"] = Route(buffer.getvalue())
    with only_our_errors():
        fetch_lora(f"{loopback.url}/t.tar")


# ------------------------------------------------------------------ images and prompts


def image_bytes(kind: str, width: int, height: int, cut: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB" if kind != "PNG-1" else "1", (width, height)).save(buffer, kind.split("-")[0])
    data = buffer.getvalue()
    return data[: len(data) - cut]


@FUZZ
@given(
    kind=st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "PNG-1"]),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    cut=st.integers(0, 40),
    garbage=st.binary(max_size=64),
)
def test_any_image_is_read_or_refused_in_our_words(kind, width, height, cut, garbage, tmp_path_factory):
    from wanlora.images import load_image

    folder = tmp_path_factory.mktemp("img")
    for data in (image_bytes(kind, width, height, cut), garbage):
        (folder / "i").write_bytes(data)
        try:
            loaded = load_image(str(folder / "i"))
        except InvalidInput as exc:
            assert len(str(exc)) < 2000
        else:
            assert loaded.mode == "RGB" and min(loaded.size) >= 32


@FUZZ
@given(prompt=st.text(), negative=st.one_of(st.none(), st.text(max_size=20)))
def test_any_prompt_is_taken_or_refused_before_any_work(prompt, negative):
    assume(len(prompt) < 10_000)
    try:
        request = resolve_request(tiny_spec(), GenerationOptions(prompt, negative_prompt=negative, num_frames=5))
    except InvalidInput as exc:
        assert len(str(exc)) < 2000
        return
    from wanlora.video import ffmetadata

    ffmetadata(request.settings.as_dict()).encode("utf-8")  # what writing the tags will need
