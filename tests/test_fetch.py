"""LoRA references from anywhere, against loopback stand-ins: never the real network."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from safetensors.torch import save

from wanlora import net
from wanlora.errors import InvalidInput, LoraAuthRequired, LoraDownloadError, LoraFormatError, LoraNotFound
from wanlora.lora.cache import LoraCache
from wanlora.lora.fetch import Credentials
from wanlora.lora.refs import parse_ref
from wanlora.tiny import tiny_transformer

from .builders import lora_tensors
from .conftest import file_size_limit, run_cli
from .lora_helpers import fetch_lora, tar_of
from .servers import FileServer, HubRepo, Route, civitai_version

SHAPES = {n: tuple(p.shape) for n, p in tiny_transformer().named_parameters()}


def lora_bytes(seed: int = 0, metadata: dict | None = None) -> bytes:
    tensors, _ = lora_tensors(SHAPES, "original", seed=seed, targets=["blocks.0.attn1.to_q"])
    return save(tensors, metadata=metadata)


# ------------------------------------------------------------------ the grammar


@pytest.mark.parametrize(
    ("ref", "kind", "canonical"),
    [
        ("alice/wan-style", "hub_or_replicate", "hf:alice/wan-style"),
        ("alice/wan-style/loras/v2.safetensors", "hub", "hf:alice/wan-style@main/loras/v2.safetensors"),
        ("alice/wan-style@dev", "hub", "hf:alice/wan-style@dev"),
        ("alice/wan-style@dev/x.safetensors", "hub", "hf:alice/wan-style@dev/x.safetensors"),
        ("https://huggingface.co/alice/wan-style", "hub_or_replicate", "hf:alice/wan-style"),
        (
            "https://huggingface.co/alice/wan-style/blob/main/sub/x.safetensors?download=true",
            "hub",
            "hf:alice/wan-style@main/sub/x.safetensors",
        ),
        (
            "https://huggingface.co/alice/wan-style/resolve/0123abc/x.safetensors",
            "hub",
            "hf:alice/wan-style@0123abc/x.safetensors",
        ),
        ("https://civitai.com/models/1234/some-style?modelVersionId=5678", "civitai", "civitai:5678"),
        ("https://civitai.com/models/1234", "civitai", "civitai-model:1234"),
        ("https://civitai.com/api/download/models/5678?type=Model&token=SECRET", "civitai", "civitai:5678"),
        ("civitai:5678", "civitai", "civitai:5678"),
        ("https://replicate.com/bob/wan-lora", "replicate", "replicate:bob/wan-lora"),
        ("https://replicate.com/bob/wan-lora/versions/abc123", "replicate", "replicate:bob/wan-lora@abc123"),
        (
            "https://cdn.example.com/x.safetensors?X-Amz-Signature=zz&X-Amz-Credential=yy&id=3",
            "url",
            "https://cdn.example.com/x.safetensors?id=3",
        ),
        (
            "https://replicate.delivery/xezq/abc/trained_model.tar",
            "url",
            "https://replicate.delivery/xezq/abc/trained_model.tar",
        ),
    ],
)
def test_reference_grammar(ref, kind, canonical):
    source = parse_ref(ref)
    assert (source.kind, source.canonical) == (kind, canonical)
    assert "SECRET" not in source.canonical


@pytest.mark.parametrize(
    "ref", ["", "not a ref", "ftp://x/y.safetensors", "https://civitai.com/user/bob", "civitai:abc"]
)
def test_malformed_references_say_what_is_accepted(ref):
    with pytest.raises(LoraNotFound):
        parse_ref(ref)


# ------------------------------------------------------------------ plain HTTPS downloads


def test_download_is_cached_verified_and_reused_without_network(offline_net, file_server):
    body = lora_bytes(metadata={"modelspec.trigger_phrase": "wanstyle"})
    file_server.routes["/x.safetensors"] = Route(body)
    first = fetch_lora(f"{file_server.url}/x.safetensors")
    assert first.path.read_bytes() == body and first.trigger_words == ["wanstyle"]
    again = fetch_lora(f"{file_server.url}/x.safetensors")
    assert again.path == first.path and file_server.requests["/x.safetensors"] == 1
    [entry] = LoraCache().entries()
    assert (entry.size, entry.source) == (len(body), f"{file_server.url}/x.safetensors")
    assert len(entry.sha256) == 64


def test_redirects_retries_and_resume(offline_net, file_server, monkeypatch):
    monkeypatch.setattr(net, "CHUNK", 256)  # the bytes read before the drop are kept
    body = lora_bytes(seed=1)
    file_server.routes["/moved"] = Route(redirect="/flaky")
    file_server.routes["/flaky"] = Route(body, fail_first=2)
    assert fetch_lora(f"{file_server.url}/moved").path.read_bytes() == body

    file_server.routes["/dropped"] = Route(body, drop_first=1)
    assert fetch_lora(f"{file_server.url}/dropped").path.read_bytes() == body
    [sent] = [h["Range"] for h in file_server.headers_seen if h.get("Range")]
    assert 0 < int(sent.removeprefix("bytes=").rstrip("-")) <= len(body) // 2  # resumed, not restarted

    file_server.routes["/no-range"] = Route(body, drop_first=1, ignore_range=True)
    assert fetch_lora(f"{file_server.url}/no-range").path.read_bytes() == body  # started over


@pytest.mark.parametrize(
    ("route", "error", "words"),
    [
        (Route(status=401), LoraAuthRequired, r"refused access \(401\)"),
        (Route(status=404), LoraNotFound, r"not found \(404\)"),
        (Route(fail_first=99), LoraDownloadError, "after 4 attempts"),
        (
            Route(b"<!DOCTYPE html><html><title>Log in</title></html>", content_type="text/html"),
            LoraFormatError,
            "HTML page",
        ),
        (Route(b'{"error": "Unauthorized"}'), LoraFormatError, "JSON document"),
        (Route(b"PK\x03\x04" + b"\0" * 100), LoraFormatError, "pickle"),
        (Route(b"\x80\x04\x95" + b"\0" * 100), LoraFormatError, "pickle"),
        (Route(lora_bytes()[:-10]), LoraFormatError, "truncated"),
        (Route(b"\xff" * 64), LoraFormatError, "not a safetensors file"),
        (
            Route(tar_of({"a.safetensors": lora_bytes(), "b.safetensors": lora_bytes(1)})),
            LoraFormatError,
            "exactly one .safetensors",
        ),
    ],
)
def test_refusals_are_typed_and_leave_no_cache_entry(offline_net, file_server, route, error, words):
    file_server.routes["/f"] = route
    with pytest.raises(error, match=words):
        fetch_lora(f"{file_server.url}/f")
    assert LoraCache().entries() == []
    assert list((LoraCache().root / "partial").glob("*")) == [] if (LoraCache().root / "partial").exists() else True


@pytest.mark.parametrize("header_bytes", [0x280, 0x380, 0x480, 0x580, 0x10280])
def test_a_header_length_that_looks_like_a_pickle_marker_is_still_safetensors(tmp_path, header_bytes):
    """0x280 bytes of header begin the file with 80 02, a pickle's protocol marker: the framing decides."""
    import json
    import struct

    from wanlora.weights.sniff import read_header

    entry = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    text = json.dumps(entry).encode().ljust(header_bytes, b" ")  # safetensors pads its header with spaces
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", header_bytes) + text + b"\0" * 8)
    assert read_header(path, "padded") == entry


def test_size_limit_and_read_timeout(offline_net, file_server, monkeypatch):
    file_server.routes["/big"] = Route(lora_bytes())
    monkeypatch.setenv("WANLORA_MAX_LORA_GB", "0.000001")
    with pytest.raises(LoraDownloadError, match="over the .* GiB limit"):
        fetch_lora(f"{file_server.url}/big")
    monkeypatch.delenv("WANLORA_MAX_LORA_GB")
    monkeypatch.setattr(net, "READ_TIMEOUT", 0.2)
    monkeypatch.setattr(net, "MAX_ATTEMPTS", 2)
    file_server.routes["/slow"] = Route(lora_bytes(), delay=1.0)
    with pytest.raises(LoraDownloadError, match="failed after 2 attempts"):
        fetch_lora(f"{file_server.url}/slow")
    assert LoraCache().entries() == []


def test_tar_with_one_lora_is_unpacked_and_nothing_escapes(offline_net, file_server, tmp_path):
    body = lora_bytes(seed=3)
    file_server.routes["/w.tar"] = Route(tar_of({"../../escape.safetensors": body, "README.txt": b"hi"}))
    assert fetch_lora(f"{file_server.url}/w.tar").path.read_bytes() == body
    assert not list(tmp_path.rglob("escape.safetensors"))
    file_server.routes["/two.tar"] = Route(tar_of({"x/lora.safetensors": body, "x/other.safetensors": lora_bytes()}))
    assert fetch_lora(f"{file_server.url}/two.tar").path.read_bytes() == body


# ------------------------------------------------------------------ address safety (mocked DNS)


@pytest.mark.parametrize(
    ("address", "opt_in", "refused"),
    [
        ("169.254.169.254", True, "link-local"),
        ("fe80::1", True, "link-local"),
        ("10.1.2.3", False, "private"),
        ("127.0.0.1", False, "private"),
        ("::ffff:192.168.1.1", False, "private"),
        ("224.0.0.1", True, "non-routable"),
        ("0.0.0.0", True, "non-routable"),
    ],
)
def test_private_and_link_local_addresses_are_refused(monkeypatch, tmp_path, address, opt_in, refused):
    monkeypatch.setenv("WANLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(net, "resolve_host", lambda host, port: [address])
    if opt_in:
        monkeypatch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1")
    else:
        monkeypatch.delenv("WANLORA_ALLOW_PRIVATE_URLS", raising=False)
    with pytest.raises(LoraDownloadError, match=refused):
        fetch_lora("https://lora.example.com/x.safetensors")


def test_http_needs_the_opt_in(monkeypatch, tmp_path):
    monkeypatch.setenv("WANLORA_CACHE", str(tmp_path))
    monkeypatch.delenv("WANLORA_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setattr(net, "resolve_host", lambda host, port: ["93.184.216.34"])
    with pytest.raises(LoraDownloadError, match="only https"):
        fetch_lora("http://lora.example.com/x.safetensors")


def test_a_redirect_to_cloud_metadata_is_refused_before_connecting(offline_net, file_server, monkeypatch):
    real = net.resolve_host
    monkeypatch.setattr(
        net,
        "resolve_host",
        lambda host, port: ["169.254.169.254"] if host == "metadata.internal" else real(host, port),
    )
    file_server.routes["/x"] = Route(redirect="http://metadata.internal/latest/meta-data/")
    with pytest.raises(LoraDownloadError, match="link-local"):
        fetch_lora(f"{file_server.url}/x")


# ------------------------------------------------------------------ Civitai and Replicate


def test_civitai_page_maps_to_its_download_with_the_token_kept_in_its_host(
    offline_net, file_server, monkeypatch, caplog
):
    body = lora_bytes(seed=4)
    with FileServer() as cdn:
        cdn.routes["/signed/file.safetensors"] = Route(body)
        file_server.routes["/api/v1/models/1234"] = Route(
            json.dumps({"modelVersions": [{"id": 5678, "trainedWords": ["wanstyle"]}]}).encode()
        )
        file_server.routes["/api/download/models/5678"] = Route(
            redirect=f"{cdn.url}/signed/file.safetensors", require_auth="Bearer sekrit-token"
        )
        monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(LoraAuthRequired, match="CIVITAI_API_TOKEN"):
            fetch_lora("https://civitai.com/models/1234")
        got = fetch_lora("https://civitai.com/models/1234", Credentials(civitai_token="sekrit-token"))
        assert got.path.read_bytes() == body and got.trigger_words == ["wanstyle"] and got.source == "civitai:5678"
        assert all("Authorization" not in h for h in cdn.headers_seen)
    cache_text = "".join(p.read_text(errors="ignore") + str(p) for p in LoraCache().root.rglob("*") if p.is_file())
    assert "sekrit" not in cache_text and "sekrit" not in caplog.text


def test_civitai_404_explains_page_id_versus_version_id(offline_net, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    with pytest.raises(LoraNotFound, match="page id, not the version id"):
        fetch_lora("civitai:1234")


@pytest.mark.parametrize(
    ("ref", "credentials"),
    [
        ("civitai:5678", Credentials(civitai_token="sekrit-token")),
        ("https://civitai.com/api/download/models/5678?type=Model&token=sekrit-token", None),
        ("https://civitai.com/models/1234/some-style?modelVersionId=5678", Credentials(civitai_token="sekrit-token")),
    ],
    ids=["civitai-V", "download-link", "page-with-version"],
)
def test_a_civitai_version_asks_civitais_api_for_its_base_model_with_the_token_in_a_header(
    offline_net, file_server, monkeypatch, caplog, ref, credentials
):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    body = lora_bytes(seed=6)
    civitai_version(file_server, 5678, body, "Wan Video 2.2 I2V-A14B", ["wanstyle"], token="sekrit-token")
    caplog.set_level(logging.DEBUG)
    got = fetch_lora(ref, credentials)
    assert (got.base_model, got.trigger_words, got.source) == ("Wan Video 2.2 I2V-A14B", ["wanstyle"], "civitai:5678")
    asked = [h for h in file_server.headers_seen if h.get("Authorization") == "Bearer sekrit-token"]
    assert len(asked) == 2 and file_server.requests["/api/v1/model-versions/5678"] == 1  # the lookup, the file
    cache_text = "".join(p.read_text(errors="ignore") + str(p) for p in LoraCache().root.rglob("*") if p.is_file())
    assert "sekrit" not in cache_text and "sekrit" not in caplog.text


def test_a_cached_version_keeps_its_base_model_and_a_failed_lookup_still_loads(
    offline_net, file_server, monkeypatch, caplog
):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    body = lora_bytes(seed=7)
    ref = civitai_version(file_server, 61, body, "Wan Video 1.3B t2v")
    assert fetch_lora(ref).base_model == "Wan Video 1.3B t2v"
    caplog.set_level(logging.INFO, logger="wanlora")
    file_server.routes["/api/v1/model-versions/61"] = Route(status=503)  # Civitai's API down, its files not
    again = fetch_lora(ref)  # from the cache, with what was learned with it: the check is not skipped
    assert again.base_model == "Wan Video 1.3B t2v" and file_server.full_bodies["/api/download/models/61"] == 1
    assert file_server.requests["/api/v1/model-versions/61"] == 2  # asked again, once: a 503 is not retried
    file_server.routes["/api/download/models/62"] = Route(body)  # a version the API does not know at all
    unknown = fetch_lora("civitai:62")
    assert unknown.path.read_bytes() == body and unknown.base_model is None
    lines = [r.getMessage() for r in caplog.records if "version lookup failed" in r.getMessage()]
    assert [line.split("if any: ")[1][:10] for line in lines] == ["civitai:61", "civitai:62"]


def test_a_private_version_read_once_takes_the_base_model_its_next_lookup_finds(offline_net, file_server, monkeypatch):
    """The loader reads a protected file once and re-checks its access on each load: what Civitai says of it
    then (its base model, its trigger words) replaces what a failed first lookup left unknown."""
    from wanlora.lora.loader import LoraLoader

    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    ref = civitai_version(file_server, 71, lora_bytes(seed=3), "Wan Video 14B t2v", ["inkwash"], token="good")
    answer = file_server.routes["/api/v1/model-versions/71"]
    file_server.routes["/api/v1/model-versions/71"] = Route(status=404)
    loader = LoraLoader()
    ((_, first),) = loader.load(ref, Credentials(civitai_token="good"))
    assert first.civitai_base_model is None
    file_server.routes["/api/v1/model-versions/71"] = answer  # Civitai answers again
    ((_, again),) = loader.load(ref, Credentials(civitai_token="good"))
    assert again is first and (again.civitai_base_model, again.trigger_words) == ("Wan Video 14B t2v", ["inkwash"])


def test_a_corrected_civitai_tag_is_seen_on_the_next_fetch(offline_net, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    ref = civitai_version(file_server, 81, lora_bytes(seed=8), "Wan Video 1.3B t2v")
    assert fetch_lora(ref).base_model == "Wan Video 1.3B t2v"
    civitai_version(file_server, 81, lora_bytes(seed=8), "Wan Video 2.2 T2V-A14B")  # the author fixes the tag
    assert fetch_lora(ref).base_model == "Wan Video 2.2 T2V-A14B"
    assert file_server.full_bodies["/api/download/models/81"] == 1  # the file itself came once


@pytest.mark.parametrize(
    ("answer", "route"),
    [
        ("nested past the parser", Route(b'{"baseModel": "x", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}")),
        ("not JSON", Route(b"<html>busy</html>", content_type="text/html")),
        ("too big", Route(b'{"baseModel": "' + b"x" * (9 << 20) + b'"}')),
        ("stalled", Route(b'{"baseModel": "Wan Video 14B t2v"}', drip=0.5)),
    ],
)  # fmt: skip
def test_a_version_lookup_that_answers_badly_or_stalls_costs_little_and_the_lora_loads(
    offline_net, file_server, monkeypatch, caplog, answer, route
):
    from wanlora.lora import fetch

    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    monkeypatch.setattr(fetch, "VERSION_LOOKUP_SECONDS", 1.0)
    body = lora_bytes(seed=9)
    ref = civitai_version(file_server, 91, body, None)
    file_server.routes["/api/v1/model-versions/91"] = route
    caplog.set_level(logging.INFO, logger="wanlora")
    started = time.monotonic()
    got = fetch_lora(ref)
    assert got.path.read_bytes() == body and got.base_model is None, answer
    assert time.monotonic() - started < 5, answer  # one attempt, cut at its deadline: not retried for minutes
    assert file_server.requests["/api/v1/model-versions/91"] == 1
    (line,) = [r for r in caplog.records if "version lookup failed" in r.getMessage()]
    assert line.levelno == logging.INFO and "a bug" not in line.getMessage()


def test_what_is_kept_of_civitais_words_and_tag_is_bounded(offline_net, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    words = [f"w{i:04d}" for i in range(100)] + ["x" * 10_000]
    ref = civitai_version(file_server, 95, lora_bytes(seed=10), "W" * 10_000, words)
    got = fetch_lora(ref)
    assert got.trigger_words == words[:32] and got.base_model is None  # a tag no base model has is no tag


def test_replicate_weights_tar_and_cheap_second_fetch(offline_net, file_server, monkeypatch):
    body = lora_bytes(seed=5)
    monkeypatch.setenv("WANLORA_REPLICATE_URL", file_server.url)
    file_server.routes["/bob/wan-lora/_weights"] = Route(redirect="/delivery/abc/trained_model.tar")
    file_server.routes["/delivery/abc/trained_model.tar"] = Route(tar_of({"lora.safetensors": body}))
    assert fetch_lora("https://replicate.com/bob/wan-lora").path.read_bytes() == body
    assert fetch_lora("https://replicate.com/bob/wan-lora").path.read_bytes() == body
    assert file_server.requests["/bob/wan-lora/_weights"] == 2  # the freshness check
    assert file_server.requests["/delivery/abc/trained_model.tar"] == 1


# ------------------------------------------------------------------ the Hub


def test_hub_repo_file_link_revision_and_card_trigger_words(offline_net, fake_hub):
    body = lora_bytes(seed=6)
    card = b"---\ninstance_prompt: wnstyl\nwidget:\n- text: a wnstyl fox\n---\n# Style\n"
    fake_hub.repos["alice/wan-style"] = HubRepo(
        {"sub/style.safetensors": body, "README.md": card}, revisions=("main", "v2")
    )
    got = fetch_lora("alice/wan-style")
    assert got.path.read_bytes() == body and got.trigger_words == ["wnstyl", "a wnstyl fox"]
    link = "https://huggingface.co/alice/wan-style/blob/v2/sub/style.safetensors?download=true"
    assert fetch_lora(link).path.read_bytes() == body
    assert (
        fetch_lora("alice/wan-style@v2/sub/style.safetensors").source == "hf:alice/wan-style@v2/sub/style.safetensors"
    )
    with pytest.raises(LoraNotFound, match="no revision 'v3'"):
        fetch_lora("alice/wan-style@v3/sub/style.safetensors")
    with pytest.raises(LoraNotFound, match="no file 'nope.safetensors'"):
        fetch_lora("alice/wan-style/nope.safetensors")


def test_hub_repo_with_several_files_lists_them(offline_net, fake_hub):
    fake_hub.repos["alice/many"] = HubRepo({"a.safetensors": lora_bytes(), "b.safetensors": lora_bytes(1)})
    with pytest.raises(LoraNotFound, match="several .safetensors files.*a.safetensors, b.safetensors"):
        fetch_lora("alice/many")


def test_private_hub_repo_needs_a_token(offline_net, fake_hub):
    fake_hub.repos["alice/private"] = HubRepo({"x.safetensors": lora_bytes()}, token="hf_good")
    with pytest.raises(LoraNotFound, match="private: set HF_TOKEN"):
        fetch_lora("alice/private")
    assert fetch_lora("alice/private", Credentials(hf_token="hf_good")).size > 0


def test_owner_repo_falls_back_to_replicate_and_reports_both(offline_net, fake_hub, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_REPLICATE_URL", file_server.url)
    with pytest.raises(LoraNotFound, match="tried as a Hugging Face repo .* and as a Replicate model"):
        fetch_lora("bob/nowhere")
    body = lora_bytes(seed=7)
    file_server.routes["/bob/wan-lora/_weights"] = Route(tar_of({"out/lora.safetensors": body}))
    assert fetch_lora("bob/wan-lora").path.read_bytes() == body


# ------------------------------------------------------------------ processes, LRU, the CLI


def test_two_processes_download_one_file_once(offline_net, file_server):
    file_server.routes["/shared.safetensors"] = Route(lora_bytes(seed=8), delay=0.5)
    code = (
        "from wanlora.lora.fetch import fetch_lora_files\n"
        f"[(_, got)] = fetch_lora_files('{file_server.url}/shared.safetensors'); print(got.path)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    assert file_server.full_bodies["/shared.safetensors"] == 1


def test_least_recently_used_entries_are_evicted(offline_net, file_server, monkeypatch):
    bodies = {f"/{i}.safetensors": lora_bytes(seed=i) for i in range(3)}
    for path, body in bodies.items():
        file_server.routes[path] = Route(body)
    monkeypatch.setenv("WANLORA_CACHE_MAX_GB", str(2.5 * len(bodies["/0.safetensors"]) / 2**30))
    fetch_lora(f"{file_server.url}/0.safetensors")
    fetch_lora(f"{file_server.url}/1.safetensors")
    fetch_lora(f"{file_server.url}/0.safetensors")  # 0 is now more recent than 1
    fetch_lora(f"{file_server.url}/2.safetensors")
    assert {e.source.rsplit("/", 1)[1] for e in LoraCache().entries()} == {"0.safetensors", "2.safetensors"}


def test_cli_fetch_cache_list_and_clear(offline_net, file_server):
    file_server.routes["/ok.safetensors"] = Route(lora_bytes())
    file_server.routes["/page"] = Route(b"<html>Sign in</html>")
    good = run_cli("lora", "fetch", f"{file_server.url}/ok.safetensors", env=offline_net)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().splitlines()[-1].endswith("lora.safetensors")
    bad = run_cli("lora", "fetch", f"{file_server.url}/page", env=offline_net)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "HTML page" in bad.stderr
    listing = run_cli("cache", "list", env=offline_net).stdout
    assert "ok.safetensors" in listing and "/page" not in listing and "1 LoRAs" in listing
    assert "freed" in run_cli("cache", "clear", env=offline_net).stdout
    assert "0 LoRAs" in run_cli("cache", "list", env=offline_net).stdout


def test_an_unreachable_hub_is_a_download_error(offline_net, monkeypatch):
    import time

    import huggingface_hub.constants as constants

    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # skip huggingface_hub's retry back-off
    with pytest.raises(LoraDownloadError, match="Hugging Face Hub cannot be reached"):
        fetch_lora("alice/wan-style")


def test_each_hub_error_reads_as_its_most_specific_class():
    """Every class huggingface_hub nests is told apart by its own kind, whatever its parents."""
    from huggingface_hub import errors

    from wanlora.hub import _classify

    expected = {
        errors.GatedRepoError: "gated",  # a RepositoryNotFoundError, an HfHubHTTPError
        errors.RepositoryNotFoundError: "no_repo",
        errors.RevisionNotFoundError: "no_revision",
        errors.LocalEntryNotFoundError: "offline",  # an EntryNotFoundError too
        errors.OfflineModeIsEnabled: "offline",
        errors.EntryNotFoundError: "no_file",
        errors.RemoteEntryNotFoundError: "no_file",
        errors.HfHubHTTPError: "http",
    }
    for cls, kind in expected.items():
        assert _classify(cls.__new__(cls)) == kind, cls.__name__
    assert _classify(ValueError("not the Hub's")) is None


# ------------------------------------------------------------------ retries, encodings, resumes (hardening)


def test_replicate_weights_lookup_is_retried_after_a_503(offline_net, file_server, monkeypatch):
    body = lora_bytes(seed=9)
    monkeypatch.setenv("WANLORA_REPLICATE_URL", file_server.url)
    file_server.routes["/bob/flaky/_weights"] = Route(redirect="/delivery/w.tar", fail_first=1, fail_status=503)
    file_server.routes["/delivery/w.tar"] = Route(tar_of({"lora.safetensors": body}))
    assert fetch_lora("https://replicate.com/bob/flaky").path.read_bytes() == body
    assert file_server.requests["/bob/flaky/_weights"] == 2


def test_a_429_waits_for_its_retry_after(offline_net, file_server):
    body = lora_bytes(seed=10)
    file_server.routes["/busy.safetensors"] = Route(body, fail_first=1, fail_status=429, retry_after="1")
    started = time.monotonic()
    assert fetch_lora(f"{file_server.url}/busy.safetensors").path.read_bytes() == body
    assert time.monotonic() - started >= 1.0  # not the 0.01 s backoff of the fixture
    file_server.routes["/later.safetensors"] = Route(body, fail_first=1, fail_status=429, retry_after="3600")
    with pytest.raises(LoraDownloadError, match="asks to wait 3600 s") as info:
        fetch_lora(f"{file_server.url}/later.safetensors")
    assert info.value.status == 429


def test_a_gzip_encoded_answer_is_read_whole(offline_net, file_server):
    body = lora_bytes(seed=11)
    file_server.routes["/zipped.safetensors"] = Route(body, gzip=True)
    assert fetch_lora(f"{file_server.url}/zipped.safetensors").path.read_bytes() == body
    assert file_server.headers_seen[-1]["Accept-Encoding"] == "identity"


def _killed_download(cache: LoraCache, url: str, first_half: bytes, etag: str) -> None:
    """What a killed download leaves: half a body, and the validators it was resuming under."""
    partial = cache.partial_path(cache.key(url))
    partial.write_bytes(first_half)
    partial.with_name(partial.name + ".json").write_text(json.dumps({"etag": etag, "last_modified": None}))


@pytest.mark.parametrize("honours_if_range", [True, False], ids=["if-range", "ignores-if-range"])
def test_a_resume_never_splices_two_versions(offline_net, file_server, honours_if_range):
    old, new = lora_bytes(seed=12), lora_bytes(seed=13)
    assert len(old) == len(new) and old != new
    url = f"{file_server.url}/v.safetensors"
    _killed_download(LoraCache(), url, old[: len(old) // 2], Route(old).etag)
    file_server.routes["/v.safetensors"] = Route(new, honour_if_range=honours_if_range)
    assert fetch_lora(url).path.read_bytes() == new
    assert file_server.full_bodies["/v.safetensors"] == 1


def test_a_resume_of_the_same_version_continues(offline_net, file_server):
    body = lora_bytes(seed=14)
    url = f"{file_server.url}/same.safetensors"
    _killed_download(LoraCache(), url, body[:100], Route(body).etag)
    file_server.routes["/same.safetensors"] = Route(body)
    assert fetch_lora(url).path.read_bytes() == body
    assert file_server.headers_seen[-1]["Range"] == "bytes=100-" and file_server.full_bodies["/same.safetensors"] == 0


def test_a_damaged_cache_entry_is_fetched_again(offline_net, file_server):
    body = lora_bytes(seed=15)
    file_server.routes["/d.safetensors"] = Route(body)
    first = fetch_lora(f"{file_server.url}/d.safetensors")
    damaged = bytearray(first.path.read_bytes())
    damaged[-1] ^= 0xFF  # same size, other bytes
    first.path.write_bytes(bytes(damaged))
    assert fetch_lora(f"{file_server.url}/d.safetensors").path.read_bytes() == body
    assert file_server.full_bodies["/d.safetensors"] == 2


def test_the_address_policy_holds_on_cache_hits(offline_net, file_server, monkeypatch):
    file_server.routes["/c.safetensors"] = Route(lora_bytes(seed=16))
    fetch_lora(f"{file_server.url}/c.safetensors")  # cached under the tests' opt-in
    monkeypatch.delenv("WANLORA_ALLOW_PRIVATE_URLS")
    with pytest.raises(LoraDownloadError, match="only https"):
        fetch_lora(f"{file_server.url}/c.safetensors")
    with pytest.raises(LoraDownloadError, match="private address 127.0.0.1"):
        fetch_lora(f"{file_server.url.replace('http:', 'https:')}/c.safetensors")
    assert file_server.requests["/c.safetensors"] == 1


# ------------------------------------------------------------------ deadlines and cancellation


def test_a_dripping_server_meets_the_overall_deadline(offline_net, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_DOWNLOAD_TIMEOUT", "1.5")
    file_server.routes["/drip.safetensors"] = Route(lora_bytes(seed=17), drip=0.2)
    started = time.monotonic()
    with pytest.raises(LoraDownloadError, match=r"took longer than 1.5 s \(WANLORA_DOWNLOAD_TIMEOUT\)"):
        fetch_lora(f"{file_server.url}/drip.safetensors")
    assert time.monotonic() - started < 4
    assert LoraCache().entries() == []


def test_a_cancellation_ends_a_stalled_download_at_once(offline_net, file_server):
    """Cog cancels by raising an exception inside the predicting thread (PyThreadState_SetAsyncExc)."""

    class Cancelled(BaseException):
        pass

    file_server.routes["/stall.safetensors"] = Route(lora_bytes(seed=18), drip=5.0)
    outcome = {}

    def predict():
        try:
            fetch_lora(f"{file_server.url}/stall.safetensors")
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=predict)
    worker.start()
    time.sleep(1.0)
    cancelled_at = time.monotonic()
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(Cancelled))
    worker.join(10)
    assert not worker.is_alive() and isinstance(outcome["error"], Cancelled)
    assert time.monotonic() - cancelled_at < 2


# ------------------------------------------------------------------ archives, odd answers, odd references


def gnu_sparse_tar(name: str, real_size: int, data: bytes = b"w" * 512) -> bytes:
    """A tar whose one member is an old-GNU sparse file: `data` stored, `real_size` bytes declared."""
    header = bytearray(512)

    def put(offset: int, value: bytes) -> None:
        header[offset : offset + len(value)] = value

    put(0, name.encode())
    put(100, b"0000644\0")
    put(108, b"0000000\0")
    put(116, b"0000000\0")
    put(124, f"{len(data):011o}\0".encode())
    put(136, b"00000000000\0")
    put(156, b"S")
    put(257, b"ustar  \0")
    put(386, f"{real_size - len(data):011o}\0".encode())  # one stretch of data, at the very end
    put(398, f"{len(data):011o}\0".encode())
    put(483, f"{real_size:011o}\0".encode())
    put(148, b" " * 8)
    put(148, f"{sum(header):06o}\0 ".encode())
    return bytes(header) + data.ljust(512, b"\0") + b"\0" * 1024


@pytest.mark.parametrize(("declared", "limit_gb"), [(8 * 2**30 - 1024, None), (64 * 2**20, "0.01")])
def test_a_sparse_tar_bomb_is_refused_before_it_fills_the_disk(
    offline_net, file_server, monkeypatch, declared, limit_gb
):
    if limit_gb:
        monkeypatch.setenv("WANLORA_MAX_LORA_GB", limit_gb)
    file_server.routes["/bomb.tar"] = Route(gnu_sparse_tar("lora.safetensors", declared))
    with pytest.raises(LoraDownloadError, match="over the .* GiB limit"):
        fetch_lora(f"{file_server.url}/bomb.tar")
    written = sum(f.stat().st_size for f in LoraCache().root.rglob("*") if f.is_file())
    assert written < 1_000_000


@pytest.mark.parametrize(
    "answer",
    [b"[]", b'{"modelVersions": "x"}', b'{"modelVersions": [{"id": "abc"}]}', b'{"modelVersions": [7]}'],
)
def test_a_malformed_civitai_answer_is_one_clear_error(offline_net, file_server, monkeypatch, answer):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    file_server.routes["/api/v1/models/99"] = Route(answer, content_type="application/json")
    with pytest.raises(LoraDownloadError, match="Civitai's answer for model 99"):
        fetch_lora("https://civitai.com/models/99")


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("x" * 5000, "at most 4096"),
        ("https://example.com/" + "a" * 5000, "at most 4096"),
        ("~nouser-anywhere/x.safetensors", "not a usable path"),
        ("https://[::1/x.safetensors", "not a valid link"),
    ],
)
def test_odd_references_are_one_clear_error(offline_net, ref, words):
    with pytest.raises(LoraNotFound, match=words):
        fetch_lora(ref)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1"])
def test_a_bad_size_limit_names_the_variable(offline_net, file_server, monkeypatch, value):
    file_server.routes["/x.safetensors"] = Route(lora_bytes())
    monkeypatch.setenv("WANLORA_MAX_LORA_GB", value)
    with pytest.raises(InvalidInput, match=f"WANLORA_MAX_LORA_GB='{value}' is not allowed"):
        fetch_lora(f"{file_server.url}/x.safetensors")


def test_an_unwritable_cache_is_named(offline_net, file_server, monkeypatch):
    file_server.routes["/x.safetensors"] = Route(lora_bytes())
    monkeypatch.setenv("WANLORA_CACHE", "/sys/wanlora-cache")  # not writable, even by root
    with pytest.raises(LoraDownloadError, match="LoRA cache folder /sys/wanlora-cache cannot be written"):
        fetch_lora(f"{file_server.url}/x.safetensors")


def test_a_full_disk_during_a_download_leaves_nothing_behind(offline_net, file_server):
    body = save(lora_tensors(SHAPES, "original", seed=19)[0])  # a few kB
    file_server.routes["/big.safetensors"] = Route(body)
    code = f"from wanlora.lora.fetch import fetch_lora_files; fetch_lora_files('{file_server.url}/big.safetensors')"
    full = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=file_size_limit(2000)
    )
    assert full.returncode != 0 and "cannot write to the LoRA cache" in full.stderr
    assert not list((LoraCache().root / "partial").glob("*.part"))
    assert fetch_lora(f"{file_server.url}/big.safetensors").path.read_bytes() == body  # and the next one works


# ------------------------------------------------------------------ addresses


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("100.100.100.200", "cloud metadata"),  # Alibaba Cloud's metadata service
        ("100.64.0.1", "private"),  # carrier-grade NAT
        ("fd00:ec2::254", "cloud metadata"),  # AWS's, over IPv6
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of it
        ("2002:0a00:0001::1", "private"),  # 6to4 of 10.0.0.1
        ("fec0::1", "non-routable"),  # site-local
    ],
)
def test_addresses_hidden_in_other_forms_are_refused(monkeypatch, tmp_path, address, refused):
    monkeypatch.setenv("WANLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1" if refused != "private" else "0")
    monkeypatch.setattr(net, "resolve_host", lambda host, port: [address])
    with pytest.raises(LoraDownloadError, match=refused):
        fetch_lora("https://lora.example.com/x.safetensors")


# ------------------------------------------------------------------ two processes at a full cache


def test_two_processes_at_a_full_cache_never_wait_on_each_other(offline_net, file_server):
    """Each evicts the other's entries: with eviction under its own lock, they deadlocked."""
    for i in range(6):
        file_server.routes[f"/{i}.safetensors"] = Route(lora_bytes(seed=20 + i), delay=0.3)
    code = (
        "import sys; from wanlora.lora.fetch import fetch_lora_files\n"
        f"for i in sys.argv[1:]: fetch_lora_files('{file_server.url}/' + i + '.safetensors')"
    )
    env = {**os.environ, "WANLORA_CACHE_MAX_GB": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, *order], env=env, stderr=subprocess.PIPE, text=True)
        for order in (["0", "1", "2", "3", "4", "5"], ["5", "4", "3", "2", "1", "0"])
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
