"""Source -> a verified local .safetensors file.

Hub files go through huggingface_hub (so HF_ENDPOINT, HF_TOKEN and the Hub cache apply).
Everything else is downloaded here into wanlora's cache (see cache.py): over https only,
to public addresses only (checked again after every redirect), streamed to a partial
file, resumed with Range, retried with backoff, length-checked, size-capped, verified by
content, and only then renamed into place. Tokens travel in headers, never in URLs,
logs, errors or cache keys.
"""

from __future__ import annotations

import hashlib
import importlib
import ipaddress
import logging
import os
import socket
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from tqdm import tqdm

from ..errors import LoraAuthRequired, LoraDownloadError, LoraError, LoraFormatError, LoraNotFound
from .cache import LoraCache
from .metadata import card_trigger_words, trigger_words
from .refs import Source, canonical_url, parse_ref, resolve_local
from .sniff import header_metadata, is_tar, read_header

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
MAX_ATTEMPTS = 4
BACKOFF_SECONDS = 1.0  # doubles after each failed attempt
MAX_REDIRECTS = 10
CHUNK = 1 << 20
DEFAULT_MAX_GB = 4.0


def civitai_base() -> str:
    return os.environ.get("WANLORA_CIVITAI_URL", "https://civitai.com").rstrip("/")


def replicate_base() -> str:
    return os.environ.get("WANLORA_REPLICATE_URL", "https://replicate.com").rstrip("/")


def max_lora_bytes() -> int:
    return int(float(os.environ.get("WANLORA_MAX_LORA_GB", DEFAULT_MAX_GB)) * 2**30)


def private_urls_allowed() -> bool:
    return os.environ.get("WANLORA_ALLOW_PRIVATE_URLS") == "1"


class NoSuchHubRepo(LoraNotFound):
    """The Hub has no such repo (or hides a private one): `owner/repo` may be a Replicate model."""


@dataclass(frozen=True)
class Credentials:
    """Per-request tokens; None falls back to HF_TOKEN / CIVITAI_API_TOKEN."""

    hf_token: str | None = None
    civitai_token: str | None = None

    def civitai(self) -> str | None:
        return self.civitai_token or os.environ.get("CIVITAI_API_TOKEN") or None


@dataclass(frozen=True)
class FetchedLora:
    """A verified local LoRA file, where it came from, and its trigger words."""

    path: Path
    source: str  # the canonical reference: no secrets
    size: int
    sha256: str | None = None
    trigger_words: list[str] = field(default_factory=list)


def fetch_lora(ref: str, credentials: Credentials | None = None, cache: LoraCache | None = None) -> FetchedLora:
    """Resolve, download (or reuse) and verify the LoRA that `ref` names."""
    credentials = credentials or Credentials()
    cache = cache or LoraCache()
    source = parse_ref(ref)
    label = canonical_url(ref) if "://" in ref else ref.strip()
    if source.kind == "local":
        path = resolve_local(str(source.path))
        return _verified(path, source.canonical, label)
    if source.kind == "hub":
        return _fetch_hub(source, label, credentials)
    if source.kind == "hub_or_replicate":
        try:
            return _fetch_hub(source, label, credentials)
        except NoSuchHubRepo as hub_error:
            replicate = Source("replicate", f"replicate:{source.repo_id}", repo_id=source.repo_id)
            try:
                return _fetch_replicate(replicate, label, cache)
            except LoraError as replicate_error:
                raise LoraNotFound(
                    f"{label} was tried as a Hugging Face repo ({hub_error}) and as a Replicate model "
                    f"({replicate_error}); check the name"
                ) from replicate_error
    if source.kind == "civitai":
        return _fetch_civitai(source, label, credentials, cache)
    if source.kind == "replicate":
        return _fetch_replicate(source, label, cache)
    return _download(source.url, source.canonical, label, cache)


# ---------------------------------------------------------------------------- Hugging Face


def _fetch_hub(source: Source, label: str, credentials: Credentials) -> FetchedLora:
    from huggingface_hub import HfApi, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = credentials.hf_token or None
    api = HfApi(token=token)
    repo, revision = source.repo_id, source.revision
    try:
        filename = source.filename or _single_safetensors(api, repo, revision, label)
        size = api.get_hf_file_metadata(url=hf_hub_url(repo, filename, revision=revision), token=token).size
        if size and size > max_lora_bytes():
            raise _too_big(label, size)
        path = Path(hf_hub_download(repo, filename, revision=revision, token=token))
    except GatedRepoError as exc:
        raise LoraAuthRequired(
            f"{label}: {repo} is gated; accept its terms on the Hub, then set HF_TOKEN "
            "(or hf_api_token) to a token with access"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise NoSuchHubRepo(f"no Hugging Face repo {repo} (or it is private: set HF_TOKEN / hf_api_token)") from exc
    except RevisionNotFoundError as exc:
        raise LoraNotFound(f"{label}: {repo} has no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:  # before EntryNotFoundError, its base class
        raise LoraDownloadError(f"{label}: the Hugging Face Hub cannot be reached and the file is not cached") from exc
    except EntryNotFoundError as exc:
        raise LoraNotFound(f"{label}: {repo} has no file {source.filename!r}") from exc
    except hub_transport_errors() as exc:
        raise LoraDownloadError(
            f"{label}: the Hugging Face Hub cannot be reached ({type(exc).__name__}); "
            "check the network, or set HF_HUB_OFFLINE=1 to use cached files"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise LoraAuthRequired(f"{label}: the Hub refused access ({status}); set HF_TOKEN or hf_api_token") from exc
        raise LoraDownloadError(f"{label}: the Hub answered {status or 'an error'}; try again later") from exc
    canonical = f"hf:{repo}@{revision or 'main'}/{filename}"
    fetched = _verified(path, canonical, label)
    words = list(dict.fromkeys(fetched.trigger_words + _card_trigger_words(repo, token)))
    return FetchedLora(fetched.path, canonical, fetched.size, None, words)


def hub_transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of whichever HTTP client this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [requests.ConnectionError, requests.Timeout]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _single_safetensors(api, repo: str, revision: str | None, label: str) -> str:
    files = [f for f in api.list_repo_files(repo, revision=revision) if f.endswith(".safetensors")]
    if len(files) == 1:
        return files[0]
    if not files:
        raise LoraNotFound(f"{label}: {repo} has no .safetensors file")
    listing = ", ".join(files[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
    raise LoraNotFound(f"{label}: {repo} has several .safetensors files; pick one as {repo}/FILE: {listing}")


def _card_trigger_words(repo: str, token: str | None) -> list[str]:
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    try:
        card = ModelCard.load(repo, token=token)
    except (HfHubHTTPError, OSError, ValueError):
        return []  # no card is normal; trigger words are a hint
    return card_trigger_words(card.data.to_dict())


# ---------------------------------------------------------------------------- Civitai, Replicate


def _fetch_civitai(source: Source, label: str, credentials: Credentials, cache: LoraCache) -> FetchedLora:
    token = credentials.civitai()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    version, words = source.version_id, []
    if version is None:
        model = _get_json(f"{civitai_base()}/api/v1/models/{source.model_id}", headers, label, "Civitai model")
        versions = model.get("modelVersions") or []
        if not versions:
            raise LoraNotFound(f"{label}: the Civitai model {source.model_id} has no downloadable version")
        version, words = str(versions[0]["id"]), versions[0].get("trainedWords") or []
    canonical = f"civitai:{version}"
    url = f"{civitai_base()}/api/download/models/{version}"
    try:
        fetched = _download(url, canonical, label, cache, headers, extra_words=words)
    except LoraNotFound as exc:
        raise LoraNotFound(
            f"{label}: Civitai has no model version {version}. The number in civitai.com/models/ID is the model "
            "page id, not the version id: use the page link with ?modelVersionId=V, or the file's download link"
        ) from exc
    except LoraAuthRequired as exc:
        raise LoraAuthRequired(
            f"{label}: Civitai needs an API token for this file; set CIVITAI_API_TOKEN (or the civitai_api_token input)"
        ) from exc
    return fetched


def _fetch_replicate(source: Source, label: str, cache: LoraCache) -> FetchedLora:
    """Replicate's `/_weights` redirects to the current weights file: that URL keys the cache,
    so a second fetch costs one redirect lookup and downloads only when the weights changed."""
    versions = f"/versions/{source.version_id}" if source.version_id else ""
    url = f"{replicate_base()}/{source.repo_id}{versions}/_weights"
    try:
        target = _first_redirect(url, label)
        canonical = source.canonical if target == url else f"{source.canonical}={canonical_url(target)}"
        return _download(target, canonical, label, cache)
    except LoraNotFound as exc:
        raise LoraNotFound(f"no Replicate model weights at {source.repo_id}{versions}") from exc


# ---------------------------------------------------------------------------- plain HTTPS


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (a seam for tests that fake DNS)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def check_url(url: str, label: str) -> None:
    """Refuse non-https URLs and hosts that resolve to non-public addresses.

    Loopback and private ranges (and plain http) pass only with WANLORA_ALLOW_PRIVATE_URLS=1;
    link-local addresses (cloud metadata services) never do.
    """
    parts = urlsplit(url)
    allow_private = private_urls_allowed()
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_private):
        raise LoraDownloadError(f"{label}: only https:// links are allowed (got {parts.scheme}://)")
    if not parts.hostname:
        raise LoraDownloadError(f"{label}: the link has no host name")
    try:
        addresses = resolve_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        raise LoraDownloadError(f"{label}: cannot resolve host {parts.hostname!r}: check the link") from exc
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_link_local:
            raise LoraDownloadError(f"{label}: {parts.hostname} resolves to link-local {address}; refused")
        if address.is_multicast or address.is_reserved or address.is_unspecified:
            raise LoraDownloadError(f"{label}: {parts.hostname} resolves to non-routable {address}; refused")
        if (address.is_loopback or address.is_private) and not allow_private:
            raise LoraDownloadError(f"{label}: {parts.hostname} resolves to private address {address}; refused")


def _open(session: requests.Session, url: str, headers: dict[str, str], label: str) -> requests.Response:
    """GET with redirects followed by hand, so that every hop's address is checked."""
    origin = urlsplit(url).netloc
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, label)
        response = session.get(
            url, headers=headers, stream=True, allow_redirects=False, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)
        )
        if response.is_redirect:
            response.close()
            url = urljoin(url, response.headers["Location"])
            if urlsplit(url).netloc != origin:  # credentials stay with the host they were meant for
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            continue
        _raise_for_status(response, label)
        return response
    raise LoraDownloadError(f"{label}: more than {MAX_REDIRECTS} redirects")


class _Retryable(Exception):
    """A failure worth another attempt: 5xx, a dropped connection, a short body."""


def _raise_for_status(response: requests.Response, label: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise LoraAuthRequired(f"{label}: the server refused access ({status}); a token is missing or lacks rights")
    if status in (404, 410):
        raise LoraNotFound(f"{label}: not found ({status})")
    if status == 416:
        raise _Retryable("range not satisfiable")
    if status >= 500 or status == 429:
        raise _Retryable(f"server answered {status}")
    if status >= 400:
        raise LoraDownloadError(f"{label}: the server answered {status}")


def _first_redirect(url: str, label: str) -> str:
    """Where `url` redirects to (checked like any hop), or `url` itself when it does not."""
    check_url(url, label)
    with requests.Session() as session:
        try:
            response = session.get(url, stream=True, allow_redirects=False, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise LoraDownloadError(f"{label}: cannot reach {urlsplit(url).hostname}: {_describe(exc)}") from exc
        with response:
            if response.is_redirect:
                return urljoin(url, response.headers["Location"])
            _raise_for_status(response, label)
            return url


RETRYABLE = (_Retryable, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def _with_retries(action, label: str, what: str):
    """Run `action` up to MAX_ATTEMPTS times, backing off after failures worth another try."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return action()
        except RETRYABLE as exc:
            if attempt + 1 == MAX_ATTEMPTS:
                raise LoraDownloadError(
                    f"{label}: {what} failed after {MAX_ATTEMPTS} attempts ({_describe(exc)}); try again"
                ) from exc
            logger.warning("%s: %s; retrying", label, _describe(exc))
            time.sleep(BACKOFF_SECONDS * 2**attempt)


def _get_json(url: str, headers: dict[str, str], label: str, what: str) -> dict:
    def lookup() -> dict:
        with requests.Session() as session:
            try:
                return _open(session, url, headers, label).json()
            except ValueError as exc:
                raise LoraDownloadError(f"{label}: the {what} lookup did not return JSON") from exc

    return _with_retries(lookup, label, f"the {what} lookup")


def _download(
    url: str,
    canonical: str,
    label: str,
    cache: LoraCache,
    headers: dict[str, str] | None = None,
    extra_words: list[str] | None = None,
) -> FetchedLora:
    """Download `url` into the cache under `canonical`, once across processes."""
    key = cache.key(canonical)
    with cache.lock(key):
        entry = cache.get(canonical)
        if entry is None:
            partial = cache.partial_path(key)
            with requests.Session() as session:
                _stream(session, url, dict(headers or {}), partial, label)
            try:
                file = _unpack_tar(partial, label) if _is_tar_file(partial) else partial
                header = read_header(file, label)
            except LoraError:
                partial.unlink(missing_ok=True)  # a bad file must not be resumed next time
                partial.with_suffix(".extracted").unlink(missing_ok=True)
                raise
            words = list(dict.fromkeys(trigger_words(header_metadata(header)) + list(extra_words or [])))
            entry = cache.put(canonical, file, _sha256(file), words)
            logger.info("downloaded %s (%.1f MiB)", label, entry.size / 2**20)
    return FetchedLora(Path(entry.path), canonical, entry.size, entry.sha256, entry.trigger_words)


def _is_tar_file(path: Path) -> bool:
    with path.open("rb") as handle:
        return is_tar(handle.read(512))


def _stream(session: requests.Session, url: str, headers: dict[str, str], partial: Path, label: str) -> None:
    """Fill `partial` with the whole body: resume by Range, retry with backoff, check lengths."""
    try:
        _with_retries(lambda: _stream_once(session, url, headers, partial, label), label, "the download")
    except LoraError:
        partial.unlink(missing_ok=True)
        raise


def _stream_once(session: requests.Session, url: str, headers: dict[str, str], partial: Path, label: str) -> None:
    """One attempt: continue from what `partial` holds when the server honours Range."""
    limit = max_lora_bytes()
    offset = partial.stat().st_size if partial.exists() else 0
    request_headers = {**headers, **({"Range": f"bytes={offset}-"} if offset else {})}
    with _open(session, url, request_headers, label) as response:
        resumed = response.status_code == 206 and offset > 0
        total = _declared_total(response, offset if resumed else 0)
        if total is not None and total > limit:
            raise _too_big(label, total)
        progress = tqdm(total=total, initial=offset if resumed else 0, unit="B", unit_scale=True,
                        unit_divisor=1024, desc=label[-40:], file=sys.stderr, leave=False, disable=None)  # fmt: skip
        with partial.open("ab" if resumed else "wb") as out, progress:
            for chunk in response.iter_content(CHUNK):
                out.write(chunk)
                progress.update(len(chunk))
                if out.tell() > limit:
                    raise _too_big(label, out.tell())
    size = partial.stat().st_size
    if total is not None and size != total:
        raise _Retryable(f"got {size} of {total} bytes")


def _declared_total(response: requests.Response, offset: int) -> int | None:
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        total = content_range.rpartition("/")[2]
        start = content_range.removeprefix("bytes ").split("-")[0]
        if not start.isdigit() or int(start) != offset:
            raise _Retryable("the server resumed at the wrong offset")
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _unpack_tar(archive: Path, label: str) -> Path:
    """The one .safetensors inside a tar (Replicate's format), extracted by content only."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".safetensors")]
            if len(members) != 1:
                named = [m for m in members if os.path.basename(m.name) == "lora.safetensors"]
                if len(named) != 1:
                    found = ", ".join(m.name for m in members) or "none"
                    raise LoraFormatError(
                        f"{label} is a tar that must hold exactly one .safetensors file "
                        f"(or one lora.safetensors); it holds: {found}"
                    )
                members = named
            target = archive.with_suffix(".extracted")
            with tar.extractfile(members[0]) as data, target.open("wb") as out:  # type: ignore[union-attr]
                while block := data.read(CHUNK):
                    out.write(block)
    except tarfile.TarError as exc:
        raise LoraFormatError(f"{label} is a damaged tar archive: {exc}") from exc
    finally:
        archive.unlink(missing_ok=True)
    return target


def _verified(path: Path, canonical: str, label: str) -> FetchedLora:
    size = path.stat().st_size
    if size > max_lora_bytes():
        raise _too_big(label, size)
    header = read_header(path, label)
    return FetchedLora(path, canonical, size, None, trigger_words(header_metadata(header)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _too_big(label: str, size: int) -> LoraDownloadError:
    return LoraDownloadError(
        f"{label} is {size / 2**30:.2f} GiB, over the {max_lora_bytes() / 2**30:g} GiB limit "
        "(raise WANLORA_MAX_LORA_GB if you trust it)"
    )


def _describe(exc: Exception) -> str:
    return str(exc).split("\n")[0][:200] if str(exc) else type(exc).__name__
