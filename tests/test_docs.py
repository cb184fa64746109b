"""The README and docs/ say what the code does: the quick start runs as written, every link resolves,
the snippets run, the tables name what the code takes, and the tiny model carries LoRAs to try."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from wanlora import WanLoraPipeline
from wanlora.lora.layouts import read_lora

from .conftest import SMALL, probe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def fenced_block(page: Path, marker: str) -> str:
    """The fenced code block right after the comment that starts with `marker`."""
    after = page.read_text().split(marker, 1)[1]
    block = re.match(r"[^\n]*\n```\w*\n(.*?)\n```", after, re.S)
    assert block, f"no code block after {marker!r} in {page.name}"
    return block.group(1)


def without_code(text: str) -> str:
    """Markdown with its fenced blocks and inline code removed: what is left is prose, headings and links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """A heading's anchor, as Python-Markdown's toc (the docs site) and GitHub (the README) both make it."""
    text = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """A page's anchors: its headings, and the objects mkdocstrings documents (`::: name`)."""
    text = page.read_text()
    found = {slug(h) for h in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)}
    return found | set(re.findall(r"^::: (\S+)", text, re.M))


# ---------------------------------------------------------------------------- the README's quick start


def test_the_readmes_quick_start_runs_as_written(tmp_path):
    script = fenced_block(README, "<!-- quick-start:")
    assert len(script.splitlines()) <= 20, "the quick start fits one screen"
    python = f"{shlex.quote(sys.executable)} -m wanlora "
    commands, count = re.subn(r"^wanlora ", python, script, flags=re.M)
    assert count >= 5 and "wanlora " not in commands.replace(python, "")  # every command, as written
    run = subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", commands], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "layout: original-Wan names" in run.stdout  # lora inspect, as the README describes it
    for name in ("fox.mp4", "fox-loras.mp4", "grid.mp4", "runs/job-0001.mp4", "runs/boat.mp4"):
        assert len(probe(tmp_path / name).frames) == 9, name
    manifest = [json.loads(line) for line in (tmp_path / "runs" / "manifest.jsonl").read_text().splitlines()]
    assert [(e["output"], e["status"]) for e in manifest] == [("job-0001.mp4", "done"), ("boat.mp4", "done")]
    again = subprocess.run(["bash", "-c", commands.splitlines()[-1]], cwd=tmp_path, capture_output=True, text=True)
    assert "0 done, 2 already done" in again.stdout  # "run it again and it skips what is done"


# ---------------------------------------------------------------------------- links and words


def test_every_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_on_the_site():
    config = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s+(\S+\.md)$", config, re.M))
    assert listed == {page.name for page in DOCS.glob("*.md")}


def test_the_documentation_speaks_of_the_project_and_its_users_only():
    # how the project was built is no user's business: no sessions, lent machines or the builders' tools
    outside = re.compile(
        r"\bthis (2-core|machine|CPU|GPU)\b|\bsessions?\b|\blent\b|\bdevice (call|session|time)\b|"
        r"\brun\(command|\bcarry=|/work/|KINDS\.md|\bthe lead\b",
        re.I,
    )
    for page in PAGES:
        for number, line in enumerate(without_code(page.read_text()).splitlines(), 1):
            assert not outside.search(line), f"{page.relative_to(ROOT)}:{number}: {line.strip()}"


# ---------------------------------------------------------------------------- commands and flags


def cli_parser():
    from wanlora.frontends.cli import build_parser

    return build_parser()


def documented_commands(page: Path) -> list[str]:
    """Every `wanlora ...` command of a page, after `wanlora`: the lines of its code blocks (a line continued
    with `\\`, or a synopsis line continued by an indented `[`, joined), and its inline code."""
    text = page.read_text()
    blocks = re.findall(r"^```\w*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [command for block in blocks for command in block_commands(block)] + re.findall(r"`wanlora ([^`]*)`", prose)


def block_commands(block: str) -> list[str]:
    block = re.sub(r"\n\s+(?=\[)", " ", re.sub(r"\\\n\s*", " ", block))
    return [command for line in block.splitlines() for command in re.findall(r"(?:^|&&|-m)\s*wanlora ([^#]*)", line)]


def flags_of(parser: argparse.ArgumentParser, *, skip_group: str | None = None) -> set[str]:
    return {
        flag
        for group in parser._action_groups  # argparse keeps no public list of a parser's options
        if group.title != skip_group
        for action in group._group_actions
        for flag in action.option_strings
    }


def test_every_documented_command_and_flag_is_the_clis():
    from wanlora.frontends.cli import command_chain

    parser, wrong = cli_parser(), []
    for page in PAGES:
        for command in documented_commands(page):
            words = re.findall(r"[^\s\[\]|]+", command)
            chain = command_chain(parser, words)
            if words[0] != "COMMAND" and not words[0].startswith("-") and len(chain) == 1:
                wrong.append(f"{page.name}: no such command: wanlora {command}")
            known = {flag for each in chain for flag in each._option_string_actions}
            wrong += [f"{page.name}: wanlora {chain[-1].prog.split(' ', 1)[-1]} has no {word}" for word in words
                      if word.startswith("-") and word.split("=")[0] not in known]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_the_cli_pages_synopsis_names_every_flag_of_every_command():
    from wanlora.frontends.cli import command_chain

    parser, missing = cli_parser(), []
    generate = command_chain(parser, ["generate"])[-1]
    synopsis = re.search(r"^```\w*\n(.*?)^```", (DOCS / "cli.md").read_text(), re.S | re.M)
    assert synopsis, "docs/cli.md opens with its synopsis"
    for line in block_commands(synopsis.group(1)):
        words = re.findall(r"[^\s\[\]|]+", line)
        command = command_chain(parser, words)[-1]
        named = set(words)
        if "generate's options but the several-GPU ones" in line:
            shared = flags_of(generate, skip_group="several GPUs")
            assert shared <= flags_of(command), "the sweep takes all it says it shares with generate"
            named |= shared
        for action in command._actions:
            if (
                action.option_strings
                and action.dest not in ("help", "verbose")
                and not named & set(action.option_strings)
            ):
                missing.append(f"{command.prog}: {'/'.join(action.option_strings)}")
    assert not missing, "\n".join(missing)


def test_the_environment_page_names_every_variable_settings_reads_with_its_default():
    from wanlora import settings

    read = set(re.findall(r'"(WANLORA_[A-Z0-9_]+)"', (ROOT / "wanlora" / "settings.py").read_text()))
    mentioned = {name for page in PAGES for name in re.findall(r"WANLORA_[A-Z0-9_]+", page.read_text())}
    assert mentioned == read, f"named in the docs only: {mentioned - read}; read only: {read - mentioned}"
    rows = [row.strip("|").split("|") for row in (DOCS / "environment.md").read_text().splitlines()[4:]]
    defaults = {name: row[1].strip() for row in rows if len(row) > 2 for name in re.findall(r"`(\w+)`", row[0])}
    assert read <= set(defaults)
    for name, default in [
        ("WANLORA_CACHE_MAX_GB", settings.DEFAULT_CACHE_MAX_GB),
        ("WANLORA_MAX_LORA_GB", settings.DEFAULT_MAX_LORA_GB),
        ("WANLORA_DOWNLOAD_TIMEOUT", settings.DEFAULT_DOWNLOAD_TIMEOUT_S),
    ]:
        assert defaults[name] == f"{default:g}", name


def test_the_api_pages_errors_are_wanloras_own_names():
    import wanlora

    page = (DOCS / "api.md").read_text()
    listed = re.search(r"::: wanlora\.errors\n.*?members: \[(.*?)\]", page, re.S)
    assert listed, "docs/api.md documents wanlora.errors' members"
    names = [name.strip() for name in listed.group(1).split(",")]
    assert [name for name in names if not hasattr(wanlora, name)] == []  # `wanlora.OutOfMemory`, as the page says
    assert set(names) <= set(wanlora.__all__)


def test_the_python_page_names_every_keyword_of_from_pretrained():
    import inspect

    line = re.search(r"`from_pretrained` takes (.*?): see", (DOCS / "python.md").read_text(), re.S)
    assert line, "docs/python.md lists from_pretrained's keywords"
    named = set(re.findall(r"`(\w+)`", line.group(1)))
    assert named == set(inspect.signature(WanLoraPipeline.from_pretrained).parameters) - {"model"}


def test_troubleshootings_offline_error_is_the_one_a_model_missing_from_the_cache_gives(tmp_path):
    from .conftest import run_cli

    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANLORA_WEIGHTS": ""}
    run = run_cli("generate", "a fox", "--model", "t2v-1.3b", "-o", str(tmp_path / "fox.mp4"), env=offline)
    assert run.returncode == 2 and run.stderr.startswith("wanlora: error: "), run.stderr
    page = " ".join((DOCS / "troubleshooting.md").read_text().split())  # its lines joined
    assert run.stderr.removeprefix("wanlora: error: ").strip() in page


def test_the_hubs_command_the_docs_give_comes_with_huggingface_hub():
    commands = {word for page in PAGES for word in re.findall(r"`(\S+) download \S+/\S+", page.read_text())}
    assert commands == {"hf"}
    assert shutil.which("hf", path=str(Path(sys.executable).parent)), "huggingface_hub's `hf` command"


# ---------------------------------------------------------------------------- tables and snippets


def test_the_batch_field_table_names_every_field_of_each_form():
    from wanlora.frontends.batch import BATCH_FIELDS, PREDICTOR_FIELDS, parse_job
    from wanlora.options import option_names

    page = (DOCS / "sweeps-and-batches.md").read_text()
    table = page.split("<!-- batch fields:", 1)[1].split("\n\n", 1)[0].splitlines()[3:]  # after the header
    library, predictor = set(), set()
    for row in table:
        first, second = row.strip("|").split("|")[:2]
        library |= set(re.findall(r"`([a-z0-9_]+)`", first))
        predictor |= set(re.findall(r"`([a-z0-9_]+)`", second))
    assert library == {"model", *option_names(), *BATCH_FIELDS}
    assert predictor == {*PREDICTOR_FIELDS, "output"}
    assert "(`job-0002.mp4` for line 2)" in page
    assert parse_job(2, '{"prompt": "a fox", "model": "tiny"}').output == "job-0002.mp4"


@pytest.mark.parametrize(
    "line, example",
    [
        ({"prompt": "a fox", "num_inference_steps": 2, "lora_scale": 0.5}, None),  # quoted whole
        ({"prompt": "a fox", "model": "tiny", "lorass": []}, None),
        ({"prompt": "a fox", "model": "tiny", "lora_weights": "owner/repo"}, "`tiny` with `lora_weights`"),
        ({"prompt": "a fox", "model": "1.3b", "num_inference_steps": 2}, "`1.3b` with `num_inference_steps`"),
    ],
)
def test_the_batch_pages_refusals_are_what_a_batch_says(tmp_path, line, example):
    from wanlora.errors import WanLoraError
    from wanlora.frontends.batch import read_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a fox", "model": "tiny"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(WanLoraError) as refused:
        read_jobs(jobs)
    message = str(refused.value).split(" (the batch docs'")[0]  # the page is where that hint points
    page = " ".join((DOCS / "sweeps-and-batches.md").read_text().split())  # its lines joined
    if example is None:
        assert message in page or message.split(": ", 1)[1] in page, message
    else:
        assert "not both" in message and example in page, message


def test_the_test_lora_snippet_writes_a_lora_the_tiny_model_takes(tmp_path, monkeypatch, fresh_tiny_pipe):
    code = fenced_block(DOCS / "loras.md", "<!-- test-lora:")
    assert len([line for line in code.splitlines() if line.strip()]) == 5  # "five lines"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/loras.md", "exec"), {})
    before = {name: param.detach().clone() for name, param in fresh_tiny_pipe.transformer.named_parameters()}
    fresh_tiny_pipe.set_loras([(str(tmp_path / "my-lora.safetensors"), 1.0)])
    changed = {n for n, p in fresh_tiny_pipe.transformer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"blocks.0.attn1.to_q.weight"}


@pytest.mark.slow
def test_a_tiny_model_carries_two_loras_in_published_layouts(tiny_dir):
    style, motion = tiny_dir / "loras" / "style.safetensors", tiny_dir / "loras" / "motion.safetensors"
    with safe_open(str(style), "pt") as file:
        assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in file.keys()
    with safe_open(str(motion), "pt") as file:
        assert "lora_unet_blocks_0_ffn_0.lora_up.weight" in file.keys()
    assert read_lora(style).layout == "original-Wan names, lora_down/up (ComfyUI, kijai)"
    assert read_lora(motion).layout == "kohya / musubi-tuner"
    assert {kind.split(".")[0] for kind in read_lora(style).module_kinds} == {"attn1", "attn2"}
    assert set(read_lora(motion).module_kinds) == {"ffn.net.0.proj", "ffn.net.2"}

    pipe = WanLoraPipeline.from_pretrained(str(tiny_dir))
    base = pipe.generate("a fox", **SMALL, seed=1, progress=False)
    both = pipe.generate("a fox", **SMALL, seed=1, loras=[(str(style), 0.8), (str(motion), 0.5)], progress=False)
    assert base is not None and both is not None
    assert not np.array_equal(base.frames, both.frames)


def test_the_readme_says_how_to_install_for_a_cpu_a_gpu_and_a_contributor():
    install = README.read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    for audience in ("**On a CPU**", "**On an NVIDIA GPU**", "**To contribute**"):
        assert audience in install
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([a-z0-9_]+) = \[", section, re.M))
    named = {extra for group in re.findall(r'"\.\[([a-z0-9_,]+)\]"', install) for extra in group.split(",")}
    assert {"gpu", "gguf"} <= named and named <= extras  # every extra it names exists
    assert "bash .ci/test.sh" in install and (ROOT / ".ci" / "test.sh").exists()
