"""Logging that shows what wanlora does and never a secret.

Two rules, applied by the front ends (the CLI and the predictor), which own the handlers:
- only wanlora's own loggers speak at INFO; every other library keeps WARNING, since HTTP
  clients (httpx, urllib3, huggingface_hub) log each request's URL at INFO or DEBUG, and a
  signed link's query is its credential;
- a `Scrub` filter sits on every handler, so that whatever reaches one, from any logger,
  has its URL queries and tokens masked.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO
from urllib.parse import parse_qsl, urlsplit

DEFAULT_FORMAT = "%(levelname)s %(name)s: %(message)s"
NOTICE_FORMAT = "wanlora: %(message)s"
# What a person running wanlora should know without -v: a Wan2.2 pair's placement, the seed used,
# offload="auto"'s choice, each LoRA applied and how much of the model it changes. Between INFO and
# WARNING: the CLI shows it by default, once per message; a program's own logging decides for itself.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
QUERY = re.compile(r"((?:https?://)?[^\s'\"?]*)\?[^\s'\")]+")  # a URL's query: signatures, tokens
TOKENS = re.compile(
    r"(?i)(bearer\s+|authorization[=:]\s*"  # a token after its keyword,
    r"|\b[\w-]*(?:token|key|sig|signature|credential|auth|pass|pwd|secret|jwt|session)[\w-]*[=:]\s*)"  # or name=
    r"[^\s'\",;&@]+"
    r"|\bhf_[A-Za-z0-9]{20,}"  # a Hugging Face token on its own
)
PASSWORD = re.compile(r"(?<=:)[^\s:/@]+(?=@)")  # user:password@
LONE_USER = re.compile(r"(?<=://)[^\s:/@]+(?=@)")  # https://TOKEN@host: a token as a link's user name
# Query parameters that carry credentials or signatures (S3, GCS, Azure SAS, CloudFront,
# Akamai, JWTs, sessions): never part of a cache key, a log line, an error or a tag.
SECRET_QUERY = re.compile(
    r"(token|key|sig|signature|credential|auth|expires|policy|pass|pwd|secret|jwt|session|hdnts|hmac"
    r"|^x-amz-|^x-goog-|^s[eprtv]$|^sr$|^skoid$|^sktid$|^code$)",
    re.IGNORECASE,
)


def mask_secrets(text: str) -> str:
    """`text` with tokens, `name=secret` pairs, passwords and lone user names of links replaced by `***`."""
    return LONE_USER.sub("***", PASSWORD.sub("***", TOKENS.sub(lambda m: (m.group(1) or "") + "***", text)))


def scrub(text: str) -> str:
    """`text` for a log: `mask_secrets`, and every URL query cut to `?...` (a signature has no telling name)."""
    return mask_secrets(QUERY.sub(r"\1?...", text))


def url_secrets(url: str) -> list[str]:
    """The secret values inside `url`, to scrub from text that quotes it (a library's error message)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if SECRET_QUERY.search(k) and v]
    found += [s for s in (parts.username, parts.password) if s]
    found += [parts.query] if found and parts.query else []
    return found


class Scrub(logging.Filter):
    """Masks secrets in every record a handler emits, its traceback included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


class NoticeFormatter(logging.Formatter):
    """`wanlora: message` for a NOTICE, `fmt` for the rest: a notice is for a person, not a log reader."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self.notice = logging.Formatter(NOTICE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self.notice.format(record) if record.levelno == NOTICE else super().format(record)


class Once(logging.Filter):
    """Each NOTICE message once: a sweep's cells and a batch's jobs repeat the same LoRA, pair and plan."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != NOTICE:
            return True
        message = record.getMessage()
        if message in self.said:
            return False
        self.said.add(message)
        return True


def configure(verbose: bool, stream: TextIO = sys.stderr, fmt: str = DEFAULT_FORMAT, force: bool = False) -> None:
    """A front end's logging: WARNING for every library; for wanlora NOTICE (each notice once), or INFO when
    `verbose`; scrubbed handlers.

    `force` replaces handlers someone else installed (a server's); without it, they are kept.
    """
    root = logging.getLogger()
    ours = force or not root.handlers  # basicConfig adds a handler only then
    logging.basicConfig(level=logging.WARNING, stream=stream, format=fmt, force=force)
    logging.getLogger("wanlora").setLevel(logging.INFO if verbose else NOTICE)
    for handler in root.handlers:
        if not any(isinstance(f, Scrub) for f in handler.filters):
            handler.addFilter(Scrub())
        if ours:
            handler.setFormatter(NoticeFormatter(fmt))
            if not verbose:
                handler.addFilter(Once())


def guard_loggers(*names: str) -> None:
    """Scrub the records of libraries that log request URLs, for programs that set up their own handlers."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Scrub) for f in logger.filters):
            logger.addFilter(Scrub())
