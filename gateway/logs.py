"""Log lines fit to keep: no key, no token, no raw control character.

``setup_logging`` configures the root logger and puts a ``Redactor`` on each of its handlers,
so every record that reaches them (``aiohttp.server``'s error log for a malformed request,
``aiohttp.access``, ``aiohttp.web``, the gateway's own loggers) is made safe before it is
written. The redactor formats the record's message, then:

- replaces credentials with ``***``: the value after ``Authorization``/``Proxy-Authorization``
  (aiohttp's error for a malformed header line quotes the line), ``Cookie``, ``X-Api-Key``,
  ``token=``/``password=``/``secret=``-style pairs (query strings, ``key: value``, JSON),
  ``webhook_auth_header_value``, ``Bearer ...``, a URL's password, the token segment of the
  webhook receiver's path (``/_aai/webhook/<id>/***``), a bare 32-hex-digit word (the shape
  of an AssemblyAI key and of a receiver token), and any literal secret it was given;
- escapes control and other non-printable characters (``\\x0a``, ``\\u202e``), so a client
  cannot forge a log line or hide text with a terminal escape.

A traceback (``exc_info``) is kept: each of its lines is redacted and escaped the same way and
indented, so every line that starts at column 0 begins a record of its own.

``AccessLogger`` writes one line per request with the path as the client sent it (raw, before
percent-decoding; never the query string), bytes outside printable ASCII and ``"``/``\\``
escaped as ``\\xNN``, as nginx does, and the webhook receiver's token replaced by ``***``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .products.transcripts.webhooks import RECEIVER_PATH

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"

# Header-like names whose whole value (to the end of the line) is a credential; a malformed
# header line (no colon) still leaks ``Authorization secret``, hence the bare-space form.
_HEADER_VALUE = re.compile(
    r"""(?ix)
    \b((?:proxy-)?authorization)
    (['"]?[ \t]*[:=][ \t]*|[ \t]+)
    (?: '(?:\\.|[^'\\])*' | "(?:\\.|[^"\\])*" | [^\r\n]+ )
    """
)
_LINE_VALUE = re.compile(
    r"""(?ix)
    \b(cookie|set-cookie|x-api-key|x-auth-token)
    (['"]?[ \t]*[:=][ \t]*)
    (?: '(?:\\.|[^'\\])*' | "(?:\\.|[^"\\])*" | [^\r\n]+ )
    """
)
# ``name=value`` / ``name: value`` / ``"name": "value"``: the value up to a delimiter.
_PAIR = re.compile(
    r"""(?ix)
    \b(
      webhook_auth_header_value | (?:access_|temp_|auth_|refresh_)?token | api[-_]?key
      | password | passwd | secret(?:[-_]?key)? | client_secret
    )
    (['"]?[ \t]*[:=][ \t]*)
    (?: '(?:\\.|[^'\\])*' | "(?:\\.|[^"\\])*" | [^\s&'",;)\]}]+ )
    """
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)[ \t]+[A-Za-z0-9._~+/=-]+")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")
_RECEIVER = re.compile(re.escape(RECEIVER_PATH) + r"""/([^/\s?#'"]*)/[^\s?#'"&]+""")
_HEX32 = re.compile(r"\b[0-9a-fA-F]{32}\b")
# Two quick passes find out whether any of the above could apply (most lines: none).
_MAYBE = re.compile(
    r"authorization|cookie|x-api-key|x-auth-token|token|key|passw|secret|bearer|basic|://|"
    + re.escape(RECEIVER_PATH)
)
_MAYBE_HEX = re.compile(r"[0-9a-fA-F]{32}")


def _escape_char(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character (controls, line and paragraph separators,
    bidi overrides, lone surrogates) written as a Python-style escape; the rest unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with credentials (see the module's docstring) and each of ``secrets`` as ***."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    if _MAYBE.search(text.lower()) is None and _MAYBE_HEX.search(text) is None:
        return text
    text = _HEADER_VALUE.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    text = _LINE_VALUE.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    text = _PAIR.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m[1]} {MASK}", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m[1]}{MASK}@", text)
    text = _RECEIVER.sub(lambda m: f"{RECEIVER_PATH}/{m[1]}/{MASK}", text)
    return _HEX32.sub(MASK, text)


def sanitize(text: str, secrets: Iterable[str] = ()) -> str:
    """One line: credentials redacted, then every control character escaped."""
    return escape(redact(text, secrets))


def sanitize_block(text: str, secrets: Iterable[str] = (), indent: str = "  ") -> str:
    """A traceback: line by line, redacted and escaped, each line indented by ``indent``."""
    return "\n".join(indent + sanitize(line, secrets) for line in redact(text, secrets).splitlines())


class Redactor(logging.Filter):
    """Makes a record safe to write (see the module's docstring); never drops one.

    The record's message is formatted (``msg % args``) and replaced by its sanitized text, and
    its traceback by its sanitized text, so every handler after this one sees the safe form.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_aai_sanitized", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: log what there is rather than fail
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = sanitize(message, self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = sanitize_block(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = sanitize_block(record.stack_info, self.secrets)
        setattr(record, "_aai_sanitized", True)  # noqa: B010 (not a declared attribute)
        return True


def protect(handler: logging.Handler, secrets: Iterable[str] = ()) -> logging.Handler:
    """Put a ``Redactor`` on ``handler`` (once)."""
    if not any(isinstance(f, Redactor) for f in handler.filters):
        handler.addFilter(Redactor(secrets))
    return handler


def setup_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """The root logger at ``level``, writing ``FORMAT`` lines to stderr, every handler protected."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=FORMAT)
    secrets = tuple(secrets)
    for handler in logging.getLogger().handlers:
        protect(handler, secrets)


_PATH_SAFE = frozenset(range(0x21, 0x7F)) - {ord('"'), ord("\\")}


def escape_path(path: str) -> str:
    """A request target as bytes, each byte outside printable ASCII (and ``"``, ``\\``) as \\xNN."""
    if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path and " " not in path:
        return path
    raw = path.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if b in _PATH_SAFE else f"\\x{b:02x}" for b in raw)


def loggable_path(request: web.BaseRequest) -> str:
    """The path for the access log: raw, without the query string, escaped, and the webhook
    receiver's token (in whatever encoding the client chose) replaced by ***."""
    raw = request.raw_path.split("?", 1)[0].split("#", 1)[0]
    prefix = RECEIVER_PATH + "/"
    try:
        match_info = getattr(request, "match_info", None)  # routed requests (web.Request) only
    except AssertionError:  # not routed: aiohttp's answer to a malformed request
        match_info = None
    resource = getattr(getattr(match_info, "route", None), "resource", None)
    if match_info is not None and resource is not None and resource.canonical.startswith(prefix):
        return escape_path(f"{prefix}{match_info.get('id', '')}/{MASK}")
    decoded = unquote(raw, errors="surrogateescape")
    at = decoded.find(prefix)
    if at >= 0:  # not routed to the receiver, but shaped like it (a 405, an absolute-form target)
        job_id = decoded[at + len(prefix) :].split("/", 1)[0]
        return escape_path(f"{decoded[:at]}{prefix}{job_id}/{MASK}")
    return escape_path(raw)


class AccessLogger(AbstractAccessLogger):
    """Remote, method, path (raw and escaped; never the query string: it can carry a streaming
    token), status, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.1fms',
            request.remote,
            escape_path(request.method),
            loggable_path(request),
            response.status,
            time * 1000,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.logger.isEnabledFor(logging.INFO))
