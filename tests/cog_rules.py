"""The rules Cog's config loader applies to cog.yaml before anything else runs, mirrored for tests.

The Cog CLI is a Go binary that is not on PyPI, so CI cannot run its loader. These are the
checks of replicate/cog pkg/config (validate.go: ValidateConfigFile and its helpers; env.go;
config.go: validateAndCompleteCUDA) and pkg/cli/push.go (validatePushArgs), commit 6110c912.
Re-read those files after upgrading Cog.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

SCHEMA = Path(__file__).parent / "data" / "cog_config_schema_v1.0.json"  # pkg/config/data, 0.22-0.23
MINIMUM_PYTHON = (3, 10)
MINIMUM_CUDA_MAJOR = 11
# major.minor of every CUDA in pkg/config/cuda_compatibility.json: completing the config picks a
# cuDNN for the CUDA asked for, and fails for one it does not know
KNOWN_CUDA = {f"11.{minor}" for minor in range(9)} | {f"12.{minor}" for minor in (0, 1, 2, 3, 4, 5, 6, 8, 9)}
KNOWN_CUDA |= {"13.0", "13.1", "13.2"}
ENV_DENY = (  # env.go: names Cog or Replicate set themselves
    "PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV PYTHONUNBUFFERED R8_* REPLICATE_* LIBRARY_PATH CUDA_* NVIDIA_* NV_* "
    "PGET_* HF_ENDPOINT HF_HUB_ENABLE_HF_TRANSFER KUBERNETES_*"
).split()
WEIGHT_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
# go-containerregistry's repository grammar: an optional registry host, then lowercase path components
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?{COMPONENT}(?:/{COMPONENT})*")


def config_problems(config: dict[str, Any], project: Path) -> list[str]:
    """Every error Cog's loader reports for `config` (a parsed cog.yaml) in the folder `project`."""
    import jsonschema

    found: list[str] = []
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    found += [f"schema: {error.message}" for error in validator.iter_errors(config)]
    found += _run_problems(config)
    found += _build_problems(config.get("build") or {}, project)
    found += _environment_problems(config.get("environment") or [])
    found += _model_problems(config)
    found += _weights_problems(config)
    return found


def _run_problems(config: dict) -> list[str]:
    if config.get("run") and config.get("predict"):
        return ["run: only one of run or predict can be set"]
    ref = config.get("run") or config.get("predict")
    if ref and len(ref.split(".py:")) != 2:
        return ["run: must be in the form 'run.py:Runner'"]
    return []


def _build_problems(build: dict, project: Path) -> list[str]:
    found = []
    version = str(build.get("python_version") or "")
    parts = version.split(".")
    if not version:
        found.append("build.python_version: python_version is required")
    elif len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        found.append("build.python_version: must include major and minor version")
    elif (int(parts[0]), int(parts[1])) < MINIMUM_PYTHON:
        found.append("build.python_version: minimum supported Python version is 3.10")
    requirements = build.get("python_requirements")
    if build.get("python_packages") and requirements:
        found.append("build: only one of python_packages or python_requirements can be set, not both")
    if requirements and not (project / requirements).is_file():
        found.append("build.python_requirements: file does not exist")
    cuda = str(build.get("cuda") or "")
    if cuda:
        major_minor = ".".join(cuda.split(".")[:2])
        if len(cuda.split(".")) < 2 or not cuda.split(".")[0].isdigit():
            found.append("build.cuda: must include both major and minor versions")
        elif int(cuda.split(".")[0]) < MINIMUM_CUDA_MAJOR:
            found.append("build.cuda: minimum supported CUDA version is 11")
        elif major_minor not in KNOWN_CUDA:
            found.append(f"build.cuda: no cuDNN is known for CUDA {cuda}")
    return found


def _environment_problems(environment: list[str]) -> list[str]:
    seen: set[str] = set()
    for item in environment:
        name, sep, _ = item.partition("=")
        if not sep or not name:
            return [f"environment: {item!r} is not in the KEY=VALUE format"]
        if any(name == deny or (deny.endswith("*") and name.startswith(deny[:-1])) for deny in ENV_DENY):
            return [f"environment: {name!r} is reserved for internal use"]
        if name in seen:
            return [f"environment: {name!r} is already defined"]
        seen.add(name)
    return []


def _model_problems(config: dict) -> list[str]:
    model, image = config.get("model"), config.get("image")
    if model and image:
        return ["model: 'model' and 'image' cannot both be set"]
    if not model:
        return []
    if "@" in model or ":" in model.rsplit("/", 1)[-1]:
        return ["model: must be a bare repository — tags and digests are not allowed"]
    if not REPOSITORY.fullmatch(model):
        return ["model: invalid repository"]
    return []


def _weights_problems(config: dict) -> list[str]:
    weights = config.get("weights") or []
    if not weights:
        return []
    found = []
    if not config.get("model"):
        found.append(
            "image: weights require 'model', not 'image' — rename 'image' to 'model'"
            if config.get("image")
            else "model: weights require 'model' in cog.yaml — rename 'image' to 'model'"
        )
    names: set[str] = set()
    targets: list[str] = []
    for index, weight in enumerate(weights):
        where = f"weights[{index}]"
        name = weight.get("name") or ""
        if not name:
            found.append(f"{where}.name: name is required")
        elif not WEIGHT_NAME.fullmatch(name):
            found.append(f"{where}.name: only lowercase letters and digits, joined by hyphens, dots or underscores")
        elif name in names:
            found.append(f"{where}.name: duplicate weight name")
        names.add(name)
        sources = weight.get("source") or []
        sources = [sources] if isinstance(sources, dict) else sources
        if not sources:
            found.append(f"{where}.source: source is required")
        for source in sources:
            for pattern in [*(source.get("include") or []), *(source.get("exclude") or [])]:
                pattern = pattern.strip()
                if not pattern:
                    found.append(f"{where}.source: pattern must not be empty")
                elif pattern.startswith("!") or "\\" in pattern:
                    found.append(f"{where}.source: {pattern!r} is a negation or uses backslashes")
        target = weight.get("target") or ""
        if not target:
            found.append(f"{where}.target: target is required")
            continue
        cleaned = posixpath.normpath(target)
        if not posixpath.isabs(target):
            found.append(f"{where}.target: target must be an absolute path")
        if cleaned == "/":
            found.append(f'{where}.target: target must not be the container root "/"')
        if cleaned in targets:
            found.append(f"{where}.target: duplicate weight target")
        elif any(cleaned.startswith(t + "/") or t.startswith(cleaned + "/") for t in targets):
            found.append(f"{where}.target: weight targets must be disjoint")
        targets.append(cleaned)
    return found


def push_problems(command: str, config: dict[str, Any]) -> list[str]:
    """What `cog push` (pkg/cli/push.go, validatePushArgs) refuses in `command` for `config`."""
    words = shlex.split(command)
    words = words[words.index("cog") :]
    positional, skip = [], False
    for word in words[2:]:
        if skip:
            skip = False
        elif word in ("-f", "--file"):
            skip = True
        elif not word.startswith("-"):
            positional.append(word)
    if config.get("model") and positional:
        return ["positional image argument not supported with 'model' config"]
    if not config.get("model") and not config.get("image") and not positional:
        return ["no model ref — set 'model' in cog.yaml or COG_MODEL, or give an image name"]
    return []
