"""Source -> a verified local .safetensors file.

Hub files go through huggingface_hub (so HF_ENDPOINT, HF_TOKEN and the Hub cache apply),
or come from the pre-fetched weights folder (WANLORA_WEIGHTS) when it holds them.
Everything else is downloaded into wanlora's cache (cache.py) by net.py: https to public
addresses only, resumable, retried, size-capped, verified by content, and only then
renamed into place. The whole fetch runs in a helper thread, so that a cancellation or
the deadline (WANLORA_DOWNLOAD_TIMEOUT) ends it at once.

Access is per request. A file fetched with credentials (a token, or secrets in the link)
is `protected`: every later use, from the cache or from memory, first asks the origin
with one cheap conditional request whether the credentials of the request at hand are
accepted. The address policy, too, is applied before the cache is looked at. Tokens
travel in headers, never in logs, errors, tags or cache keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from ..errors import LoraAuthRequired, LoraDownloadError, LoraError, LoraNotFound, NoSuchHubRepo, error_boundary
from ..hub import hub_errors, local_copy, transport_errors
from ..net import (
    check_url,
    discard_partial,
    download,
    first_redirect,
    get_json,
    in_background,
    revalidate,
    too_big,
    within,
)
from ..pairs import EVERY_EXPERT, choose_files
from ..settings import civitai_token, civitai_url, clean_token, max_lora_bytes, replicate_url
from ..weights.sniff import header_metadata, read_header
from .archive import is_tar_file, unpack_single_lora
from .cache import LoraCache
from .metadata import MAX_CARD_BYTES, MAX_WORD_CHARS, card_front_matter, card_trigger_words, trigger_words
from .refs import Source, canonical_url, display_ref, parse_ref, resolve_local, url_has_secrets

logger = logging.getLogger(__name__)

VERSION_LOOKUP_SECONDS = 10.0  # Civitai's answer on a version is a nicety: it never holds a fetch up for long
MAX_TRIGGER_WORDS = 32  # what is kept of an API's trigger words (each, and its base-model tag, MAX_WORD_CHARS)


@dataclass(frozen=True)
class Credentials:
    """What one request may use: its own tokens (None: the operator's HF_TOKEN / CIVITAI_API_TOKEN),
    and whether its references may name files on this machine (not on a shared server)."""

    hf_token: str | None = None
    civitai_token: str | None = None
    local_files: bool = True

    def __post_init__(self) -> None:  # a token pasted with a newline would break (and echo) a header
        for name in ("hf_token", "civitai_token"):
            object.__setattr__(self, name, clean_token(name, getattr(self, name)))

    def civitai(self) -> str | None:
        return self.civitai_token or civitai_token()

    def __repr__(self) -> str:  # never print a token by accident
        hidden = {name: "***" if getattr(self, name) else None for name in ("hf_token", "civitai_token")}
        return f"Credentials({hidden}, local_files={self.local_files})"


@dataclass(frozen=True)
class FetchedLora:
    """A verified local LoRA file, where it came from, and its trigger words."""

    path: Path
    source: str  # the canonical reference: no secrets
    size: int
    sha256: str | None = None
    trigger_words: list[str] = field(default_factory=list)
    protected: bool = False  # fetched with credentials: re-check access before each use
    base_model: str | None = None  # its Civitai version's `baseModel`, where Civitai's API gave one

    @property
    def local(self) -> bool:
        return self.source.startswith("file:")


Files = list[tuple[str, FetchedLora]]  # each file with the expert it is for: "both", "high" or "low"


@error_boundary
def fetch_lora_files(ref: str, credentials: Credentials | None = None, cache: LoraCache | None = None) -> Files:
    """Resolve, download (or reuse) and verify what `ref` names: one LoRA file, or a Wan2.2 pair.

    A Hub repo, a folder in one, or a local folder that holds one high-noise and one
    low-noise file (`high_noise_model.safetensors` and `low_noise_model.safetensors`, or
    names with HIGH and LOW) is a pair: each file goes to its expert.
    """
    credentials = credentials or Credentials()
    source = parse_ref(ref, credentials.local_files)
    label = display_ref(ref)
    if source.kind == "local":
        return [(role, _verified(path, f"file:{path}", label)) for role, path in local_files(source.local_path, label)]
    return in_background(lambda: _fetch_remote(source, label, credentials, cache or LoraCache()), label)


def check_reference(ref: str, credentials: Credentials | None = None) -> Source:
    """`ref` parsed, and a local file or folder it names found, without reading or downloading anything."""
    credentials = credentials or Credentials()
    source = parse_ref(ref, credentials.local_files)
    if source.kind == "local":
        local_files(source.local_path, display_ref(ref))
    return source


def _fetch_remote(source: Source, label: str, credentials: Credentials, cache: LoraCache) -> Files:
    if source.kind == "hub":
        return _fetch_hub(source, label, credentials)
    if source.kind == "hub_or_replicate":
        try:
            return _fetch_hub(source, label, credentials)
        except NoSuchHubRepo as hub_error:
            replicate = Source("replicate", f"replicate:{source.repo}", repo_id=source.repo)
            try:
                return [(EVERY_EXPERT, _fetch_replicate(replicate, label, cache))]
            except LoraError as replicate_error:
                raise LoraNotFound(
                    f"{label} was tried as a Hugging Face repo ({hub_error}) and as a Replicate model "
                    f"({replicate_error}); check the name",
                    label,
                    replicate_error.status,
                ) from replicate_error
    if source.kind == "civitai":
        return [(EVERY_EXPERT, _fetch_civitai(source, label, credentials, cache))]
    if source.kind == "replicate":
        return [(EVERY_EXPERT, _fetch_replicate(source, label, cache))]
    return [(EVERY_EXPERT, _download(source.link, source.canonical, label, cache, protected=source.has_secrets))]


def local_files(path: Path, label: str, where: str | None = None) -> list[tuple[str, Path]]:
    """A local file, or the one file (or the pair) in a local folder; `where` names the folder in errors."""
    if path.is_dir():
        names = sorted(p.name for p in path.glob("*.safetensors"))
        return [(role, path / name) for role, name in choose_files(names, where or str(path), label)]
    return [(EVERY_EXPERT, resolve_local(path))]


# ---------------------------------------------------------------------------- Hugging Face


def _fetch_hub(source: Source, label: str, credentials: Credentials) -> Files:
    from huggingface_hub import HfApi, get_token

    repo, revision, named = source.repo, source.revision, source.filename
    prefetched = local_copy(repo, named) if revision is None else None
    if prefetched is not None:  # the operator's weights folder: public files, baked in, named as on the Hub
        where = f"{repo}/{named}" if named else repo
        found = []
        for role, path in local_files(prefetched, label, where):
            name = where if path == prefetched else f"{where}/{path.name}"
            found.append((role, _verified(path, f"hf:{name}", label)))
        return found
    token = credentials.hf_token or None
    api = HfApi(token=token)
    with hub_errors(repo, ref=label, revision=revision, filename=named):
        if named and named.endswith(".safetensors"):
            chosen = [(EVERY_EXPERT, named)]
        else:  # the repo, or a folder in it: its one file, or its pair
            folder = named.strip("/") if named else None
            files = [f for f in api.list_repo_files(repo, revision=revision) if f.endswith(".safetensors")]
            if folder:
                files = [f for f in files if f.startswith(f"{folder}/") and "/" not in f[len(folder) + 1 :]]
            chosen = choose_files(files, f"{repo}/{folder}" if folder else repo, label)
        fetched = [(role, _hub_file(api, repo, revision, filename, token, label)) for role, filename in chosen]
    words = _card_trigger_words(api, repo, revision, token)
    protected = (token or get_token()) is not None
    return [
        (role, FetchedLora(f.path, f.source, f.size, None, list(dict.fromkeys(f.trigger_words + words)), protected))
        for role, f in fetched
    ]


def _hub_file(api, repo: str, revision: str | None, filename: str, token: str | None, label: str) -> FetchedLora:
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if not HF_HUB_OFFLINE:
        size = api.get_hf_file_metadata(url=hf_hub_url(repo, filename, revision=revision), token=token).size
        if size and size > max_lora_bytes():
            raise too_big(label, size)
    path = Path(hf_hub_download(repo, filename, revision=revision, token=token))
    return _verified(path, f"hf:{repo}@{revision or 'main'}/{filename}", label)


def _card_trigger_words(api, repo: str, revision: str | None, token: str | None) -> list[str]:
    """Trigger words from the repo's model card, read only when it is small enough (MAX_CARD_BYTES)."""
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if not HF_HUB_OFFLINE:
            size = api.get_hf_file_metadata(url=hf_hub_url(repo, "README.md", revision=revision), token=token).size
            if size is None or size > MAX_CARD_BYTES:
                return []
        card = Path(hf_hub_download(repo, "README.md", revision=revision, token=token))
        if card.stat().st_size > MAX_CARD_BYTES:
            return []
        text = card.read_text(encoding="utf-8", errors="replace")
    except (HfHubHTTPError, OSError, ValueError) + transport_errors():
        return []  # no card is normal, and a failing one costs only a hint
    return card_trigger_words(card_front_matter(text))


# ---------------------------------------------------------------------------- Civitai, Replicate


def _fetch_civitai(source: Source, label: str, credentials: Credentials, cache: LoraCache) -> FetchedLora:
    """A Civitai version's file (the one `fileId` and its kin pick, else the primary one), with the token the
    link carries (`?token=`), else the request's, else CIVITAI_API_TOKEN, sent as a header, never in a URL.

    Civitai's API says the version's trigger words and base model: a model page must ask it (for its
    newest version); a version reference asks it too, once and briefly (a tag can be corrected since the
    file came), and keeps what its cached file recorded when it does not answer.
    """
    linked = dict(parse_qsl(urlsplit(source.url).query)).get("token") if source.url else None
    token = clean_token("the link's token", linked) or credentials.civitai()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    version = source.version_id
    picked = f"?{source.selection}" if source.selection else ""
    if version is None:  # a model page: its newest version
        model = get_json(f"{civitai_url()}/api/v1/models/{source.model_id}", headers, label, "Civitai model")
        version, words, base = _latest_version(model, source.model_id, label)
    else:
        words, base = _version_facts(version, headers, label)
    canonical = f"civitai:{version}{picked}"
    url = f"{civitai_url()}/api/download/models/{version}{picked}"
    try:
        protected = token is not None
        return _download(url, canonical, label, cache, headers, protected, extra_words=words, base_model=base)
    except LoraNotFound as exc:
        raise LoraNotFound(
            f"{label}: Civitai has no model version {version}. The number in civitai.com/models/ID is the model "
            "page id, not the version id: use the page link with ?modelVersionId=V, or the file's download link",
            label,
            exc.status,
        ) from None
    except LoraAuthRequired as exc:
        raise LoraAuthRequired(
            f"{label}: Civitai needs an API token with access to this file; set CIVITAI_API_TOKEN "
            "(or the civitai_api_token input)",
            label,
            exc.status,
        ) from None


def _latest_version(model: object, model_id: str | None, label: str) -> tuple[str, list[str], str | None]:
    """The newest version id of a Civitai model page, its trigger words and base model, from the API's JSON."""
    versions = model.get("modelVersions") if isinstance(model, dict) else None
    if not isinstance(versions, list):
        raise LoraDownloadError(f"{label}: Civitai's answer for model {model_id} has no version list", label)
    if not versions:
        raise LoraNotFound(f"{label}: the Civitai model {model_id} has no downloadable version", label)
    latest = versions[0]
    version = latest.get("id") if isinstance(latest, dict) else None
    if isinstance(version, bool) or not isinstance(version, (int, str)) or not str(version).isdigit():
        raise LoraDownloadError(f"{label}: Civitai's answer for model {model_id} has no usable version id", label)
    return (str(version), *_described(latest))


def _version_facts(version: str, headers: dict[str, str], label: str) -> tuple[list[str], str | None]:
    """A version's trigger words and base model, from Civitai's /api/v1/model-versions/V with the request's
    token, one attempt within VERSION_LOOKUP_SECONDS; none when it does not answer: the download alone
    decides whether the LoRA may be had, and a cached file keeps the base model recorded with it."""
    url = f"{civitai_url()}/api/v1/model-versions/{version}"
    late = f"Civitai's version lookup took longer than {VERSION_LOOKUP_SECONDS:g} s"
    try:
        answer = within(lambda: get_json(url, headers, label, "Civitai version", attempts=1), label,
                        VERSION_LOOKUP_SECONDS, late)  # fmt: skip
    except LoraError as exc:  # the token's right to the file is the download's to judge, not this lookup's
        logger.info("Civitai's version lookup failed; the base model is what a cached file recorded, if any: %s", exc)
        return [], None
    return _described(answer)


def _described(version: object) -> tuple[list[str], str | None]:
    """The trigger words (`trainedWords`) and the base model (`baseModel`) of a version in Civitai's JSON, as
    much as is kept: a few short words, and a base model of a tag's length (else none)."""
    words, base = (version.get("trainedWords"), version.get("baseModel")) if isinstance(version, dict) else ([], None)
    words = [w for w in words if isinstance(w, str) and len(w) <= MAX_WORD_CHARS] if isinstance(words, list) else []
    fits = isinstance(base, str) and len(base) <= MAX_WORD_CHARS
    return words[:MAX_TRIGGER_WORDS], base if fits else None


def _fetch_replicate(source: Source, label: str, cache: LoraCache) -> FetchedLora:
    """Replicate's `/_weights` redirects to the current weights file: that URL keys the cache,
    so a second fetch costs one redirect lookup and downloads only when the weights changed."""
    versions = f"/versions/{source.version_id}" if source.version_id else ""
    url = f"{replicate_url()}/{source.repo}{versions}/_weights"
    try:
        target = first_redirect(url, label)
        canonical = source.canonical if target == url else f"{source.canonical}={canonical_url(target)}"
        return _download(target, canonical, label, cache)
    except LoraNotFound as exc:
        raise LoraNotFound(f"no Replicate model weights at {source.repo}{versions}", label, exc.status) from None


# ---------------------------------------------------------------------------- the cache


def _download(
    url: str,
    canonical: str,
    label: str,
    cache: LoraCache,
    headers: dict[str, str] | None = None,
    protected: bool = False,
    extra_words: list[str] | None = None,
    base_model: str | None = None,
) -> FetchedLora:
    """`url` from the cache (re-checking access for a protected entry), or downloaded into it, once.

    `base_model` (Civitai's answer now) is kept with the entry, so that a later fetch whose lookup
    fails still knows it: a cached file never skips the check of its base model."""
    check_url(url, label)  # the address policy holds whatever the cache holds
    headers = dict(headers or {})
    protected = protected or url_has_secrets(url)
    key = cache.key(canonical)
    with cache.locked(key):
        entry = cache.get(canonical)
        if entry is not None and entry.protected and not revalidate(url, headers, entry.validators, label):
            logger.info("%s changed on the server; downloading it again", label)
            entry = None
        if entry is None:
            partial = cache.partial_path(key)
            validators = download(url, headers, partial, label)
            try:
                file = unpack_single_lora(partial, label) if is_tar_file(partial) else partial
                header = read_header(file, label)
            except LoraError:
                discard_partial(partial)  # a bad file must not be resumed next time
                partial.with_suffix(".extracted").unlink(missing_ok=True)
                raise
            words = list(dict.fromkeys(trigger_words(header_metadata(header)) + list(extra_words or [])))
            entry = cache.put(canonical, file, words, protected, validators, base_model)
            discard_partial(partial)
            logger.info("downloaded %s (%.1f MiB)", label, entry.size / 2**20)
        else:  # what the origin's answer says now (a lookup that failed when the file came) is kept with it
            learned = [word for word in extra_words or [] if word not in entry.trigger_words]
            if learned or (base_model is not None and base_model != entry.base_model):
                entry.trigger_words = [*entry.trigger_words, *learned]
                entry.base_model = entry.base_model if base_model is None else base_model
                cache.record(entry)
    cache.evict(keep=key)  # outside the lock: no process holds two entries' locks
    return FetchedLora(
        Path(entry.path), canonical, entry.size, entry.sha256, entry.trigger_words, entry.protected, entry.base_model
    )


def _verified(path: Path, canonical: str, label: str) -> FetchedLora:
    size = path.stat().st_size
    if size > max_lora_bytes():
        raise too_big(label, size)
    header = read_header(path, label)
    return FetchedLora(path, canonical, size, None, trigger_words(header_metadata(header)))
