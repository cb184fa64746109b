"""HTTPS for LoRA downloads: safe addresses, retries, resumable transfers, a deadline and cancellation.

- Only https, and only to public addresses, checked again on every hop of a redirect
  (`WANLORA_ALLOW_PRIVATE_URLS=1` opens plain http, loopback and private ranges for tests).
  Link-local addresses and cloud metadata services stay closed, and IPv4 addresses hidden
  inside IPv6 forms (mapped, 6to4, NAT64, Teredo) are judged as themselves.
- 5xx, 429 (after its Retry-After), dropped connections and short bodies are retried with
  backoff; a partial body is resumed with `Range` only when `If-Range` proves it is still
  the same file, so two versions are never spliced.
- Bodies are asked for without compression, so lengths mean what they say.
- `in_background` runs a fetch in a helper thread and waits in short slices: a cancellation
  (Cog raises it inside the predicting thread) or the overall deadline takes effect at
  once, and the helper's connection is shut down so it stops too.
"""

from __future__ import annotations

import contextvars
import email.utils
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import requests
from tqdm import tqdm

from . import __version__
from .errors import LoraAuthRequired, LoraDownloadError, LoraError, LoraNotFound
from .logs import guard_loggers, scrub, url_secrets
from .settings import download_timeout, max_lora_bytes, private_urls_allowed

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
MAX_ATTEMPTS = 4
BACKOFF_SECONDS = 1.0  # doubles after each failed attempt
MAX_RETRY_AFTER = 60.0  # a longer Retry-After is a failure, not a wait
MAX_REDIRECTS = 10
CHUNK = 1 << 20
MAX_JSON_BYTES = 8 << 20  # an API's answer (a Civitai model page lists its versions); past this it is not read
POLL_SECONDS = 0.1  # how soon a cancellation or the deadline is noticed
ABORT_GRACE = 5.0  # how long an aborted helper gets to let go of its files
# Cloud metadata services outside the link-local range (Alibaba Cloud, AWS over IPv6).
METADATA = [ipaddress.ip_network("100.100.100.200/32"), ipaddress.ip_network("fd00:ec2::254/128")]
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: private, not global
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


# ---------------------------------------------------------------------------- addresses


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (a seam for tests that fake DNS)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address stands for: mapped, 6to4, Teredo, NAT64, IPv4-compatible."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo:
        found.append(address.teredo[1])
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str | None:
    """Why a download may not go to `address`, or None when it may."""
    # an IPv6 form that carries an IPv4 address is judged by that address
    embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else []
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [*embedded] or [address]
    for candidate in candidates:
        if candidate.is_link_local or any(candidate in net for net in METADATA):
            return f"link-local or cloud metadata address {candidate}"
        if (
            candidate.is_multicast
            or candidate.is_unspecified
            or candidate.is_reserved
            or getattr(candidate, "is_site_local", False)
        ):
            return f"non-routable address {candidate}"
        private = candidate.is_private or candidate.is_loopback or candidate in SHARED_ADDRESS_SPACE
        if private and not allow_private:
            return f"private address {candidate}"
        if not private and not candidate.is_global:
            return f"non-routable address {candidate}"
    return None


def check_url(url: str, label: str) -> None:
    """Refuse non-https URLs and hosts that resolve to non-public addresses."""
    parts = urlsplit(url)
    allow_private = private_urls_allowed()
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_private):
        raise LoraDownloadError(f"{label}: only https:// links are allowed (got {parts.scheme}://)", label)
    if not parts.hostname:
        raise LoraDownloadError(f"{label}: the link has no host name", label)
    try:
        addresses = resolve_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError, ValueError):
        raise LoraDownloadError(f"{label}: cannot resolve host {parts.hostname!r}: check the link", label) from None
    for text in addresses:
        problem = address_problem(ipaddress.ip_address(text.split("%")[0]), allow_private)
        if problem:
            raise LoraDownloadError(f"{label}: {parts.hostname} resolves to {problem}; refused", label)


# ---------------------------------------------------------------------------- cancellation and deadline


class TransferStopped(Exception):
    """The fetch was abandoned (cancelled or out of time); the helper thread unwinds with this."""


class Transfer:
    """One fetch's network work: a stop signal, and the live response so that it can be cut."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.finished = threading.Event()
        self._response: requests.Response | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.stopped.is_set():
            raise TransferStopped()

    def sleep(self, seconds: float) -> None:
        if self.stopped.wait(seconds):
            raise TransferStopped()

    def watch(self, response: requests.Response | None) -> None:
        with self._lock:
            self._response = response
        self.check()

    def abort(self) -> None:
        """Stop the helper: no new work, and its blocking read ends now rather than at its timeout."""
        self.stopped.set()
        with self._lock:
            connection = getattr(getattr(self._response, "raw", None), "connection", None)
            sock = getattr(connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed: nothing left to interrupt


_current: contextvars.ContextVar[Transfer] = contextvars.ContextVar("wanlora_transfer")


def current_transfer() -> Transfer:
    """The transfer this thread works for (a fresh, never-stopped one outside `in_background`)."""
    transfer = _current.get(None)
    if transfer is None:
        transfer = Transfer()
        _current.set(transfer)
    return transfer


def in_background(work: Callable[[], T], label: str) -> T:
    """Run `work` in a helper thread, within WANLORA_DOWNLOAD_TIMEOUT, reacting to cancellation at once.

    Any exception raised in the calling thread while it waits (Cog's cancellation, Ctrl-C)
    aborts the helper and propagates; the helper lets go of its locks on its own, promptly.
    """
    timeout = download_timeout()
    why = f"fetching took longer than {timeout:g} s (WANLORA_DOWNLOAD_TIMEOUT); the server is too slow or stalled"
    return within(work, label, timeout, why + ": try again later")


def within(work: Callable[[], T], label: str, seconds: float, late: str) -> T:
    """Run `work` in a helper thread of its own, abandoned with a LoraDownloadError saying `late` after `seconds`,
    or at once when the transfer this thread works for (if any) is stopped."""
    outer = current_transfer()
    deadline = time.monotonic() + seconds
    transfer = Transfer()
    values: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        _current.set(transfer)
        try:
            values.append(work())
        except BaseException as exc:  # handed to the waiting thread, which raises it
            errors.append(exc)
        finally:
            transfer.finished.set()

    thread = threading.Thread(target=run, name="wanlora-fetch", daemon=True)
    thread.start()
    try:
        while not transfer.finished.wait(POLL_SECONDS):
            outer.check()
            if time.monotonic() > deadline:
                raise LoraDownloadError(f"{label}: {late}", label)
    except BaseException:
        transfer.abort()
        thread.join(ABORT_GRACE)
        raise
    if errors:
        raise errors[0]
    return values[0]


# ---------------------------------------------------------------------------- requests, statuses, retries


class Retryable(Exception):
    """A failure worth another attempt: 5xx, 429, a dropped connection, a short or changed body."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


RETRYABLE = (Retryable, requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def describe(exc: BaseException, url: str | None = None) -> str:
    """A one-line reason for `exc`, without the URL's query or any secret in it."""
    text = str(exc).split("\n")[0][:300] if str(exc) else type(exc).__name__
    for secret in url_secrets(url or ""):
        text = text.replace(secret, "***")
    return scrub(text)


guard_loggers("urllib3.connectionpool", "httpx", "huggingface_hub")  # each logs request URLs, queries and all


def retry_after(response: requests.Response) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def raise_for_status(response: requests.Response, label: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise LoraAuthRequired(
            f"{label}: the server refused access ({status}); a token is missing or lacks rights", label, status
        )
    if status in (404, 410):
        raise LoraNotFound(f"{label}: not found ({status})", label, status)
    if status == 416:
        raise Retryable("range not satisfiable")
    if status >= 500 or status == 429:
        raise Retryable(f"server answered {status}", retry_after(response))
    if status >= 400:
        raise LoraDownloadError(f"{label}: the server answered {status}", label, status)


def with_retries(
    action: Callable[[], T], label: str, what: str, url: str | None = None, attempts: int | None = None
) -> T:
    """Run `action` up to `attempts` (default MAX_ATTEMPTS) times, backing off after failures worth another try."""
    attempts = MAX_ATTEMPTS if attempts is None else attempts
    transfer = current_transfer()
    attempt = 0
    while True:
        transfer.check()
        try:
            return action()
        except RETRYABLE as exc:
            if transfer.stopped.is_set():
                raise TransferStopped() from None
            attempt += 1
            asked = getattr(exc, "retry_after", None)
            if asked is not None and asked > MAX_RETRY_AFTER:
                raise LoraDownloadError(
                    f"{label}: the server is busy and asks to wait {asked:.0f} s; try again later", label, 429
                ) from None
            if attempt == attempts:  # the cause is not chained: a request error quotes its URL, query and all
                tries = f"after {attempts} attempts" if attempts > 1 else "once"
                raise LoraDownloadError(
                    f"{label}: {what} failed {tries} ({describe(exc, url)}); try again", label
                ) from None
            logger.warning("%s: %s; retrying", label, describe(exc, url))
            transfer.sleep(max(BACKOFF_SECONDS * 2 ** (attempt - 1), asked or 0.0))
        except requests.RequestException as exc:  # a malformed answer: bad encoding, headers, redirects
            if transfer.stopped.is_set():
                raise TransferStopped() from None
            raise LoraDownloadError(f"{label}: {what} failed: {describe(exc, url)}", label) from None


def http_session() -> requests.Session:
    """Every HTTP session wanlora opens comes from here: one place for the User-Agent, and for proxies
    and certificates (requests reads HTTPS_PROXY, REQUESTS_CA_BUNDLE and the like from the environment)."""
    session = requests.Session()
    session.headers["User-Agent"] = f"wanlora/{__version__} {session.headers['User-Agent']}"
    return session


def open_url(session: requests.Session, url: str, headers: dict[str, str], label: str) -> requests.Response:
    """GET with redirects followed by hand, so that every hop's address is checked."""
    transfer = current_transfer()
    origin = urlsplit(url).netloc
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, label)
        transfer.check()
        response = _get(session, url, {"Accept-Encoding": "identity", **headers}, label)
        transfer.watch(response)
        if response.is_redirect:
            response.close()
            url = _redirect_target(url, response.headers["Location"], label)
            if urlsplit(url).netloc != origin:  # credentials stay with the host they were meant for
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            continue
        try:
            raise_for_status(response, label)
        except BaseException:
            response.close()
            raise
        return response
    raise LoraDownloadError(f"{label}: more than {MAX_REDIRECTS} redirects", label)


def _get(session: requests.Session, url: str, headers: dict[str, str], label: str) -> requests.Response:
    """One GET, redirects not followed; requests parses a redirect's Location even so, and a malformed one
    (an unclosed IPv6 bracket) raises a bare ValueError there."""
    timeout = (CONNECT_TIMEOUT, READ_TIMEOUT)
    try:
        return session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=timeout)
    except requests.RequestException:
        raise
    except ValueError:
        raise LoraDownloadError(f"{label}: the server redirected to a malformed link", label) from None


def _redirect_target(url: str, location: str, label: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError:  # an unclosed IPv6 bracket; check_url judges the rest of the target
        raise LoraDownloadError(f"{label}: the server redirected to a malformed link", label) from None


def get_json(url: str, headers: dict[str, str], label: str, what: str, attempts: int | None = None) -> object:
    """An API's JSON answer, at most MAX_JSON_BYTES; anything else (too big, not JSON, nested past what the
    parser can follow) is a LoraDownloadError."""

    def lookup() -> object:
        with http_session() as session, open_url(session, url, headers, label) as response:
            body = bytearray()
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    too_much = f"{label}: the {what} lookup answered over {MAX_JSON_BYTES >> 20} MiB"
                    raise LoraDownloadError(too_much, label)
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                raise LoraDownloadError(f"{label}: the {what} lookup did not return JSON", label) from None

    return with_retries(lookup, label, f"the {what} lookup", url, attempts)


def first_redirect(url: str, label: str) -> str:
    """Where `url` redirects to (checked like any hop), or `url` itself when it does not."""

    def lookup() -> str:
        check_url(url, label)
        with http_session() as session:
            response = _get(session, url, {}, label)
            current_transfer().watch(response)
            with response:
                if response.is_redirect:
                    return _redirect_target(url, response.headers["Location"], label)
                raise_for_status(response, label)
                return url

    return with_retries(lookup, label, "the weights lookup", url)


# ---------------------------------------------------------------------------- validators and transfers


@dataclass(frozen=True)
class Validators:
    """What identifies one version of a remote file: its ETag, Last-Modified and whole length."""

    etag: str | None = None
    last_modified: str | None = None
    length: int | None = None  # the whole body's length as the origin declared it, when it did

    @classmethod
    def of(cls, response: requests.Response) -> Validators:
        return cls(response.headers.get("ETag"), response.headers.get("Last-Modified"), _whole_length(response))

    @property
    def if_range(self) -> str | None:
        """A value for If-Range: a strong ETag, else Last-Modified; weak ETags are not allowed there."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def conditions(self) -> dict[str, str]:
        """Headers that make a request conditional on still being this version."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers

    def comparable(self, other: Validators) -> bool:
        """Whether the two share a validator that can tell versions apart."""
        return bool(self.etag and other.etag or self.last_modified and other.last_modified)

    def differ_from(self, other: Validators) -> bool:
        """Whether `other` is known to be another version."""
        if self.etag and other.etag:
            return self.etag.removeprefix("W/") != other.etag.removeprefix("W/")
        if self.last_modified and other.last_modified:
            return self.last_modified != other.last_modified
        return False


PAGE_TYPES = ("text/", "application/json", "application/xml", "application/xhtml")  # what a login or error page is


def _whole_length(response: requests.Response) -> int | None:
    """The length of the whole file a response is (part of): Content-Range's total, or an unencoded Content-Length."""
    if response.status_code == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    if response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        return None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def is_a_page(response: requests.Response) -> bool:
    """Whether a response is a web page or an API answer (a login page, an error), not a weights file."""
    return response.headers.get("Content-Type", "").lower().lstrip().startswith(PAGE_TYPES)


def _sidecar(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _saved_validators(partial: Path) -> Validators | None:
    try:
        return Validators(**json.loads(_sidecar(partial).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def discard_partial(partial: Path) -> None:
    for path in (partial, _sidecar(partial)):
        path.unlink(missing_ok=True)


def too_big(label: str, size: int) -> LoraDownloadError:
    return LoraDownloadError(
        f"{label} is {size / 2**30:.2f} GiB, over the {max_lora_bytes() / 2**30:g} GiB limit "
        "(raise WANLORA_MAX_LORA_GB if you trust it)",
        label,
    )


def disk_error(label: str, folder: Path, exc: OSError) -> LoraDownloadError:
    return LoraDownloadError(
        f"{label}: cannot write to the LoRA cache in {folder} ({exc.strerror or type(exc).__name__}); "
        "free some space or set WANLORA_CACHE to another folder",
        label,
    )


def download(url: str, headers: dict[str, str], partial: Path, label: str) -> Validators:
    """Fill `partial` with the whole body of `url`; return the validators of what was fetched."""
    with http_session() as session:
        try:
            return with_retries(lambda: _attempt(session, url, headers, partial, label), label, "the download", url)
        except LoraError:  # a final failure; a cancelled or killed download stays resumable
            discard_partial(partial)
            raise


def _attempt(session: requests.Session, url: str, headers: dict[str, str], partial: Path, label: str) -> Validators:
    """One attempt: continue from what `partial` holds when the server proves it is the same file."""
    transfer = current_transfer()
    limit = max_lora_bytes()
    saved = _saved_validators(partial) if partial.exists() else None
    resume_from = saved.if_range if saved is not None else None
    offset = partial.stat().st_size if resume_from else 0
    request_headers = dict(headers)
    if resume_from and offset:
        request_headers.update({"Range": f"bytes={offset}-", "If-Range": resume_from})
    with open_url(session, url, request_headers, label) as response:
        current = Validators.of(response)
        resumed = response.status_code == 206 and offset > 0
        if resumed and (current.if_range is None or saved is None or saved.differ_from(current)):
            discard_partial(partial)  # a range of another version of the file
            raise Retryable("the file changed on the server; starting over")
        encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("identity", "")
        total = None if encoded else _declared_total(response, offset if resumed else 0)
        if total is not None and total > limit:
            raise too_big(label, total)
        try:
            if not resumed:
                discard_partial(partial)
                if current.if_range and not encoded:  # only such a body can be resumed later
                    _sidecar(partial).write_text(json.dumps(asdict(current)))
            progress = tqdm(
                total=total,
                initial=offset if resumed else 0,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label[-40:],
                file=sys.stderr,
                leave=False,
                disable=None,
            )
            with partial.open("ab" if resumed else "wb") as out, progress:
                for chunk in response.iter_content(CHUNK):
                    transfer.check()
                    out.write(chunk)
                    progress.update(len(chunk))
                    if out.tell() > limit:
                        raise too_big(label, out.tell())
        except OSError as exc:
            if isinstance(exc, requests.RequestException):
                raise
            discard_partial(partial)
            raise disk_error(label, partial.parent, exc) from exc
    size = partial.stat().st_size
    if total is not None and size != total:
        raise Retryable(f"got {size} of {total} bytes")
    return current


def _declared_total(response: requests.Response, offset: int) -> int | None:
    if response.status_code == 206:
        content_range = response.headers.get("Content-Range", "")
        total = content_range.rpartition("/")[2]
        start = content_range.removeprefix("bytes ").split("-")[0]
        if not start.isdigit() or int(start) != offset:
            raise Retryable("the server resumed at the wrong offset")
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def revalidate(url: str, headers: dict[str, str], known: Validators, label: str) -> bool:
    """Ask the origin, with this request's credentials, whether the cached version may be served.

    One cheap conditional request. Access is granted only on a positive answer for that file:
    a 304, a 2xx whose validators match the cached ones, or a 2xx that is the file by its type
    and whole length. True: granted and unchanged; False: the file changed (it is fetched
    again, and checked again); anything else is a refusal (LoraAuthRequired, LoraNotFound),
    a login page behind a redirect included.
    """

    def ask() -> bool:
        conditional = {**headers, **known.conditions(), "Range": "bytes=0-0"}
        with http_session() as session, open_url(session, url, conditional, label) as response:
            current = Validators.of(response)
            if response.status_code == 304:
                return True
            if response.status_code in (200, 206) and not is_a_page(response):
                if known.comparable(current):
                    return not known.differ_from(current)
                if known.length is not None and current.length == known.length:
                    return True
            raise LoraAuthRequired(
                f"{label}: the server did not confirm access to this file (it answered {response.status_code} "
                f"{response.headers.get('Content-Type', 'without a type')}); the token may be missing or revoked",
                label,
                response.status_code,
            )

    return with_retries(ask, label, "checking access", url)
