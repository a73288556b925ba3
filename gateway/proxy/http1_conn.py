"""One upstream connection of http1.py's pool: the request written by the pool, the response
read on an ``asyncio.Protocol`` and parsed by llhttp (through ``httptools``) with the strict
framing http1.py's docstring lists; ``parse_head`` reads a head the same way for ws_wire.py.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from typing import Literal, NoReturn, cast

import httptools
from multidict import CIMultiDict

MAX_HEAD = 64 * 1024  # bytes of response heads (interim ones included) per exchange
MAX_INTERIM = 8  # interim 1xx answers skipped before the final one; more is an error

PAUSE_AT = 1024 * 1024  # unread response bytes before the connection stops reading
NO_BODY_STATUS = frozenset({204, 304})

_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


class PayloadError(ConnectionError):
    """The response body ended before its length or its last chunk."""


class StaleConnection(ConnectionError):
    """A REUSED connection failed before a single byte of its answer came: upstream most
    likely closed it idle as the request was written (the keep-alive race every client
    pool meets), so the request most likely never reached upstream's application, though
    that is not provable. A safe request may be sent again on a new connection."""


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Stop(Exception):
    """Raised from a parser callback to stop llhttp (the head of a HEAD answer is all)."""


def _final_head(
    parser: httptools.HttpResponseParser, reason: bytes, raw: list[tuple[bytes, bytes]]
) -> tuple[int, str, CIMultiDict[str], str]:
    """The head llhttp just parsed, with what llhttp leaves to the caller checked: the
    version, and a Transfer-Encoding that is exactly chunked (llhttp itself refuses folded
    lines, duplicate or malformed Content-Length and Content-Length with Transfer-Encoding)."""
    version = _VERSIONS.get(parser.get_http_version())
    if version is None:
        raise ValueError(f"not an HTTP/1.x response (HTTP/{parser.get_http_version()})")
    headers: CIMultiDict[str] = CIMultiDict(
        # names: llhttp let only token characters through; values as aiohttp decodes them
        [(name.decode("ascii"), value.decode("utf-8", "surrogateescape").strip(" \t")) for name, value in raw]
    )
    codings = headers.getall("Transfer-Encoding", None)
    if codings is not None and (len(codings) > 1 or codings[0].lower() != "chunked"):
        raise ValueError("a Transfer-Encoding other than exactly chunked")
    return parser.get_status_code(), reason.decode("utf-8", "surrogateescape"), headers, version


class _Head:
    """parse_head's llhttp callbacks."""

    def __init__(self) -> None:
        self.reason = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True
        raise _Stop()


def parse_head(head: bytes) -> tuple[int, str, CIMultiDict[str], str]:
    """A response head (without its final blank line) as (status, reason, headers, version),
    parsed as strictly as a response is; ValueError when it is not one."""
    cb = _Head()
    parser = httptools.HttpResponseParser(cb)
    try:
        parser.feed_data(head + b"\r\n\r\n")
    except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
        if not cb.done:
            raise ValueError(f"malformed response head ({exc})") from None
    if not cb.done:
        raise ValueError("incomplete response head")
    return _final_head(parser, cb.reason, cb.raw)


class _Conn(asyncio.Protocol):
    """One connection: the request head written by the pool, the response parsed here."""

    def __init__(self, key: tuple[str, str, int, str]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._poller: select.poll | None = None  # the socket, for the quiet check before a reuse
        self._ssl: ssl.SSLObject | Literal[False] | None = None  # (looked up once)
        self.lost = False
        self.idle_since = 0.0
        self.idle_limit = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None  # head or body progress
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._paused_reading = False
        self.in_use = False  # a request is in flight: what arrives is its answer
        self.unfinished = False  # its request body was cut short (answered early): not reusable
        self.broken = False  # an exchange went wrong (timeout, cancelled, error): never reused
        self.exchanges = 0  # requests sent on it (a reused connection has more than one)
        # the response being read
        self.head: tuple[int, str, CIMultiDict[str]] | None = None
        self.head_only = False  # a HEAD request: no body, whatever the headers say
        self._reason = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # bytes fed while no final head was complete
        self._bare = 0  # bytes fed since the last body bytes (chunk lines, trailers)
        self._interim = 0  # 1xx answers so far
        self._in_interim = False
        self._until_close = False  # a body delimited by the connection's end
        self._refusal = ""  # why a callback stopped llhttp
        self.chunks: deque[bytes] = deque()
        self.unread = 0
        self.eof = True  # no exchange yet: as fit for one as a connection read to its end
        self.keep_alive = True
        self.error: Exception | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # nothing was asked: a stray answer (a 408 before closing, say)
            self._fail(ConnectionError("upstream sent data on an idle connection"))
            return
        if self.eof:  # the answer was whole: nothing may follow before the next request
            self._fail(ConnectionError("upstream sent bytes after its response"))
            return
        in_body = self.head is not None
        if not in_body:
            self._head_bytes += len(data)
        chunks = len(self.chunks)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not (self.head_only and self.eof and not self._refusal):
                self._fail(ConnectionError(f"malformed response from upstream ({self._refusal or exc})"))
                return
        if self.head is None:
            if self._head_bytes > MAX_HEAD:  # (llhttp holds a header line until it ends)
                self._fail(ConnectionError("malformed response from upstream (head too long)"))
                return
        elif in_body and len(self.chunks) == chunks and not self.eof:  # chunk lines, trailers
            self._bare += len(data)
            if self._bare > MAX_HEAD:
                self._fail(ConnectionError("malformed response from upstream (endless chunk framing)"))
                return
        else:
            self._bare = 0
        if self.unread > PAUSE_AT and self.transport is not None and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        if self.head is not None and self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # answered while the body was still going: stop sending
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._until_close and not self.eof and exc is None and self.error is None:
            self.eof = True  # a body delimited by the connection's (clean) end
        elif not self.eof:
            self.error = self.error or (
                PayloadError("upstream closed the connection mid-response")
                if self.head is not None
                else ConnectionError("upstream closed the connection")
            )
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(self.error or ConnectionError("upstream closed the connection"))
        self._wake()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks ----------------------------------------------------------------
    def _refuse(self, why: str) -> NoReturn:
        self._refusal = why
        raise _Stop(why)

    def on_message_begin(self) -> None:
        if self.eof:  # a second answer to one request
            self._refuse("bytes after the response")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is None:  # (a chunked body's trailers are dropped)
            self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if self._head_bytes > MAX_HEAD and sum(len(n) + len(v) + 4 for n, v in self._raw) > MAX_HEAD:
            self._refuse("head too long")  # (it came whole, in one large read)
        if status < 200:
            self._interim += 1
            if status == 101:
                self._refuse("101 Switching Protocols to a request that asked for no upgrade")
            if self._interim > MAX_INTERIM:
                self._refuse(f"more than {MAX_INTERIM} interim responses")
            self._in_interim = True  # no body; the real answer follows
            self._reason, self._raw = b"", []
            return
        try:
            status, reason, headers, _ = _final_head(parser, self._reason, self._raw)
        except ValueError as exc:
            self._refuse(str(exc))
        self.head = (status, reason, headers)
        self.keep_alive = parser.should_keep_alive()
        if self.head_only:
            self.eof = True
            raise _Stop()  # llhttp would wait for the body the headers announce
        framed = "Content-Length" in headers or "Transfer-Encoding" in headers
        self._until_close = not framed and status not in NO_BODY_STATUS

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.unread += len(body)

    def on_message_complete(self) -> None:
        if self._in_interim:
            self._in_interim = False
        else:
            self.eof = True

    # -- writing -------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None:
            raise self.error or ConnectionError("upstream closed the connection")
        self.transport.write(data)

    async def drain(self, timeout_s: float) -> None:
        """Until upstream reads what was written (or answers); TimeoutError past ``timeout_s``."""
        if self._paused_writing and not self.lost and self.head is None:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._drain
            finally:
                self._drain = None
        if self.lost and self.head is None:
            raise self.error or ConnectionError("upstream closed the connection")

    # -- waiting ---------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout_s: float) -> None:
        """Until more of the response arrived (or it failed); TimeoutError past ``timeout_s``."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout_s, _expire, waiter)  # (cheaper than asyncio.timeout)
        try:
            await waiter
        except BaseException:
            self.broken = True  # a timeout or a cancellation mid-exchange
            raise
        finally:
            timer.cancel()
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # (retrieved, even when a cancellation won the race)
            self._waiter = None

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks.clear()
        self.unread = 0
        if self._paused_reading and self.transport is not None and not self.lost:
            self._paused_reading = False
            self.transport.resume_reading()
        return data

    def _fail(self, exc: Exception) -> None:
        self.error, self.broken = exc, True
        if self.transport is not None:
            self.transport.abort()  # not close(): that waits for unsent upload data to drain
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(exc)
        self._wake()

    # -- the pool's side -------------------------------------------------------------------
    def reset(self, head_only: bool) -> None:
        self.exchanges += 1
        self.in_use, self.unfinished = True, False
        self.head, self.head_only = None, head_only
        self._reason, self._raw, self._head_bytes, self._bare, self._interim = b"", [], 0, 0, 0
        self._in_interim = self._until_close = False
        self.chunks.clear()
        self.unread, self.eof, self.keep_alive, self.error = 0, False, True, None

    def stale(self) -> bool:
        """Reused, and nothing of this exchange's answer came (not a byte, not a 1xx)."""
        return self.exchanges > 1 and self.head is None and not self._head_bytes and not self._interim

    def reusable(self) -> bool:
        """A clean exchange, read to its end, the connection still open."""
        return (
            self.eof
            and self.keep_alive
            and not (self.broken or self.unfinished or self.head_only or self.unread or self._paused_reading)
            and self.error is None
            and not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def watch(self, fd: int) -> None:
        """Poll ``fd`` (the connection's socket) for the quiet check. The poll object never
        closes it; a descriptor closed meanwhile polls as POLLNVAL: not quiet."""
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN | select.POLLPRI)

    def quiet(self) -> bool:
        """Nothing waits to be read (nor an end or an error): polled on the socket itself,
        since bytes may have arrived that the event loop has not handed over yet."""
        if self._poller is None or self.transport is None:
            return False
        if self._ssl is None:
            self._ssl = self.transport.get_extra_info("ssl_object") or False
        if self._ssl and self._ssl.pending():  # decrypted, not yet handed over
            return False
        return not self._poller.poll(0)
