"""Loopback stand-ins for the outside world: a file server that misbehaves on purpose (and answers as
Civitai's API does, given its routes), and a Hub that speaks the endpoints huggingface_hub uses for
downloads and file listings."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Route:
    """What the file server does for one path."""

    body: bytes = b""
    status: int = 200
    redirect: str | None = None  # a Location to send instead
    fail_first: int = 0  # answer `fail_status` this many times first
    fail_status: int = 500
    retry_after: str | None = None  # a Retry-After header on those failures
    drop_first: int = 0  # send half the body, then hang up, this many times first
    ignore_range: bool = False
    honour_if_range: bool = True  # a server that ignores If-Range resumes whatever it holds now
    delay: float = 0.0  # seconds before the body
    drip: float = 0.0  # seconds between single bytes of the body: a stalled server
    gzip: bool = False  # send the body gzip-encoded, with the compressed length
    content_type: str = "application/octet-stream"
    require_auth: str | None = None  # the Authorization header value that is accepted
    require_query: str | None = None  # a `name=value` the query must carry (a signed or token link)
    refuse_to: str | None = None  # without the auth: redirect here (a login page), as Civitai does, not 401
    validators: bool = True  # send an ETag (a login page sends none)
    encoding: str | None = None  # a Content-Encoding to claim, the body sent as it is

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.body).hexdigest()}"'


class _Base(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class FileServer(_Base):
    """Serves `routes`; counts requests and full-body GETs per path; records headers seen."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: Counter[str] = Counter()
        self.full_bodies: Counter[str] = Counter()
        self.headers_seen: list[dict[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(_FileHandler)


def civitai_version(
    server: FileServer,
    version: int,
    body: bytes,
    base_model: str | None,
    words: list[str] | None = None,
    token: str | None = None,
) -> str:
    """Civitai's answers for one model version, on `server` (behind WANLORA_CIVITAI_URL): its API's
    GET /api/v1/model-versions/V, the version with a top-level `baseModel` ("Wan Video 2.2 I2V-A14B") as
    developer.civitai.com documents it, and its file at /api/download/models/V. With `token`, the download
    wants it as a Bearer header. Returns the reference `civitai:V`."""
    answer = {
        "id": version,
        "modelId": 4000 + version,
        "name": "v1.0",
        "baseModel": base_model,
        "baseModelType": "Standard",
        "trainedWords": words or [],
        "files": [{"id": 10 * version, "name": "lora.safetensors", "type": "Model", "primary": True}],
    }
    server.routes[f"/api/v1/model-versions/{version}"] = Route(
        json.dumps(answer).encode(), content_type="application/json"
    )
    server.routes[f"/api/download/models/{version}"] = Route(body, require_auth=f"Bearer {token}" if token else None)
    return f"civitai:{version}"


class _FileHandler(http.server.BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        server = self.server
        query = urlsplit(self.path).query
        with server.lock:
            server.requests[path] += 1
            server.headers_seen.append(dict(self.headers))
            route = server.routes.get(f"{path}?{query}") or server.routes.get(path)  # one file of many, by query
            attempt = server.requests[path]
        if route is None:
            return self._empty(404)
        if route.require_auth and self.headers.get("Authorization") != route.require_auth:
            if route.refuse_to:
                return self._empty(307, headers={"Location": route.refuse_to})
            return self._empty(401)
        if route.require_query and route.require_query not in urlsplit(self.path).query.split("&"):
            return self._empty(403)
        if attempt <= route.fail_first:
            return self._empty(
                route.fail_status, headers={"Retry-After": route.retry_after} if route.retry_after else {}
            )
        if route.redirect:
            self.send_response(302)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.status != 200:
            return self._empty(route.status, route.body)
        if self.headers.get("If-None-Match") == route.etag:
            return self._empty(304, headers={"ETag": route.etag})
        body, start = route.body, 0
        ranged = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        same_version = if_range is None or if_range == route.etag or not route.honour_if_range
        if ranged and not route.ignore_range and same_version:
            start = int(ranged.removeprefix("bytes=").split("-")[0])
            stop = ranged.split("-")[1]
            end = min(int(stop), len(body) - 1) if stop else len(body) - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            part = body[start : end + 1]
        else:
            self.send_response(200)
            part = body
        if route.gzip:
            part = gzip.compress(part)
            self.send_header("Content-Encoding", "gzip")
        if route.encoding:
            self.send_header("Content-Encoding", route.encoding)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(part)))
        if route.validators:
            self.send_header("ETag", route.etag)
        self.end_headers()
        if route.delay:
            time.sleep(route.delay)
        if attempt <= route.fail_first + route.drop_first:
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        try:
            if route.drip:
                for i in range(len(part)):
                    self.wfile.write(part[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.drip)
            else:
                self.wfile.write(part)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up: a cancelled or timed-out download
        if start == 0 and len(part) > 1:
            with server.lock:
                server.full_bodies[path] += 1

    def _empty(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


SIGNATURE = "s3cr3tSIGNATUREvalue"  # in a signed link's query: it must never be logged


@dataclass
class HubRepo:
    files: dict[str, bytes] = field(default_factory=dict)
    revisions: tuple[str, ...] = ("main",)
    token: str | None = None  # a private repo: only this Bearer token sees it
    signed: bool = False  # downloads redirect to a signed link, as the Hub's LFS files do


class FakeHub(_Base):
    """The parts of the Hub API that huggingface_hub's download and listing calls use."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.downloads: Counter[str] = Counter()
        super().__init__(_HubHandler)


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"
    commit = "a" * 40

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if parts[:1] == ["_signed"]:  # the signed link a download redirected to
            repo = self.server.repos[f"{parts[1]}/{parts[2]}"]
            body = repo.files["/".join(parts[3:])]
            if not head:
                self.server.downloads[f"{parts[1]}/{parts[2]}/{'/'.join(parts[3:])}"] += 1
            return self._send(200, body, head, {"ETag": f'"{hashlib.sha256(body).hexdigest()}"'})
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":  # repo_info
            repo = self._repo(f"{parts[2]}/{parts[3]}", parts[5])
            if repo is None:
                return
            info = {
                "id": f"{parts[2]}/{parts[3]}",
                "sha": self.commit,
                "siblings": [{"rfilename": p} for p in repo.files],
            }
            return self._send(200, json.dumps(info).encode(), head, {"Content-Type": "application/json"})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            repo = self._repo(f"{parts[2]}/{parts[3]}", parts[5])
            if repo is None:
                return
            folder = "/".join(parts[6:])  # tree/REVISION/FOLDER: that folder's files only, as the Hub lists them
            listing = [  # every file as an LFS file: its oid the sha256 that names its blob in the cache (the ETag)
                {
                    "type": "file",
                    "path": p,
                    "size": len(b),
                    "oid": hashlib.sha1(b).hexdigest(),
                    "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134},
                }
                for p, b in repo.files.items()
                if not folder or p.startswith(folder + "/")
            ]
            return self._send(200, json.dumps(listing).encode(), head, {"Content-Type": "application/json"})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo(f"{parts[0]}/{parts[1]}", parts[3])
            if repo is None:
                return
            path = "/".join(parts[4:])
            if path not in repo.files:
                return self._error(404, "EntryNotFound", head)
            body = repo.files[path]
            etag = f'"{hashlib.sha256(body).hexdigest()}"'
            if repo.signed and not head:
                signed = f"/_signed/{parts[0]}/{parts[1]}/{path}?X-Amz-Signature={SIGNATURE}&X-Amz-Expires=3600"
                return self._send(302, b"", head, {"Location": signed, "X-Repo-Commit": self.commit, "ETag": etag})
            if not head:
                self.server.downloads[f"{parts[0]}/{parts[1]}/{path}"] += 1
            return self._send(200, body, head, {"X-Repo-Commit": self.commit, "ETag": etag})
        self._error(404, "RepoNotFound", head)

    def _repo(self, name: str, revision: str) -> HubRepo | None:
        repo = self.server.repos.get(name)
        if repo is None or (repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}"):
            self._error(401 if repo else 404, "RepoNotFound", self.command == "HEAD")
            return None
        if revision not in repo.revisions and revision != self.commit:
            self._error(404, "RevisionNotFound", self.command == "HEAD")
            return None
        return repo

    def _error(self, status: int, code: str, head: bool) -> None:
        self._send(
            status,
            json.dumps({"error": code}).encode(),
            head,
            {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"},
        )

    def _send(self, status: int, body: bytes, head: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
