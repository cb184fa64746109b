"""Access is per request, and secrets stay secret, on a server that many users share.

A LoRA that needed a token is served, from the disk cache, the loader's memory or the
weights already merged, only to a request whose token the origin accepts now. Tokens,
signatures and passwords inside references never reach a log, an error, a tag or the cache.
"""

from __future__ import annotations

import base64
import logging

import numpy as np
import pytest

from wanlora.errors import LoraAuthRequired, LoraDownloadError, LoraNotFound
from wanlora.lora.cache import LoraCache
from wanlora.lora.fetch import Credentials
from wanlora.lora.loader import LoraLoader
from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .conftest import SMALL, probe, run_cli
from .lora_helpers import assert_bitwise, fetch_lora, snapshot
from .servers import Route

PRIVATE = "/api/download/models/77"


@pytest.fixture
def civitai(offline_net, file_server, monkeypatch, tmp_path):
    """A Civitai stand-in whose version 77 needs the token `good`; returns (server, the file's bytes)."""
    write_lora(tmp_path / "private.safetensors", tiny_transformer(), "kohya", seed=5)
    body = (tmp_path / "private.safetensors").read_bytes()
    file_server.routes[PRIVATE] = Route(body, require_auth="Bearer good")
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    return file_server, body


def test_a_cached_private_lora_needs_a_good_token_every_time(civitai):
    server, body = civitai
    assert fetch_lora("civitai:77", Credentials(civitai_token="good")).path.read_bytes() == body
    for token in (None, "wrong"):
        asked = server.requests[PRIVATE]
        with pytest.raises(LoraAuthRequired, match="Civitai needs an API token") as info:
            fetch_lora("civitai:77", Credentials(civitai_token=token))
        assert info.value.status == 401 and info.value.ref == "civitai:77"
        assert server.requests[PRIVATE] == asked + 1  # the origin decided, not the cache
    assert fetch_lora("civitai:77", Credentials(civitai_token="good")).path.read_bytes() == body
    assert server.full_bodies[PRIVATE] == 1  # the check is one small request, not a download


def test_a_token_link_does_not_open_the_bare_link(offline_net, file_server, civitai):
    _, body = civitai
    file_server.routes["/signed.safetensors"] = Route(body, require_query="token=s3cret")
    assert fetch_lora(f"{file_server.url}/signed.safetensors?token=s3cret").path.read_bytes() == body
    with pytest.raises(LoraAuthRequired):
        fetch_lora(f"{file_server.url}/signed.safetensors")
    with pytest.raises(LoraAuthRequired):
        fetch_lora(f"{file_server.url}/signed.safetensors?token=guess")


def test_a_link_whose_query_value_is_a_token_does_not_open_the_bare_link(offline_net, file_server, civitai):
    """A token under a plain name (`?t=hf_...`) is left out of the cache key like one under `token=`: the entry it
    fetched is as private as the link, and the bare link is the origin's to refuse."""
    _, body = civitai
    token = "hf_" + "A1b2" * 8
    file_server.routes["/shared.safetensors"] = Route(body, require_query=f"t={token}")
    assert fetch_lora(f"{file_server.url}/shared.safetensors?t={token}").path.read_bytes() == body
    with pytest.raises(LoraAuthRequired):
        fetch_lora(f"{file_server.url}/shared.safetensors")


def test_the_loaders_memory_rechecks_a_private_lora(civitai):
    loader = LoraLoader()
    first = loader.load("civitai:77", Credentials(civitai_token="good"))
    with pytest.raises(LoraAuthRequired):
        loader.load("civitai:77", Credentials())
    assert loader.load("civitai:77", Credentials(civitai_token="good"))[0][1] is first[0][1]  # parsed once


def test_the_loaders_memory_does_not_open_a_local_file_to_a_shared_servers_request(tmp_path):
    write_lora(tmp_path / "operator.safetensors", tiny_transformer(), "kohya", seed=5)
    loader = LoraLoader()
    path = str(tmp_path / "operator.safetensors")
    assert loader.load(path, Credentials(local_files=True))  # the operator's own use puts it in memory
    with pytest.raises(LoraNotFound, match="is a path; here a LoRA must come from a link"):
        loader.load(path, Credentials(local_files=False))


def test_the_same_merged_set_is_not_reused_without_a_token(civitai, fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    pipe.set_loras([("civitai:77", 0.8)], Credentials(civitai_token="good"))
    merged = snapshot(pipe.transformer)
    with pytest.raises(LoraAuthRequired):
        pipe.set_loras([("civitai:77", 0.8)], Credentials())  # "the same set as now" once skipped every check
    assert_bitwise(pipe.transformer, merged)
    with pytest.raises(LoraAuthRequired):  # loras=None keeps the set, and checks access to it
        pipe.generate("a fox", credentials=Credentials(civitai_token="wrong"), **SMALL)
    assert_bitwise(pipe.transformer, merged)


def test_a_public_lora_in_memory_costs_no_request(offline_net, file_server, civitai):
    _, body = civitai
    file_server.routes["/public.safetensors"] = Route(body)
    loader = LoraLoader()
    loader.load(f"{file_server.url}/public.safetensors")
    loader.load(f"{file_server.url}/public.safetensors")
    assert file_server.requests["/public.safetensors"] == 1


# ------------------------------------------------------------------ secrets inside references

SECRETS = ("hunter2", "tok3n", "s1gnature", "p4ss")


def secret_ref(url: str) -> str:
    host = url.removeprefix("http://")
    return f"http://alice:hunter2@{host}/style.safetensors?token=tok3n&X-Amz-Signature=s1gnature&password=p4ss&v=2"


def test_secrets_in_a_reference_reach_no_log_tag_or_cache(offline_net, file_server, fresh_tiny_pipe, tmp_path, caplog):
    write_lora(
        tmp_path / "style.safetensors",
        tiny_transformer(),
        "original",
        seed=6,
        metadata={"modelspec.trigger_phrase": "wanstyle"},
    )
    basic = "Basic " + base64.b64encode(b"alice:hunter2").decode()
    file_server.routes["/style.safetensors"] = Route(
        (tmp_path / "style.safetensors").read_bytes(), require_auth=basic, require_query="token=tok3n"
    )
    caplog.set_level(logging.DEBUG)
    video = fresh_tiny_pipe.generate("a fox", loras=[(secret_ref(file_server.url), 0.8)], seed=1, **SMALL)
    assert "trigger words" in caplog.text and "read " in caplog.text and "applied" in caplog.text  # the ref is logged
    tags = probe(video.save(tmp_path / "fox.mp4")).tags
    assert f"{file_server.url}/style.safetensors?v=2" in tags  # the reference, minus its secrets
    cache_files = "".join(p.read_text(errors="ignore") for p in LoraCache().root.rglob("*.json"))
    listing = run_cli("cache", "list", env=offline_net).stdout
    for secret in SECRETS:
        for where, text in (("log", caplog.text), ("tags", tags), ("cache", cache_files), ("list", listing)):
            assert secret not in text, (secret, where)


@pytest.mark.parametrize(
    "make",
    [
        lambda url: "http://alice:hunter2@127.0.0.1:9/x.safetensors?token=tok3n",  # nothing listens on port 9
        lambda url: f"{url}/missing.safetensors?token=tok3n&sig=s1gnature",
        lambda url: "https://civitai.com/user/alice?token=tok3n",
        lambda url: "https://alice:hunter2@[::1/x.safetensors?token=tok3n",
    ],
    ids=["unreachable", "not-found", "unmappable", "malformed"],
)
def test_secrets_in_a_reference_reach_no_error(offline_net, file_server, caplog, make):
    caplog.set_level(logging.DEBUG)
    with pytest.raises((LoraDownloadError, LoraNotFound)) as info:
        fetch_lora(make(file_server.url))
    chained = str(info.value) + str(info.value.ref)
    for secret in SECRETS:
        assert secret not in chained and secret not in caplog.text, secret


def test_unchanged_frames_after_a_refused_request(civitai, fresh_tiny_pipe):
    pipe = fresh_tiny_pipe
    good = pipe.generate(
        "a fox", loras=[("civitai:77", 1.0)], credentials=Credentials(civitai_token="good"), seed=2, **SMALL
    ).frames
    with pytest.raises(LoraAuthRequired):
        pipe.generate("a fox", loras=[("civitai:77", 1.0)], seed=2, **SMALL)
    again = pipe.generate(
        "a fox", loras=[("civitai:77", 1.0)], credentials=Credentials(civitai_token="good"), seed=2, **SMALL
    ).frames
    assert np.array_equal(good, again)
