"""LoRA references: what a person typed, parsed into a `Source`. No network, no torch.

| input                                                  | Source.kind      |
|--------------------------------------------------------|------------------|
| an existing path, or one starting with / ./ ../ ~      | local            |
| owner/repo                                             | hub_or_replicate |
| owner/repo/path.safetensors, owner/repo@rev[/path]     | hub              |
| https://huggingface.co/owner/repo[/blob|resolve/REV/path] | hub           |
| https://civitai.com/models/ID[?modelVersionId=V]       | civitai          |
| https://civitai.com/api/download/models/V[?fileId=F], civitai:V | civitai |
| https://replicate.com/owner/model[/versions/ID]        | replicate        |
| any other https:// URL                                 | url              |

A reference may carry secrets: a signed URL's query, a `?token=`, `user:password@`. They
are used to fetch and nowhere else: `display_ref` and `Source.canonical` leave them out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import InternalError, LoraNotFound
from ..logs import SECRET_QUERY, mask_secrets
from ..paths import PathRefused, relative_name
from ..settings import MAX_REF_CHARS

T = TypeVar("T")

HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
CIVITAI_HOSTS = {"civitai.com", "www.civitai.com", "civitai.green"}
CIVITAI_FILE_SELECTORS = ("fileId", "type", "format", "size", "fp")  # which file of a version a download link names
CIVITAI_DEFAULT_FILE = {("type", "Model")}  # what Civitai serves without a selection: not one
REPLICATE_HOSTS = {"replicate.com", "www.replicate.com"}
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
REPO = re.compile(rf"(?P<repo>{NAME}/{NAME})(?:@(?P<rev>[^/\s]+))?(?:/(?P<path>\S+))?")
PATH_PREFIXES = ("/", "./", "../", "~", ".\\")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".tar")
SHOWN_CHARS = 300


@dataclass(frozen=True)
class Source:
    """A parsed reference. `canonical` names it without secrets and keys the cache."""

    kind: str
    canonical: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    url: str | None = None
    version_id: str | None = None  # Civitai modelVersionId or Replicate version
    model_id: str | None = None  # Civitai model page id
    path: Path | None = None
    selection: str = ""  # Civitai: the query that picks one file of a version (`fileId=...`), part of the key

    @property
    def repo(self) -> str:
        """The repo id a Hub or Replicate reference always has."""
        return _present(self.repo_id, "repo_id", self.kind)

    @property
    def link(self) -> str:
        """The URL a link reference always has."""
        return _present(self.url, "url", self.kind)

    @property
    def local_path(self) -> Path:
        """The path a local reference always has."""
        return _present(self.path, "path", self.kind)

    @property
    def has_secrets(self) -> bool:
        """Whether the URL itself carries credentials: a secret query parameter or user:password@."""
        return self.url is not None and url_has_secrets(self.url)


def _present(value: T | None, field: str, kind: str) -> T:
    if value is None:
        raise InternalError(f"a {kind} reference without its {field}")
    return value


def display_ref(ref: str) -> str:
    """`ref` as it may be shown: links without their secrets, and nothing too long."""
    text = ref.strip()
    if "://" in text:
        try:
            text = canonical_url(text)
        except ValueError:
            text = text.split("://", 1)[0] + "://(a link that cannot be parsed)"
    text = mask_secrets(text)  # what canonical_url cannot see: a token pasted in the wrong place
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def parse_ref(ref: str, local_files: bool = True) -> Source:
    """Parse any accepted reference; a malformed one is a `LoraNotFound` that shows the forms.

    With `local_files=False` (a server shared by many users) no reference names a file on
    this machine, and the answer does not depend on which files exist.
    """
    if not isinstance(ref, str):
        raise LoraNotFound(f"a LoRA reference must be text, not {type(ref).__name__}")
    if not ref.isascii():
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:
            raise LoraNotFound("the LoRA reference holds a broken character (a lone surrogate)") from None
    text = ref.strip()
    if not text:
        raise LoraNotFound("the LoRA reference is empty")
    if len(text) > MAX_REF_CHARS:
        raise LoraNotFound(f"the LoRA reference is {len(text)} characters long; at most {MAX_REF_CHARS} are accepted")
    if _looks_like_path(text) or (local_files and _names_something_here(text)):
        if not local_files:
            raise LoraNotFound(
                f"{display_ref(text)} is a path; here a LoRA must come from a link or a Hugging Face, "
                "Civitai or Replicate reference"
            )
        return _local(text)
    if text.lower().startswith("civitai:"):
        version = text.split(":", 1)[1].strip()
        if not version.isdigit():
            raise LoraNotFound(f"{display_ref(text)!r}: civitai:V needs a numeric model version id")
        return Source("civitai", f"civitai:{version}", version_id=version)
    if "://" in text:
        try:
            return _parse_url(text)
        except ValueError:  # urlsplit: a malformed host or port
            raise LoraNotFound(f"{display_ref(text)} is not a valid link: check it") from None
    match = REPO.fullmatch(text)
    if match:
        repo, rev, path = match["repo"], match["rev"], match["path"]
        if rev is None and path is None:
            return Source("hub_or_replicate", f"hf:{repo}", repo_id=repo)
        return _hub_source(text, repo, rev, path)
    raise LoraNotFound(
        f"{display_ref(text)!r} is not a LoRA reference wanlora understands: use owner/repo, "
        "owner/repo/file.safetensors, a huggingface.co, civitai.com or replicate.com link, civitai:VERSION_ID, "
        "any https:// link to a .safetensors file" + (", or a local path" if local_files else "")
    )


def _looks_like_path(text: str) -> bool:
    """A path by its form alone: a path prefix or separator, or a file name without an owner/repo before it."""
    if "://" in text or text.lower().startswith("civitai:"):
        return False
    return (
        text.startswith(PATH_PREFIXES) or "\\" in text or (text.lower().endswith(FILE_SUFFIXES) and text.count("/") < 2)
    )


def _names_something_here(text: str) -> bool:
    """`text` exists here, or its first folder does: `models/x.safetensors` is a path, even a missing one."""
    try:
        return Path(text).exists() or ("/" in text and Path(text.split("/", 1)[0]).is_dir())
    except (OSError, ValueError):  # too long for a file name, or a NUL in it
        return False


def _local(text: str) -> Source:
    try:
        local = Path(text).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as exc:  # ~nouser/..., too long, a NUL
        raise LoraNotFound(f"{display_ref(text)} is not a usable path: {type(exc).__name__}") from exc
    return Source("local", f"file:{local}", path=local)


def _parse_url(text: str) -> Source:
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http"):
        raise LoraNotFound(f"{display_ref(text)!r}: only https:// links are accepted")
    host = (parts.hostname or "").lower()
    segments = [s for s in parts.path.split("/") if s]
    query = dict(parse_qsl(parts.query))
    if host in HUB_HOSTS and len(segments) >= 2:
        repo = "/".join(segments[:2])
        if len(segments) == 2:
            return Source("hub_or_replicate", f"hf:{repo}", repo_id=repo)
        if len(segments) >= 5 and segments[2] in ("blob", "resolve"):
            return _hub_source(text, repo, segments[3], "/".join(parts.path.split("/")[5:]))
        if segments[2] == "tree" and len(segments) >= 4:
            return _hub_source(text, repo, segments[3], "/".join(parts.path.split("/")[5:]) or None)
    if host in CIVITAI_HOSTS:
        if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and segments[3].isdigit():
            chosen = {(k, v) for k, v in query.items() if k in CIVITAI_FILE_SELECTORS} - CIVITAI_DEFAULT_FILE
            picked = urlencode(sorted(chosen))
            canonical = f"civitai:{segments[3]}" + (f"?{picked}" if picked else "")
            return Source("civitai", canonical, version_id=segments[3], url=text, selection=picked)
        if len(segments) >= 2 and segments[0] == "models" and segments[1].isdigit():
            version = query.get("modelVersionId")
            if version and version.isdigit():
                return Source("civitai", f"civitai:{version}", version_id=version, model_id=segments[1], url=text)
            return Source("civitai", f"civitai-model:{segments[1]}", model_id=segments[1], url=text)
        raise LoraNotFound(
            f"{display_ref(text)!r} is a Civitai link wanlora cannot map: use the model page "
            "(civitai.com/models/ID?modelVersionId=V) or its download link (civitai.com/api/download/models/V)"
        )
    if host in REPLICATE_HOSTS and len(segments) >= 2:
        repo = "/".join(segments[:2])
        version = segments[3] if len(segments) >= 4 and segments[2] == "versions" else None
        return Source(
            "replicate", f"replicate:{repo}" + (f"@{version}" if version else ""), repo_id=repo, version_id=version
        )
    return Source("url", canonical_url(text), url=text)


def _hub_source(text: str, repo: str, revision: str | None, filename: str | None) -> Source:
    """A Hub file or folder: its name and revision must be plain relative names, whatever exists where."""
    try:
        for name, what in ((filename, "its file name"), (revision, "its revision")):
            if name is not None:
                relative_name(name, what)
    except PathRefused as exc:
        raise LoraNotFound(f"{display_ref(text)} is not a Hub file reference: {exc}") from None
    canonical = f"hf:{repo}@{revision or 'main'}" + (f"/{filename}" if filename else "")
    return Source("hub", canonical, repo_id=repo, revision=revision, filename=filename)


def canonical_url(url: str) -> str:
    """The URL without credentials, signatures or fragment: safe to show and to key a cache."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _secret_pair(k, v)]
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), ""))


def url_has_secrets(url: str) -> bool:
    """Whether the link carries what `canonical_url` leaves out: then its cache entry is as private as the link."""
    parts = urlsplit(url)
    return bool(parts.username or parts.password) or any(
        _secret_pair(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )


def _secret_pair(name: str, value: str) -> bool:
    """A query parameter that is a secret by its name, or by its look (a token under a plain name: `?t=hf_...`)."""
    return bool(SECRET_QUERY.search(name)) or mask_secrets(value) != value


def resolve_local(path: Path) -> Path:
    """The local file a local reference names (a folder is wanlora.lora.fetch.local_files' business)."""
    if path.is_file():
        return path
    raise LoraNotFound(f"{path} does not exist: there is no such LoRA file here; check the path", str(path))
