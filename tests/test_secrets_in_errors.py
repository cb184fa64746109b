"""Every value shown passes the scrubber: each front end's inputs, of every JSON type, holding secrets.

Strings where numbers go and the reverse, lists and objects where text goes, nulls, huge
numbers, NaN, unknown fields, and secrets everywhere (a link with `user:PASSWORD@` and
`?token=`, a Hugging Face token, `Bearer ...`), into the CLI's `generate`, `sweep` and
`batch`, the Python `generate` and `sweep`, the predictor's inputs and a batch's lines: each
is refused with a WanLoraError (the CLI: exit 2, one line), under 2,000 characters, naming
no secret; or it is accepted, and stopped where the denoising would start.

WANLORA_CLASS_EXAMPLES sets the budget (default 10: 200 inputs a front end, derandomized, about
25 s here); rerun it larger, e.g. `WANLORA_CLASS_EXAMPLES=100 pytest tests/test_secrets_in_errors.py`
(random, 2,000 a front end). Links go to a server on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from wanlora import WanLoraPipeline
from wanlora.errors import WanLoraError
from wanlora.frontends.batch import JobRunner, read_jobs
from wanlora.frontends.service import PredictorInputs, VideoService, carried_options, declared_inputs

from .servers import FileServer

pytestmark = pytest.mark.slow  # class runs: generated inputs into every front end

BUDGET = int(os.environ.get("WANLORA_CLASS_EXAMPLES", "10"))
FUZZ = settings(
    max_examples=BUDGET * 20,  # per front end
    deadline=None,
    derandomize=BUDGET <= 10,
    suppress_health_check=list(HealthCheck),
)
MARKERS = ("PASSW0RD", "T0KEN", "HFSECRET", "BEARERSECRET", "CIVSECRET")
PORT = 0  # the loopback server's, set by the `loopback` fixture before any example runs


class Accepted(BaseException):
    """Raised where the denoising would start: the request got through every check. A BaseException,
    so that no handler on the way takes it for a failure."""


def secrets_() -> st.SearchStrategy:
    return st.deferred(
        lambda: st.sampled_from(  # drawn once the loopback server has its port
            [
                f"http://user:PASSW0RD@127.0.0.1:{PORT}/x.safetensors?token=T0KEN",
                f"https://user:PASSW0RD@127.0.0.1:{PORT}/a/b.safetensors?sig=T0KEN&x=1",
                f"http://127.0.0.1:{PORT}/x.png?token=T0KEN",
                "hf_HFSECRET" + "x" * 20,
                "Bearer BEARERSECRET",
                "token=T0KEN",
                f"owner/repo:http://user:PASSW0RD@127.0.0.1:{PORT}/x",
            ]
        )
    )


PLAUSIBLE = ["tiny", "causvid", "lightx2v-4step", "fast", "off", "480p", "720p", "16:9", "1:1", "fit", "pad",
             "both", "high", "14b", "Off", "Fast", "none", "auto", "0,1", "64", "5", "", " ", "x.safetensors",
             "./x.png"]  # fmt: skip


def scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([0, 1, 2, 5, 48, 64, 81, -1, 10**6]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6),
        st.sampled_from(PLAUSIBLE),
        secrets_(),
    )


def json_values() -> st.SearchStrategy:
    """Any JSON value: scalars, and lists and objects of them, secrets as values and as keys."""
    return st.recursive(
        scalars(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=5), secrets_()), inner, max_size=3)
        ),  # fmt: skip
        max_leaves=6,
    )


REFERENCES = {"loras", "model", "image", "last_image", "lora_weights", "extra_lora", "replicate_weights",
              "lora_weights_transformer", "lora_weights_transformer_2", "hf_api_token",
              "civitai_api_token"}  # fmt: skip


def lora_lists() -> st.SearchStrategy:
    """What `loras` takes, confused: items of the right shape, of the wrong length, objects, a link where
    a number goes and the reverse, each holding secrets."""
    item = st.one_of(
        secrets_(),
        st.lists(st.one_of(secrets_(), scalars()), min_size=1, max_size=4),
        st.tuples(secrets_(), json_values()).map(list),
        st.tuples(secrets_(), scalars(), scalars()).map(list),
        st.dictionaries(
            st.one_of(st.sampled_from(["ref", "high"]), secrets_()),
            st.one_of(secrets_(), scalars()),
            min_size=1,
            max_size=2,
        ),  # fmt: skip
    )
    return st.one_of(st.lists(item, max_size=3), json_values())


def value_for(name: str) -> st.SearchStrategy:
    """Any JSON value for `name`, and where it names a file, a link or a token, secrets above all."""
    if name == "loras":
        return lora_lists()
    if name in REFERENCES:
        return st.one_of(secrets_(), st.lists(secrets_(), max_size=2), json_values())
    return json_values()


def fields_of(names: list[str]) -> st.SearchStrategy:
    """Some of `names` (and an unknown one, perhaps a secret itself), each any JSON value."""
    known = st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({name: value_for(name) for name in chosen})
    )
    unknown = st.dictionaries(
        st.one_of(st.sampled_from(["shfit", "lora", "steps", "hf_tokn"]), secrets_()), json_values(), max_size=1
    )
    unknown = st.one_of(st.just({}), st.just({}), st.just({}), unknown)  # mostly none: they are refused first
    return st.tuples(known, unknown).map(lambda pair: {**pair[1], **pair[0]})


def prompts() -> st.SearchStrategy:
    """Mostly a valid prompt, so that what follows it is reached, else any JSON value."""
    return st.one_of(st.just("a fox"), st.just("a fox in the snow"), json_values())


def assert_clean(text: str) -> None:
    assert not any(marker in text for marker in MARKERS), text[:2000]


def assert_ours(error: BaseException) -> None:
    """Only a WanLoraError, short, secret-free, with nothing chained below it that holds a secret (what a
    traceback would show: the cause, or the context unless suppressed)."""
    assert isinstance(error, WanLoraError), f"{type(error).__name__}: {error}"[:2000]
    assert len(str(error)) < 2000, str(error)[:300]
    assert_clean(str(error))
    below = shown_below(error)
    while below is not None:
        assert_clean(f"{type(below).__name__}: {below}")
        below = shown_below(below)


def shown_below(error: BaseException) -> BaseException | None:
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def refused_or_accepted(call) -> None:
    try:
        call()
    except Accepted:
        event("accepted")
        return
    except BaseException as error:  # whatever it is: what it is, is what is tested
        event(f"refused: {type(error).__name__}")
        assert_ours(error)


@pytest.fixture(scope="module", autouse=True)
def loopback(tmp_path_factory):
    """Links answer on 127.0.0.1 (404, or an empty file); the denoising is never reached."""
    global PORT
    from wanlora import net

    patch = pytest.MonkeyPatch()
    patch.setenv("WANLORA_CACHE", str(tmp_path_factory.mktemp("fuzz-inputs-cache")))
    patch.setenv("WANLORA_ALLOW_PRIVATE_URLS", "1")
    patch.setenv("WANLORA_DOWNLOAD_TIMEOUT", "5")
    patch.setattr(net, "BACKOFF_SECONDS", 0.001)
    patch.setattr(net, "MAX_RETRY_AFTER", 0)

    def accepted(*args, **kwargs):
        raise Accepted()

    patch.setattr(WanLoraPipeline, "_denoise", accepted)
    with FileServer() as server:
        PORT = int(server.url.rsplit(":", 1)[1])
        yield server
    patch.undo()


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return WanLoraPipeline.from_pretrained(str(tiny_dir))


SMALL = {"width": 64, "height": 48, "num_frames": 5, "num_inference_steps": 1}


# ------------------------------------------------------------------ the Python API


def generate_names() -> list[str]:
    from wanlora.options import option_names

    return [name for name in option_names() if name != "prompt"]


@FUZZ
@given(prompt=prompts(), fields=fields_of(generate_names()))
def test_python_generate(prompt, fields, pipe):
    refused_or_accepted(lambda: pipe.generate(prompt, **{**SMALL, **fields}))


@FUZZ
@given(prompt=prompts(), fields=fields_of([*generate_names(), "strengths", "strengths_2", "seeds", "prompts",
                                                "max_width"]))  # fmt: skip
def test_python_sweep(prompt, fields, pipe):
    axes = {} if {"strengths", "strengths_2", "seeds", "prompts"} & set(fields) else {"seeds": [1]}
    refused_or_accepted(lambda: pipe.sweep(prompt, **{**SMALL, **axes, **fields}))


# ------------------------------------------------------------------ the predictor and batch lines


PREDICTOR_NAMES = [*declared_inputs(), *carried_options()]  # every input predict.py may offer


@pytest.fixture(scope="module")
def service(tiny_dir):
    return VideoService(override=str(tiny_dir), i2v_override="")


@FUZZ
@given(fields=fields_of(PREDICTOR_NAMES), prompt=prompts())
def test_predictor_inputs(fields, prompt, service, tmp_path_factory):
    inputs = {"prompt": prompt, "num_frames": 5, "sample_steps": 1, **fields}
    inputs = {name: value for name, value in inputs.items() if name in PREDICTOR_NAMES}
    out = tmp_path_factory.mktemp("predicted")
    refused_or_accepted(lambda: service.generate(PredictorInputs.of(**inputs), out))


LINE_NAMES = [*generate_names(), "prompt", "model", "output", "quality", *PREDICTOR_NAMES]


@FUZZ
@given(lines=st.lists(fields_of(LINE_NAMES), min_size=1, max_size=3), model=st.sampled_from(["tiny", None]))
def test_batch_lines(lines, model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lines")
    lines = [{**({"model": model, "prompt": "a fox", **SMALL} if model else {}), **line} for line in lines]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(line, allow_nan=True) + "\n" for line in lines))

    def run() -> None:
        jobs = read_jobs(folder / "jobs.jsonl")
        runner = JobRunner()
        for job in jobs:
            entry = runner.run(job, folder / "out")
            assert "a bug" not in entry.get("error", ""), entry["error"][:2000]
            assert_clean(json.dumps(entry))

    refused_or_accepted(run)


# ------------------------------------------------------------------ the CLI


FLAGS = ["--model", "--lora", "--lora-high", "--accelerator", "--negative-prompt", "--image", "--last-image",
         "--resize", "--resolution", "--aspect-ratio", "--width", "--height", "--frames", "--fps", "--steps",
         "--guidance", "--guidance-2", "--shift", "--seed", "--fast-mode", "--quality", "--device",
         "--quantize"]  # fmt: skip
SWEEP_FLAGS = ["--strengths", "--strengths-2", "--seeds", "--max-width"]


def as_argument(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


def cli_arguments(flags: list[str]) -> st.SearchStrategy:
    pairs = st.lists(st.tuples(st.sampled_from(flags), json_values().map(as_argument)), max_size=4)
    return pairs.map(lambda chosen: [part for flag, value in chosen for part in (flag, value)])


def assert_cli_ours(result) -> None:
    output = result.stdout + result.stderr
    assert_clean(output)
    if result.returncode in (0, 3):
        return
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and len(errors) == 1, output[-2000:]  # one line; 1 would be a bug
    assert len(errors[0]) < 2000


@FUZZ
@given(command=st.sampled_from(["generate", "sweep"]), prompt=prompts().map(as_argument),
       arguments=cli_arguments(FLAGS + SWEEP_FLAGS))  # fmt: skip
def test_cli_generate_and_sweep(command, prompt, arguments, cli, tmp_path_factory):
    if command == "generate":
        arguments = [a for a in arguments if a not in SWEEP_FLAGS]
    base = ["--model", "tiny", "--width", "64", "--height", "48", "--frames", "5", "--steps", "1"]
    argv = [command, prompt or "a fox", *base, *arguments, *(["--seeds", "1"] if command == "sweep" else [])]
    try:
        result = cli(*argv, cwd=tmp_path_factory.mktemp("cli"))
    except Accepted:
        return
    assert_cli_ours(result)


@FUZZ
@given(lines=st.lists(fields_of(LINE_NAMES), min_size=1, max_size=2), flags=cli_arguments(["--actors", "--quality"]))
def test_cli_batch(lines, flags, cli, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-batch")
    lines = [{"model": "tiny", "prompt": "a fox", **SMALL, **line} for line in lines]
    (folder / "jobs.jsonl").write_text("".join(json.dumps(line, allow_nan=True) + "\n" for line in lines))
    try:
        result = cli("batch", str(folder / "jobs.jsonl"), "--out", str(folder / "out"), *flags, cwd=folder)
    except Accepted:
        return
    assert_cli_ours(result)
    manifest = Path(folder / "out" / "manifest.jsonl")
    if manifest.exists():
        assert_clean(manifest.read_text())
