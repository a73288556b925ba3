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
escaped as ``\\xNN``, as nginx does, and the webhook receiver's token replaced by ``***``;
then what the request path noted in ``request[ACCESS]`` (``note_access``): the request id
(the client's ``X-Request-Id`` when sane, else a new one; returned in the response), the
route group, the limits taken, the admission wait, the upstream time and the key's
fingerprint (never the key).

``log.format: json`` (``setup_logging(fmt="json")``) writes every record as one JSON object
per line (``JsonFormatter``), the access fields as keys of their own; the redaction is the
same in both formats.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MASK = "***"
# Where transcripts' webhooks come back (products/transcripts/webhooks.py serves it): its last
# segment is a secret token, masked in every line. Defined here, below the products, so the
# logs (which the proxy stands on) import nothing from above.
RECEIVER_PATH = "/_aai/webhook"

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
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            record.access = {k: self._safe(v) for k, v in fields.items()}
        setattr(record, "_aai_sanitized", True)  # noqa: B010 (not a declared attribute)
        return True

    def _safe(self, value: Any) -> Any:
        if isinstance(value, str):
            return sanitize(value, self.secrets)
        if isinstance(value, list | tuple):
            return [self._safe(v) for v in value]
        return value if isinstance(value, int | float | bool) or value is None else self._safe(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, the access fields of an access record, ``exception`` (the
    traceback, redacted and escaped like any message) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str)


def protect(handler: logging.Handler, secrets: Iterable[str] = ()) -> logging.Handler:
    """Put a ``Redactor`` on ``handler`` (once)."""
    if not any(isinstance(f, Redactor) for f in handler.filters):
        handler.addFilter(Redactor(secrets))
    return handler


def setup_logging(level: str, secrets: Iterable[str] = (), fmt: str = "text") -> None:
    """The root logger at ``level``, writing to stderr ``FORMAT`` lines (``fmt="text"``) or
    JSON objects (``fmt="json"``), every handler protected."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=FORMAT)
    secrets = tuple(secrets)
    for handler in logging.getLogger().handlers:
        protect(handler, secrets)
        if fmt == "json":
            handler.setFormatter(JsonFormatter())


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


# What the request path notes for the access line (note_access): one dict per request, made
# by the outermost middleware (middlewares.py) and shared with a clone of the request.
ACCESS: web.RequestKey[dict[str, Any]] = web.RequestKey("access", dict)
REQUEST_ID = "X-Request-Id"
# A client's request id is kept when it is 1-128 token characters (RFC 9110's tchar).
_SANE_ID = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")


def request_id(given: str | None) -> str:
    """The client's ``X-Request-Id`` when sane, else a new one (a UUID)."""
    if given is not None and _SANE_ID.fullmatch(given):
        return given
    return str(uuid.uuid4())


def access_fields(request: web.BaseRequest) -> dict[str, Any]:
    """The request's access dict, made (with a new request id) if nothing made it yet: a
    request aiohttp refused before any middleware ran."""
    fields = request.get(ACCESS)
    if fields is None:
        fields = request[ACCESS] = {"request_id": request_id(None)}
    return fields


def note_access(request: web.BaseRequest | None, **fields: Any) -> None:
    """Note ``fields`` for the request's access line (``group``, ``limits``, ``wait_ms``,
    ``upstream_ms``, ``key``): never a key, a query string or a body."""
    if request is not None:
        access_fields(request).update(fields)


class AccessLogger(AbstractAccessLogger):
    """Remote, method, path (raw and escaped; never the query string: it can carry a streaming
    token), status, time; then the fields noted for the request (see the module's docstring):
    as ``name=value`` words in text, as keys of the record's JSON object in json."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = access_fields(request)
        path = loggable_path(request)
        access = {
            "type": "access",
            "request_id": fields.get("request_id"),
            "remote": request.remote,
            "method": escape_path(request.method),
            "path": path,
            "status": response.status,
            "duration_ms": round(time * 1000, 1),
            "group": fields.get("group", "other"),
            "limits": fields.get("limits", []),
            "wait_ms": fields.get("wait_ms"),
            "upstream_ms": fields.get("upstream_ms"),
            "key": fields.get("key"),
        }
        self.logger.info(
            '%s "%s %s" %s %.1fms%s',
            request.remote,
            access["method"],
            path,
            response.status,
            time * 1000,
            _words(access),
            extra={"access": access},
        )

    @property
    def enabled(self) -> bool:
        return bool(self.logger.isEnabledFor(logging.INFO))


def _words(access: dict[str, Any]) -> str:
    words = [f"id={access['request_id']}", f"group={access['group']}"]
    if access["limits"]:
        words.append("limits=" + ",".join(access["limits"]))
    for name in ("wait_ms", "upstream_ms"):
        if access[name] is not None:
            words.append(f"{name[:-3]}={access[name]:.1f}ms")
    if access["key"]:
        words.append(f"key={access['key']}")
    return " " + " ".join(words)
