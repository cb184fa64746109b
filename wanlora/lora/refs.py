"""LoRA references: what a person typed, parsed into a `Source`. No network, no torch.

| input                                                  | Source.kind      |
|--------------------------------------------------------|------------------|
| an existing path, or one starting with / ./ ../ ~      | local            |
| owner/repo                                             | hub_or_replicate |
| owner/repo/path.safetensors, owner/repo@rev[/path]     | hub              |
| https://huggingface.co/owner/repo[/blob|resolve/REV/path] | hub           |
| https://civitai.com/models/ID[?modelVersionId=V]       | civitai          |
| https://civitai.com/api/download/models/V, civitai:V   | civitai          |
| https://replicate.com/owner/model[/versions/ID]        | replicate        |
| any other https:// URL                                 | url              |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import LoraNotFound

HUB_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
CIVITAI_HOSTS = {"civitai.com", "www.civitai.com", "civitai.green"}
REPLICATE_HOSTS = {"replicate.com", "www.replicate.com"}
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
REPO = re.compile(rf"(?P<repo>{NAME}/{NAME})(?:@(?P<rev>[^/\s]+))?(?:/(?P<path>\S+))?")
# Query parameters that carry credentials or signatures: never part of a cache key.
SECRET_QUERY = re.compile(
    r"(token|key|sig|signature|credential|auth|expires|policy|^x-amz-|^x-goog-|^s[eprtv]$)", re.IGNORECASE
)


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


def parse_ref(ref: str) -> Source:
    """Parse any accepted reference; a malformed one is a `LoraNotFound` that shows the forms."""
    text = ref.strip()
    if not text:
        raise LoraNotFound("the LoRA reference is empty")
    local = Path(text).expanduser()
    if local.exists() or text.startswith(("/", "./", "../", "~", ".\\")):
        return Source("local", f"file:{local.resolve()}", path=local)
    if text.lower().startswith("civitai:"):
        version = text.split(":", 1)[1].strip()
        if not version.isdigit():
            raise LoraNotFound(f"{ref!r}: civitai:V needs a numeric model version id")
        return Source("civitai", f"civitai:{version}", version_id=version)
    if "://" in text:
        return _parse_url(ref, text)
    match = REPO.fullmatch(text)
    if match:
        repo, rev, path = match["repo"], match["rev"], match["path"]
        if rev is None and path is None:
            return Source("hub_or_replicate", f"hf:{repo}", repo_id=repo)
        canonical = f"hf:{repo}@{rev or 'main'}" + (f"/{path}" if path else "")
        return Source("hub", canonical, repo_id=repo, revision=rev, filename=path)
    raise LoraNotFound(
        f"{ref!r} is not a LoRA reference wanlora understands: use owner/repo, owner/repo/file.safetensors, "
        "a huggingface.co, civitai.com or replicate.com link, civitai:VERSION_ID, any https:// link to a "
        ".safetensors file, or a local path"
    )


def _parse_url(ref: str, text: str) -> Source:
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http"):
        raise LoraNotFound(f"{ref!r}: only https:// links are accepted")
    host = (parts.hostname or "").lower()
    segments = [s for s in parts.path.split("/") if s]
    query = dict(parse_qsl(parts.query))
    if host in HUB_HOSTS and len(segments) >= 2:
        repo = "/".join(segments[:2])
        if len(segments) == 2:
            return Source("hub_or_replicate", f"hf:{repo}", repo_id=repo)
        if len(segments) >= 5 and segments[2] in ("blob", "resolve"):
            rev, path = segments[3], "/".join(segments[4:])
            return Source("hub", f"hf:{repo}@{rev}/{path}", repo_id=repo, revision=rev, filename=path)
        if segments[2] == "tree" and len(segments) >= 4:
            rev = segments[3]
            return Source("hub", f"hf:{repo}@{rev}", repo_id=repo, revision=rev)
    if host in CIVITAI_HOSTS:
        if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and segments[3].isdigit():
            return Source("civitai", f"civitai:{segments[3]}", version_id=segments[3])
        if len(segments) >= 2 and segments[0] == "models" and segments[1].isdigit():
            version = query.get("modelVersionId")
            if version and version.isdigit():
                return Source("civitai", f"civitai:{version}", version_id=version, model_id=segments[1])
            return Source("civitai", f"civitai-model:{segments[1]}", model_id=segments[1])
        raise LoraNotFound(
            f"{ref!r} is a Civitai link wanlora cannot map: use the model page "
            "(civitai.com/models/ID?modelVersionId=V) or its download link (civitai.com/api/download/models/V)"
        )
    if host in REPLICATE_HOSTS and len(segments) >= 2:
        repo = "/".join(segments[:2])
        version = segments[3] if len(segments) >= 4 and segments[2] == "versions" else None
        return Source(
            "replicate", f"replicate:{repo}" + (f"@{version}" if version else ""), repo_id=repo, version_id=version
        )
    return Source("url", canonical_url(text), url=text)


def canonical_url(url: str) -> str:
    """The URL without credentials, signatures or fragment: safe to show and to key a cache."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not SECRET_QUERY.search(k)]
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), ""))


def resolve_local(ref: str) -> Path:
    """The local file a local reference names."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        found = ", ".join(f.name for f in files) or "none"
        raise LoraNotFound(f"{ref} is a folder; name one .safetensors file in it (found: {found})")
    raise LoraNotFound(f"{ref} does not exist: give a path to a .safetensors LoRA file")
