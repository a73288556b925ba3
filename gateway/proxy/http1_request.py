"""The request head as http1.py's pool writes it: the request line, ``Host`` and the body's
framing (``Content-Length``, or chunked for a stream of unknown length); a method, target or
header HTTP/1.1 cannot carry (control characters) is ``InvalidHead``, before any connection.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Protocol, cast

from multidict import CIMultiDict
from yarl import URL

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyStream(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...


class InvalidHead(ValueError):
    """A request line or header that HTTP/1.1 cannot carry (control characters)."""


def _request_head(
    method: str, url: URL, headers: CIMultiDict[str], body: object
) -> tuple[bytes, BodyStream | None, bool]:
    """The request line and headers, with the body's framing; the body to stream, if any,
    and whether it goes chunked. Host: as the URL says it (IDNA, IPv6 in brackets, the port
    unless it is the scheme's)."""
    target = url.raw_path_qs
    if not _TOKEN.fullmatch(method) or _unsafe(target) or " " in target:
        raise InvalidHead("the request line has characters HTTP/1.1 cannot carry")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    stream: BodyStream | None = None
    chunked = False
    skip: tuple[str, ...]
    if body is None or isinstance(body, bytes | bytearray):
        skip = ("content-length", "transfer-encoding", "host")
        size = len(body) if body is not None else 0
        if body is not None or method in BODY_METHODS:
            lines.append(f"Content-Length: {size}")
    else:
        stream = cast(BodyStream, body)
        skip = ("transfer-encoding", "host")
        if "Content-Length" not in headers:
            chunked = True
            lines.append("Transfer-Encoding: chunked")
    for name, value in headers.items():
        if name.lower() in skip:
            continue
        if not _TOKEN.fullmatch(name) or _unsafe(value):
            raise InvalidHead(f"the header {name[:40]!r} has characters HTTP/1.1 cannot carry")
        lines.append(f"{name}: {value}")
    text = "\r\n".join(lines) + "\r\n\r\n"
    return text.encode("utf-8", "surrogateescape"), stream, chunked


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: methods, header names
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F)) - {"\t"}


def _unsafe(text: str) -> bool:
    return not _CONTROL.isdisjoint(text)
