"""Values a request brings are never trusted: each problem found, reproduced, and the class of mistake closed.

A value from a request (a path part, a token, a redirect target, a header, a tensor's
dtype) must never reach code that trusts it.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from wanlora import InvalidInput, WanLoraPipeline
from wanlora.errors import (
    LoraAuthRequired,
    LoraDownloadError,
    LoraError,
    LoraFormatError,
    LoraNotFound,
    WanLoraError,
)
from wanlora.frontends.service import PredictorInputs
from wanlora.lora.fetch import Credentials, fetch_lora_files
from wanlora.lora.layouts import read_lora
from wanlora.paths import PathRefused, inside, relative_name
from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .conftest import SMALL
from .lora_helpers import assert_bitwise, fetch_lora, snapshot, tar_of
from .servers import SIGNATURE, HubRepo, Route
from .test_fetch import lora_bytes

# ------------------------------------------------------------------ 1. no server file through a reference

TRAPS = ["any/repo//{target}", "Owner/Repo/../../{name}", "Owner/Repo/..%2F..%2F{name}", "o/r/sub/../../../{name}"]


@pytest.mark.parametrize("trap", TRAPS)
def test_a_hub_reference_cannot_reach_a_file_outside_the_weights_folder(trap, tmp_path, monkeypatch):
    weights, outside = tmp_path / "weights", tmp_path / "secret"
    (weights / "Owner" / "Repo").mkdir(parents=True)
    outside.mkdir()
    (outside / "key.safetensors").write_bytes(lora_bytes())
    monkeypatch.setenv("WANLORA_WEIGHTS", str(weights))
    answers = []
    for name in ("key.safetensors", "missing.safetensors"):  # the answer may not tell one from the other
        ref = trap.format(target=str(outside / name).lstrip("/"), name=f"secret/{name}")
        with pytest.raises(LoraError) as refused:
            fetch_lora(ref, Credentials(local_files=False))
        text = str(refused.value)
        assert str(weights) not in text  # the operator's folder is never shown
        answers.append((type(refused.value), text.replace(name, "NAME")))
    assert answers[0] == answers[1]


path_parts = st.lists(
    st.sampled_from(
        [
            "..",
            ".",
            "",
            "/",
            "//",
            "~",
            "~root",
            "a\\b",
            "\x00",
            "\x1b",
            "／",
            "․",
            "．．",
            "..\u2215x",
            "ok",
            "ok.safetensors",
            "Ö",
            "x" * 30,
            " ",
        ]
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=int(os.environ.get("WANLORA_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(parts=path_parts, joiner=st.sampled_from(["/", "", "\\"]))
def test_every_path_the_guard_lets_through_stays_inside_its_root(parts, joiner, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "guarded"
    if not root.exists():
        (root / "inner").mkdir(parents=True)
        (root / "inner" / "out").symlink_to("/etc")  # a link inside the root that points out of it
        (root / "inner" / "in").symlink_to(root / "inner")
    name = joiner.join(parts)
    for candidate in (name, f"inner/out/{name}", f"inner/in/{name}"):
        try:
            path = inside(root, candidate)
        except PathRefused as exc:
            assert len(str(exc)) < 200
            continue
        assert path.resolve().is_relative_to(root.resolve()), candidate
        assert relative_name(candidate).parts == tuple(candidate.split("/"))


def test_the_guard_refuses_a_link_that_leads_out(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "out").symlink_to(tmp_path)
    with pytest.raises(PathRefused, match="outside its folder"):
        inside(tmp_path / "root", "out/x.safetensors")


# ------------------------------------------------------------------ 2. access is proven, not assumed


def private(body: bytes, token: str = "Bearer good") -> Route:
    """A login-only download: without the token, a 307 to a login page that returns 200 HTML."""
    return Route(body, require_auth=token, refuse_to="/login?reason=download-auth")


@pytest.mark.parametrize("origin", ["civitai", "signed-link", "hub-style", "replicate"])
def test_a_login_page_is_a_refusal_not_access(origin, offline_net, file_server, monkeypatch):
    body = lora_bytes(seed=21)
    file_server.routes["/login"] = Route(
        b"<html><body>log in</body></html>", content_type="text/html", validators=False
    )
    good = Credentials(civitai_token="good")
    if origin == "civitai":
        monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
        file_server.routes["/api/download/models/5"] = private(body)
        ref, first, later = "civitai:5", good, [Credentials(), Credentials(civitai_token="revoked")]
    else:
        path = {"signed-link": "/files/s.safetensors", "hub-style": "/o/r/resolve/main/x.safetensors"}.get(origin)
        if origin == "replicate":
            monkeypatch.setenv("WANLORA_REPLICATE_URL", file_server.url)
            path = "/delivery/w.tar"
            file_server.routes["/bob/model/_weights"] = Route(redirect=f"{path}?sig=abc")
        file_server.routes[path] = Route(
            tar_of({"l.safetensors": body}) if origin == "replicate" else body,
            require_query="sig=abc",
            validators=False,
        )
        ref = "https://replicate.com/bob/model" if origin == "replicate" else f"{file_server.url}{path}?sig=abc"
        first, later = Credentials(), []
        fetch_lora(ref, first)
        file_server.routes[path] = Route(
            status=200, body=b"<html>expired</html>", content_type="text/html", validators=False
        )
        later = [Credentials()]
    if origin == "civitai":
        assert fetch_lora(ref, first).path.read_bytes() == body
    for credentials in later:
        with pytest.raises(LoraAuthRequired) as refused:
            fetch_lora(ref, credentials)
        assert "good" not in str(refused.value)


def test_access_is_granted_by_a_304_matching_validators_or_the_files_own_length(offline_net, file_server):
    body = lora_bytes(seed=22)
    file_server.routes["/v.safetensors"] = Route(body, require_query="sig=1")
    url = f"{file_server.url}/v.safetensors?sig=1"
    assert fetch_lora(url).path.read_bytes() == body
    assert fetch_lora(url).path.read_bytes() == body  # a 304 for the same ETag
    file_server.routes["/v.safetensors"] = Route(body, require_query="sig=1", validators=False)
    assert fetch_lora(url).path.read_bytes() == body  # no validators: the whole length is the file's


# ------------------------------------------------------------------ 3. no secret in the predictor's logs


def test_signed_links_never_reach_the_logs_at_any_level_the_front_ends_set(fake_hub, tmp_path, monkeypatch):
    from wanlora.logs import configure

    fake_hub.repos["alice/private"] = HubRepo(
        {"style.safetensors": lora_bytes(seed=23)}, token="hf_" + "a" * 30, signed=True
    )
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure(verbose=True, stream=stream, fmt="%(name)s %(message)s", force=True)  # as predict.py does
        logging.getLogger("wanlora").setLevel(logging.DEBUG)
        fetched = fetch_lora("alice/private/style.safetensors", Credentials(hf_token="hf_" + "a" * 30))
        logging.getLogger("httpx").warning("GET %s", f"https://cdn/x?X-Amz-Signature={SIGNATURE}")  # any logger
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("wanlora").setLevel(logging.NOTSET)
    logged = stream.getvalue()
    assert fetched.path.is_file() and fake_hub.downloads["alice/private/style.safetensors"] == 1
    assert SIGNATURE not in logged and "a" * 30 not in logged and "X-Amz-Signature=" not in logged
    assert "GET https://cdn/x?..." in logged


# ------------------------------------------------------------------ 4. a token with a newline


@pytest.mark.parametrize("field", ["hf_token", "civitai_token"])
def test_tokens_are_trimmed_and_a_broken_one_is_refused_without_being_shown(field):
    assert getattr(Credentials(**{field: "  tok-123\n"}), field) == "tok-123"
    with pytest.raises(InvalidInput) as refused:
        Credentials(**{field: "civ-SECRET-123\nX-Other: 1"})
    assert "SECRET" not in str(refused.value) and "control characters" in str(refused.value)


def test_no_exception_chain_carries_a_secret(offline_net, file_server):
    file_server.routes["/gone.safetensors"] = Route(status=500)
    with pytest.raises(LoraDownloadError) as failed:
        fetch_lora(f"{file_server.url}/gone.safetensors?token=SECRETTOKEN&sig=SECRETSIG")
    chain, error = [], failed.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    assert "SECRET" not in " | ".join(chain)


def test_the_predictor_refuses_a_broken_token_in_its_own_words(tiny_dir):
    from wanlora.frontends.service import VideoService

    with pytest.raises(InvalidInput) as refused:
        VideoService(override=str(tiny_dir), i2v_override="").resolve(
            PredictorInputs(prompt="a fox", civitai_api_token="civ-SECRET\n1")
        )
    assert str(refused.value).startswith("civitai_api_token=") and "SECRET" not in str(refused.value)


# ------------------------------------------------------------------ 6. model cards cost what they weigh


def test_a_model_card_of_nested_aliases_or_a_huge_one_costs_nothing(fake_hub):
    levels = "abcdefghi"  # each level is nine aliases of the one before: 9**9 items once expanded
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip(levels, levels[1:], strict=False)
    )
    lora = lora_bytes()
    fake_hub.repos["bob/laughs"] = HubRepo({"l.safetensors": lora, "README.md": f"---\n{laughs}---\n".encode()})
    fake_hub.repos["bob/huge"] = HubRepo({"l.safetensors": lora, "README.md": b"---\n" + b"x: y\n" * 200_000})
    started = time.monotonic()
    assert fetch_lora("bob/laughs/l.safetensors").trigger_words == []
    assert time.monotonic() - started < 5
    assert fetch_lora("bob/huge/l.safetensors").trigger_words == []
    assert fake_hub.downloads["bob/huge/README.md"] == 0  # over the cap: never downloaded
    fake_hub.repos["bob/card"] = HubRepo({"l.safetensors": lora, "README.md": b"---\ninstance_prompt: wnx\n---\n"})
    assert fetch_lora("bob/card/l.safetensors").trigger_words == ["wnx"]


# ------------------------------------------------------------------ 7. Civitai: the file a link picks


def test_civitai_file_id_and_a_links_token_pick_and_open_the_file(offline_net, file_server, monkeypatch):
    monkeypatch.setenv("WANLORA_CIVITAI_URL", file_server.url)
    high, low = lora_bytes(seed=31), lora_bytes(seed=32)
    file_server.routes["/api/download/models/9"] = Route(high, require_auth="Bearer tok")
    file_server.routes["/api/download/models/9?fileId=2"] = Route(low, require_auth="Bearer tok")
    base = "https://civitai.com/api/download/models/9"
    first = fetch_lora(f"{base}?token=tok")
    second = fetch_lora(f"{base}?fileId=2&token=tok")
    assert (first.path.read_bytes(), second.path.read_bytes()) == (high, low)
    assert first.source == "civitai:9" and second.source == "civitai:9?fileId=2"


# ------------------------------------------------------------------ 8. text that cannot be written


def test_a_broken_character_in_the_prompt_is_refused_before_any_work(cli, tiny_pipe, tmp_path):
    with pytest.raises(InvalidInput, match="lone surrogate"):
        tiny_pipe.generate("a \udcff fox", **SMALL)
    result = cli("generate", "a \udcff fox", "--model", "tiny", cwd=tmp_path)
    assert (
        result.returncode == 2 and result.stderr.startswith("wanlora: error: PROMPT=") and "surrogate" in result.stderr
    )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 9. malformed LoRA contents


def kohya(**factors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"lora_unet_blocks_0_self_attn_q.{name}": tensor for name, tensor in factors.items()}


MALFORMED = {
    "bool": kohya(**{"lora_down.weight": torch.ones(4, 24, dtype=torch.bool), "lora_up.weight": torch.ones(24, 4)}),
    "uint16": kohya(**{"lora_down.weight": torch.ones(4, 24, dtype=torch.uint16), "lora_up.weight": torch.ones(24, 4)}),
    "ranks": kohya(**{"lora_down.weight": torch.ones(4, 24), "lora_up.weight": torch.ones(24, 3)}),
    "scalar-diff": {"diffusion_model.blocks.0.self_attn.q.diff": torch.tensor(1.0)},
    "loha": {
        f"lycoris_blocks_0_self_attn_q.hada_{n}": torch.ones(s)
        for n, s in (("w1_a", (24, 4)), ("w1_b", (4, 24)), ("w2_a", (24, 3)), ("w2_b", (4, 24)))
    },
    "lokr": {
        "lycoris_blocks_0_ffn_0.lokr_w1": torch.ones(2, 2),
        "lycoris_blocks_0_ffn_0.lokr_w2_a": torch.ones(16, 3),
        "lycoris_blocks_0_ffn_0.lokr_w2_b": torch.ones(4, 12),
    },
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_lora_contents_are_format_errors_and_change_nothing(case, fresh_tiny_pipe, tmp_path):
    path = tmp_path / f"{case}.safetensors"
    save_file(MALFORMED[case], str(path))
    before = snapshot(fresh_tiny_pipe.transformer)
    with pytest.raises(LoraFormatError):
        fresh_tiny_pipe.set_loras([(str(path), 1.0)])
    assert_bitwise(fresh_tiny_pipe.transformer, before)


def test_fp8_factors_are_read_exactly(tmp_path):
    down, up = torch.randn(4, 24).to(torch.float8_e4m3fn), torch.randn(24, 4).to(torch.float8_e5m2)
    save_file(kohya(**{"lora_down.weight": down, "lora_up.weight": up}), str(tmp_path / "fp8.safetensors"))
    delta = read_lora(tmp_path / "fp8.safetensors").deltas["blocks.0.attn1.to_q.weight"]
    assert torch.equal(delta.compute(), up.float() @ down.float())


# ------------------------------------------------------------------ 10. only our own errors


def test_odd_answers_and_inputs_are_our_own_errors(offline_net, file_server, tmp_path):
    file_server.routes["/six.safetensors"] = Route(lora_bytes(), encoding=", ".join(["gzip"] * 6))
    with pytest.raises(LoraDownloadError):
        fetch_lora(f"{file_server.url}/six.safetensors")
    file_server.routes["/bad-redirect"] = Route(redirect="http://[::1")
    with pytest.raises(LoraDownloadError, match="malformed link"):
        fetch_lora(f"{file_server.url}/bad-redirect")
    with pytest.raises(LoraNotFound, match="not a Hub file reference"):
        fetch_lora_files("owner/repo//x.safetensors")
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 megapixels in a few hundred KB
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    with pytest.raises(InvalidInput, match="megapixels"):
        WanLoraPipeline.from_pretrained("tiny-i2v").generate("a fox", image=str(tmp_path / "bomb.png"))


# ------------------------------------------------------------------ 11. bounded messages and scans


@pytest.mark.slow
def test_a_tar_of_many_members_is_refused_quickly_in_a_short_message(offline_net, file_server):
    many = tar_of({f"lora-{i}.safetensors": b"" for i in range(50_000)})
    file_server.routes["/many.tar"] = Route(many)
    started = time.monotonic()
    with pytest.raises(LoraFormatError) as refused:
        fetch_lora(f"{file_server.url}/many.tar")
    assert len(str(refused.value)) < 2000 and time.monotonic() - started < 10
    some = tar_of({f"lora-{i}.safetensors": b"" for i in range(50)})
    file_server.routes["/some.tar"] = Route(some)
    with pytest.raises(LoraFormatError, match="and 40 more") as listed:
        fetch_lora(f"{file_server.url}/some.tar")
    assert len(str(listed.value)) < 2000


# ------------------------------------------------------------------ 12. cache clear beside a fetch


CLEARING = """
import sys, time
from wanlora.lora.cache import LoraCache
stop = time.monotonic() + float(sys.argv[1])
while time.monotonic() < stop:
    LoraCache().clear()
print("cleared")
"""


def test_clearing_the_cache_in_one_process_never_breaks_a_fetch_in_another(offline_net, file_server):
    body = lora_bytes(seed=40)
    file_server.routes["/c.safetensors"] = Route(body)
    clearer = subprocess.Popen(
        [sys.executable, "-c", CLEARING, "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **offline_net},
    )
    failures, fetched = [], 0
    stop = time.monotonic() + 5
    while time.monotonic() < stop:
        try:
            fetched += fetch_lora(f"{file_server.url}/c.safetensors").size == len(body)
        except WanLoraError as exc:  # allowed, but none is expected
            failures.append(str(exc))
    out, err = clearer.communicate(timeout=60)
    assert clearer.returncode == 0 and out.strip() == "cleared", err
    assert fetched > 0 and failures == []


# ------------------------------------------------------------------ 13. a stopped merge leaves nothing


STAGING = """
import sys, time
from pathlib import Path
from wanlora.staging import staged_folder
with staged_folder(Path(sys.argv[1])) as staging:
    (staging / "weights.bin").write_bytes(b"x" * 1000)
    print(staging, flush=True)
    time.sleep(60)
"""


def test_sigterm_while_staging_removes_the_staging_folder_and_a_killed_ones_is_removed_next_time(tmp_path):
    target = tmp_path / "merged"
    child = subprocess.Popen([sys.executable, "-c", STAGING, str(target)], stdout=subprocess.PIPE, text=True)
    staging = Path(child.stdout.readline().strip())
    assert staging.is_dir() and staging.parent == tmp_path
    child.send_signal(signal.SIGTERM)
    assert child.wait(30) == 128 + signal.SIGTERM
    assert not staging.exists() and not target.exists()
    killed = subprocess.Popen([sys.executable, "-c", STAGING, str(target)], stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait(30)
    assert left.is_dir()  # SIGKILL: nothing could run
    from wanlora.staging import staged_folder

    with staged_folder(target) as staging:
        (staging / "model_index.json").write_text("{}")
    assert not left.exists() and (target / "model_index.json").is_file()


def test_lora_merge_from_python_writes_atomically(tiny_pipe, tmp_path):
    write_lora(tmp_path / "l.safetensors", tiny_transformer(), "original", seed=3)
    pipe = WanLoraPipeline.from_pretrained("tiny")
    pipe.set_loras([(str(tmp_path / "l.safetensors"), 0.7)])
    merged = snapshot(pipe.transformer)
    out = pipe.save_merged(tmp_path / "baked")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert_bitwise(WanLoraPipeline.from_pretrained(str(out)).transformer, merged)
    with pytest.raises(InvalidInput, match="a new or empty folder"):
        pipe.save_merged(out)


# ------------------------------------------------------------------ the boundary


def test_a_bug_leaves_the_library_as_one_of_its_own_errors(tiny_pipe, monkeypatch):
    from wanlora import pipeline
    from wanlora.errors import InternalError

    def broken(*args, **kwargs):
        raise KeyError("https://x/y?token=SECRET")

    monkeypatch.setattr(pipeline, "resize_image", broken)
    monkeypatch.setattr(type(tiny_pipe), "_hint_trigger_words", broken)
    with pytest.raises(InternalError) as failed:
        tiny_pipe.generate("a fox", **SMALL)
    assert "SECRET" not in str(failed.value) and "KeyError" in str(failed.value)
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
