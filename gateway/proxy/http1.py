"""A lean HTTP/1.1 client for the upstream API: keep-alive connections, bodies streamed.

aiohttp's ClientSession costs ~110 µs of CPU per request on this path (bench/
profile_gateway.py: request and response objects, tracing, cookie and redirect machinery,
timers re-armed on every read), more than the gateway's own work. The proxy needs little of
it: one upstream per host, requests whose headers it already prepared, responses it relays.
So this client writes the request head itself and reads the response on an
``asyncio.Protocol`` (~15 µs per request), parsed by llhttp (Node.js's parser, fuzzed and
maintained) through ``httptools``, as uvicorn parses requests.

- Strict framing, as nginx reads an upstream: a status line of HTTP/1.0 or 1.1; no folded
  (obs-fold) header lines, no control characters, no bare CR or LF; one ``Content-Length`` of
  digits only, never with ``Transfer-Encoding``; a ``Transfer-Encoding`` that is exactly
  ``chunked``; valid chunk sizes; no byte after the response's end (none may come before
  the next request is sent). A response that breaks any of these is a ``ConnectionError``
  (the caller's 502), its connection aborted.
- Connections are pooled per (scheme, host, port, identity), ``identity`` being the
  fingerprint of the client's key: an idle connection is never shared between two clients,
  so a confused upstream can at worst mislead the client whose connection it confused. They
  are reused last-in first-out, never limited (an admitted request never waits for a
  connection: ADMISSION.md I1), closed after ``keepalive_s`` idle or the server's
  ``Keep-Alive: timeout``, and the longest idle closed past ``MAX_IDLE`` idle connections in
  all (so many keys, real or made up, cannot hold a descriptor each). A request is never
  retried: upstream may have counted it.
- A connection goes back to the pool only after a clean exchange: the response read to its
  end, the request body all sent, no parse error, timeout, cancellation or stray byte. Bytes
  arriving on an idle connection close it, and immediately before each reuse the socket is
  polled (and a TLS connection's decrypted buffer checked): anything waiting, the
  connection is closed and another taken.
- Request bodies: ``None``, ``bytes`` (sent with the head in one write), or a stream (the
  client's body, never held in memory) sent with its ``Content-Length`` or chunked.
- Responses: status, headers, and a body by ``Content-Length``, chunked, or until the
  connection closes (no body for ``HEAD``, 1xx, 204, 304). Interim 1xx answers are skipped,
  up to ``MAX_INTERIM`` of them and ``MAX_HEAD`` bytes of heads in all (and as much of
  chunk lines and trailers between body bytes); a 101 is refused.
  Content-Encoding is left as it is. The body is read by ``read()`` or ``content.iter_any()``
  with flow control (reading pauses past 1 MiB unread); ``release()`` returns a cleanly read
  connection to the pool and closes any other. A connection that answered a ``HEAD`` is not
  reused (llhttp is stopped at its head).
- Failures: ``NeverLeft`` when no connection could be made (connect error or timeout: the
  request never reached upstream); ``TimeoutError`` when upstream is silent for the read
  timeout, or a request's ``timeout_s`` ends (checked on every read, so an endless body
  ends too); ``PayloadError`` when a body is cut short; ``ConnectionError`` otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import re
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, NoReturn, Protocol, cast

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..errors import BadGateway

MAX_HEAD = 64 * 1024  # bytes of response heads (interim ones included) per exchange
MAX_INTERIM = 8  # interim 1xx answers skipped before the final one; more is an error
MAX_IDLE = 256  # idle connections kept in all (every identity's pool together)
DNS_TTL_S = 300.0
PAUSE_AT = 1024 * 1024  # unread response bytes before the connection stops reading
NO_BODY_STATUS = frozenset({204, 304})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


class NeverLeft(BadGateway):
    """The request provably never reached upstream: its window lease may be refunded."""

    never_left = True


class PayloadError(ConnectionError):
    """The response body ended before its length or its last chunk."""


class BodyStream(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]: ...


@functools.cache
def default_tls() -> ssl.SSLContext:
    """One context for every TLS connection (building one loads the CA store)."""
    return ssl.create_default_context()


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
        self.in_use, self.unfinished = True, False
        self.head, self.head_only = None, head_only
        self._reason, self._raw, self._head_bytes, self._bare, self._interim = b"", [], 0, 0, 0
        self._in_interim = self._until_close = False
        self.chunks.clear()
        self.unread, self.eof, self.keep_alive, self.error = 0, False, True, None

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


class Body:
    """``response.content``: the body as it arrives."""

    def __init__(self, response: Response) -> None:
        self._r = response

    async def iter_any(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._r._next()
            if chunk is None:
                return
            yield chunk


class Response:
    """Upstream's answer, its body unread; ``release()`` it when done."""

    def __init__(self, pool: Pool, conn: _Conn, read_timeout_s: float, deadline: float | None) -> None:
        assert conn.head is not None
        self.status, self.reason, headers = conn.head
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(headers)
        self.content = Body(self)
        self._pool = pool
        self._conn: _Conn | None = conn
        self._read_timeout_s = read_timeout_s
        self._deadline = deadline

    @property
    def content_length(self) -> int | None:
        """The body's length when upstream said it (never with Transfer-Encoding: refused)."""
        value = self.headers.get("Content-Length")
        if value is None or not value.isdigit():
            return None
        return int(value)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").split(";", 1)[0].strip().lower()

    async def _next(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return None
        deadline = self._deadline
        while True:
            if conn.error is not None:  # even with bytes in hand: the answer is not to be trusted
                raise conn.error
            if deadline is not None and time.monotonic() >= deadline:
                conn.broken = True  # a body that never ends still ends here
                raise TimeoutError()
            if conn.chunks:
                return conn.take()
            if conn.eof:
                return None
            await conn.wait(_timeout(self._read_timeout_s, deadline))

    async def read(self) -> bytes:
        parts = []
        while (chunk := await self._next()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)


def _timeout(read_timeout_s: float, deadline: float | None) -> float:
    if deadline is None:
        return read_timeout_s
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError()
    return min(read_timeout_s, left)


class Pool:
    """Keep-alive connections to the upstream hosts; ``request`` sends one request."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._tls = tls  # for https; default_tls() (the system's CAs) unless given
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int, str], list[_Conn]] = {}
        self._lru: dict[_Conn, None] = {}  # every idle connection, the longest idle first
        self._dns: dict[tuple[str, int], tuple[float, list[Any]]] = {}  # (host, port) -> (until, addresses)
        self._resolving: dict[tuple[str, int], asyncio.Future[list[Any]]] = {}
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | BodyStream | None,
        *,
        timeout_s: float | None = None,
        on_send: Callable[[], Any] | None = None,
        identity: str = "",
        conn: _Conn | None = None,
    ) -> Response:
        """Send one request. ``identity`` (a fingerprint of the client's key) picks the pool:
        idle connections are never shared between identities. ``conn``: a connection taken
        with ``idle`` or ``connect`` for this request (else one is found or made here)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        key = _pool_key(url, identity)
        head, stream, chunked = _request_head(method, url, headers, body)  # before any connection
        if conn is not None:
            assert conn.key == key, "a connection taken for another host or identity"
        else:
            conn = self._reuse(key) or await self._connect(key, deadline)
        conn.reset(head_only=method == "HEAD")
        try:
            if on_send is not None:
                on_send()
            try:
                if stream is None:
                    conn.write(head + cast(bytes, body or b""))
                else:
                    conn.write(head)
                    await self._send_stream(conn, stream, chunked, deadline)
            except ConnectionError:
                if conn.head is None:
                    raise
                conn.unfinished = True  # answered before the body was all sent: that answer counts
            while conn.head is None:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(_timeout(self._read_timeout_s, deadline))
        except BaseException:
            self._discard(conn)
            raise
        return Response(self, conn, self._read_timeout_s, deadline)

    async def _send_stream(
        self, conn: _Conn, stream: BodyStream, chunked: bool, deadline: float | None
    ) -> None:
        """The body as it comes; stops early (the connection then not reusable) when upstream
        answers before it was all sent (a 401, 413 or 429 to an upload)."""
        async for chunk in stream.iter_any():
            if conn.head is not None:
                break
            if chunk:
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain(_timeout(self._read_timeout_s, deadline))
        else:
            if chunked:
                conn.write(b"0\r\n\r\n")  # the body is whole: the connection stays usable
            return
        conn.unfinished = True

    # -- a connection in hand before a request is sent (so it leaves at once when admitted) --
    def idle(self, url: URL, identity: str = "") -> _Conn | None:
        """An idle connection for ``url``'s host and ``identity``, checked quiet; None if none."""
        return self._reuse(_pool_key(url, identity))

    async def connect(self, url: URL, identity: str = "") -> _Conn:
        """A new connection for ``url``'s host and ``identity``; ``NeverLeft`` if none could
        be made within the connect timeout."""
        return await self._connect(_pool_key(url, identity), None)

    def sound(self, conn: _Conn) -> bool:
        """Still open, with nothing unexpected waiting: fit to carry a request now."""
        return (
            not (conn.broken or conn.lost or conn.in_use)
            and conn.error is None
            and conn.transport is not None
            and not conn.transport.is_closing()
            and conn.quiet()
        )

    def give_back(self, conn: _Conn) -> None:
        """A connection from ``idle`` or ``connect`` that carried no request: kept idle again
        if it is still sound, else closed."""
        if self._closed or not self.sound(conn):
            self._discard(conn)
            return
        if not conn.idle_limit:  # a new one: idle from now
            conn.idle_since, conn.idle_limit = time.monotonic(), self._keepalive_s
        self._park(conn)

    def _reuse(self, key: tuple[str, str, int, str]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            del self._lru[conn]
            if not idle:
                del self._idle[key]
            if conn.reusable() and now - conn.idle_since < conn.idle_limit and conn.quiet():
                return conn
            self._discard(conn)
        return None

    async def _connect(self, key: tuple[str, str, int, str], deadline: float | None) -> _Conn:
        scheme, host, port, _ = key
        tls = (self._tls or default_tls()) if scheme == "https" else None
        loop = asyncio.get_running_loop()
        timeout_s = self._connect_timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, max(0.0, deadline - time.monotonic()))
        conn = _Conn(key)
        try:
            async with asyncio.timeout(timeout_s):
                addresses = await self._resolve(host, port)
                # Happy eyeballs (RFC 8305, as aiohttp connects): an address that drops the
                # attempt silently does not spend the whole timeout before the next is tried.
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=0.25, interleave=1
                )
                conn.watch(sock.fileno())
                transport, _ = await loop.create_connection(
                    lambda: conn, sock=sock, ssl=tls, server_hostname=host if tls else None
                )
        except TimeoutError as exc:
            self._dns.pop((host, port), None)
            raise NeverLeft("Timed out connecting to the upstream API") from exc
        except OSError as exc:
            self._dns.pop((host, port), None)
            raise NeverLeft("Could not connect to the upstream API") from exc
        conn.transport = transport  # uvloop may call connection_made only after this returns
        return conn

    async def _resolve(self, host: str, port: int) -> list[Any]:
        """The host's addresses, cached for DNS_TTL_S: a burst of new connections does not
        queue on the resolver's threads."""
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        lookup = self._resolving.get((host, port))  # one lookup for a burst of connections
        if lookup is None:
            loop = asyncio.get_running_loop()
            lookup = asyncio.ensure_future(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            self._resolving[(host, port)] = lookup
            lookup.add_done_callback(lambda _: self._resolving.pop((host, port), None))
        infos = await asyncio.shield(lookup)
        if not infos:
            raise OSError(f"no address for {host}")
        self._dns[(host, port)] = (now + DNS_TTL_S, infos)
        return infos

    def _release(self, conn: _Conn) -> None:
        conn.in_use = False
        if self._closed or not conn.reusable():
            self._discard(conn)
            return
        limit = self._keepalive_s
        alive = conn.head[2].get("Keep-Alive", "") if conn.head else ""
        for part in alive.split(","):
            name, _, value = part.strip().partition("=")
            if name.lower() == "timeout" and value.strip().isdigit():
                limit = min(limit, max(0.0, int(value) - 1.0))  # leave before the server does
        conn.idle_since, conn.idle_limit = time.monotonic(), limit
        self._park(conn)

    def _park(self, conn: _Conn) -> None:
        """Into the idle pool; the longest idle closed past their limit or past MAX_IDLE."""
        if conn in self._lru:  # given back twice: one connection is never pooled twice
            return
        now = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._lru[conn] = None
        # The longest idle go first: past their limit, or past MAX_IDLE in all (one pool per
        # identity: many clients, or many made-up keys, must not hold a descriptor each).
        while self._lru:
            oldest = next(iter(self._lru))
            if len(self._lru) <= MAX_IDLE and now - oldest.idle_since < oldest.idle_limit:
                break
            del self._lru[oldest]
            idle = self._idle[oldest.key]
            idle.remove(oldest)
            if not idle:
                del self._idle[oldest.key]
            self._discard(oldest)

    @staticmethod
    def _discard(conn: _Conn) -> None:
        """Closed at once (abort): a connection given up mid-upload may hold unsent data that
        a graceful close would wait on for as long as upstream does not read."""
        conn.broken = True
        if conn.transport is not None:
            conn.transport.abort()

    async def close(self) -> None:
        self._closed = True
        for conn in self._lru:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._lru.clear()


Connection = _Conn  # what callers hold between ``Pool.idle``/``connect`` and ``request``


def _pool_key(url: URL, identity: str) -> tuple[str, str, int, str]:
    return (url.scheme, url.raw_host or "", url.port or (443 if url.scheme == "https" else 80), identity)


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
