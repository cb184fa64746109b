"""The Hugging Face Hub: downloads, a pre-fetched weights folder, and one translator for errors.

huggingface_hub raises a family of nested exceptions (a gated repo is a missing repo is an
HTTP error; an offline cache miss is a missing entry), each read by its most specific class.
`hub_errors` turns each into wanlora's own error once, for model loading and LoRA fetching
alike: `ModelNotFound` for a model, a `LoraError` with `ref` and `status` for a LoRA.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LoraAuthRequired, LoraDownloadError, LoraNotFound, ModelNotFound, NoSuchHubRepo, WanLoraError
from .paths import inside
from .settings import weights_dir

logger = logging.getLogger(__name__)

# What a diffusers-layout Wan repo needs for loading; duplicate .bin/.pth weights are left out.
MODEL_FILES = ("model_index.json", "*.json", "*.safetensors", "*.txt", "*.model")


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of whichever HTTP client this huggingface_hub version uses."""
    import requests

    errors: list[type[BaseException]] = [requests.ConnectionError, requests.Timeout]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _classify(exc: BaseException) -> str | None:
    """The kind of a huggingface_hub or transport error, read from the most specific class it is
    an instance of, as httpx's map_exceptions does; a plain HfHubHTTPError only when nothing
    narrower matches (RemoteEntryNotFoundError is both an HTTP error and a missing entry)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kinds = {
        GatedRepoError: "gated",
        RepositoryNotFoundError: "no_repo",
        RevisionNotFoundError: "no_revision",
        LocalEntryNotFoundError: "offline",
        OfflineModeIsEnabled: "offline",
        EntryNotFoundError: "no_file",
        **dict.fromkeys(transport_errors(), "unreachable"),
    }
    matching = [cls for cls in kinds if isinstance(exc, cls)]
    narrowest = [cls for cls in matching if not any(o is not cls and issubclass(o, cls) for o in matching)]
    if narrowest:
        return kinds[min(narrowest, key=type(exc).__mro__.index)]
    return "http" if isinstance(exc, HfHubHTTPError) else None


def translate(
    exc: BaseException,
    repo: str,
    *,
    ref: str | None = None,
    revision: str | None = None,
    filename: str | None = None,
    missing_means: str = "",
) -> WanLoraError | None:
    """wanlora's error for a huggingface_hub exception, or None when `exc` is not one.

    `missing_means` finishes the message for a missing file: what its absence says.
    """
    kind = _classify(exc)
    if kind is None:
        return None
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if kind == "http" and status in (401, 403):
        kind = "denied"
    lora = ref is not None
    subject = f"{ref}: " if lora else ""
    token = "HF_TOKEN (or the hf_api_token input)" if lora else "HF_TOKEN"
    messages = {
        "gated": (LoraAuthRequired, f"{subject}{repo} is gated; accept its terms on the Hub, then set {token}"),
        "no_repo": (
            NoSuchHubRepo,
            f"no Hugging Face repo {repo} (or it is private: set {token})"
            if lora
            else f"{repo} is not a Hub repo you can read: check the name, or set HF_TOKEN",
        ),
        "no_revision": (LoraNotFound, f"{subject}{repo} has no revision {revision!r}"),
        "offline": (
            LoraDownloadError,
            f"{subject}the Hugging Face Hub cannot be reached and {repo}/{filename or ''} is not in its cache"
            + ("" if lora else ": connect once, or point --model at a local diffusers-layout folder"),
        ),
        "no_file": (
            LoraNotFound,
            f"{subject}{repo} has no file {filename!r}" + (missing_means and f": {missing_means}"),
        ),
        "unreachable": (
            LoraDownloadError,
            f"{subject}the Hugging Face Hub cannot be reached ({type(exc).__name__}) for {repo}; "
            "check the network, or set HF_HUB_OFFLINE=1 to use cached files",
        ),
        "denied": (LoraAuthRequired, f"{subject}the Hub refused access to {repo} ({status}); set {token}"),
        "http": (LoraDownloadError, f"{subject}the Hub answered {status or 'an error'} for {repo}; try again later"),
    }
    error_type, message = messages[kind]
    if not lora:
        return ModelNotFound(message)
    return error_type(message, ref, status)


@contextmanager
def hub_errors(repo: str, **context: Any) -> Iterator[None]:
    """Raise wanlora's error for any huggingface_hub failure inside; see `translate` for `context`."""
    try:
        yield
    except WanLoraError:
        raise
    except Exception as exc:
        error = translate(exc, repo, **context)
        if error is None:
            raise
        logger.debug("the Hub's error for %s: %s", repo, exc)  # scrubbed by the handlers; not chained to ours
        raise error from None


def local_copy(repo: str, filename: str | None = None) -> Path | None:
    """`repo` (or one file of it) in the pre-fetched weights folder (WANLORA_WEIGHTS), if there.

    Both names come from requests: `inside` refuses any that could lead out of the folder.
    """
    root = weights_dir()
    if root is None:
        return None
    path = inside(root, repo, *([filename] if filename else []))
    return path if path.exists() else None


def download_model(repo: str, skip: list[str] | None = None) -> Path:
    """The local folder of a diffusers-layout model repo, downloaded (or found in the Hub cache).

    Components named in `skip` (already loaded, shared from another variant) are not fetched.
    """
    from huggingface_hub import snapshot_download

    ignored = [f"{component}/*" for component in skip or []]
    with hub_errors(repo):
        return Path(snapshot_download(repo, allow_patterns=list(MODEL_FILES), ignore_patterns=ignored))


def download_file(repo: str, filename: str) -> Path:
    """One file of a Hub repo (a single-file transformer), from the weights folder, the Hub cache or the Hub."""
    from huggingface_hub import hf_hub_download

    prefetched = local_copy(repo, filename)
    if prefetched is not None:
        return prefetched
    with hub_errors(repo, filename=filename, missing_means="check the file's path in the repo"):
        return Path(hf_hub_download(repo, filename))


def read_config(path: Path) -> dict[str, Any]:
    """A config file's JSON object; a file that is not one is named."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelNotFound(f"{path} does not read as a JSON config ({exc}): download the model again") from None
    if not isinstance(value, dict):
        raise ModelNotFound(f"{path} holds a JSON {type(value).__name__}, not the config object it should")
    return value


def model_configs(repo: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Hub model's transformer config.json and model_index.json, a few hundred bytes each, to identify it."""
    from huggingface_hub import hf_hub_download

    found = []
    for filename in ("transformer/config.json", "model_index.json"):
        with hub_errors(repo, filename=filename, missing_means="it is not a diffusers-layout Wan model"):
            found.append(read_config(Path(hf_hub_download(repo, filename))))
    return found[0], found[1]
