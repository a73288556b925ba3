"""A lean HTTP/1.1 client for the upstream API: keep-alive connections, bodies streamed.

aiohttp's ClientSession costs ~110 µs of CPU per request on this path (bench/
profile_gateway.py: request and response objects, tracing, cookie and redirect machinery,
timers re-armed on every read), more than the gateway's own work. The proxy needs little of
it: one upstream per host, requests whose headers it already prepared, responses it relays.
So this client writes the request head itself and parses the response with a small state
machine on an ``asyncio.Protocol`` (~15 µs per request).

- Connections are kept per (scheme, host, port), reused last-in first-out, never limited
  (an admitted request never waits for a connection: ADMISSION.md I1), closed after
  ``keepalive_s`` idle or the server's ``Keep-Alive: timeout``. A request is never retried:
  upstream may have counted it.
- Request bodies: ``None``, ``bytes`` (sent with the head in one write), or a stream (the
  client's body, never held in memory) sent with its ``Content-Length`` or chunked.
- Responses: status, headers, and a body by ``Content-Length``, chunked, or until the
  connection closes (no body for ``HEAD``, 1xx, 204, 304; interim 1xx answers are skipped).
  Content-Encoding is left as it is. The body is read by ``read()`` or ``content.iter_any()``
  with flow control (reading pauses past 1 MiB unread); ``release()`` returns a fully read
  connection to the pool and closes any other.
- Failures: ``NeverLeft`` when no connection could be made (connect error or timeout: the
  request never reached upstream); ``TimeoutError`` when upstream is silent for the read
  timeout, or a request's ``timeout_s`` ends; ``PayloadError`` when a body is cut short;
  ``ConnectionError`` otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, cast

import aiohappyeyeballs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..errors import BadGateway

MAX_HEAD = 64 * 1024
DNS_TTL_S = 300.0
HEX_DIGITS = b"0123456789abcdefABCDEF"
PAUSE_AT = 1024 * 1024  # unread response bytes before the connection stops reading
NO_BODY_STATUS = frozenset({204, 304})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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


class _Conn(asyncio.Protocol):
    """One connection: the request head written by the pool, the response parsed here."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.idle_limit = 0.0
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None  # head or body progress
        self._drain: asyncio.Future[None] | None = None
        self._paused_writing = False
        self._paused_reading = False
        self.in_use = False  # a request is in flight: what arrives is its answer
        self.unfinished = False  # its request body was cut short (answered early): not reusable
        # the response being read
        self.head: tuple[int, str, CIMultiDict[str]] | None = None
        self.head_only = False  # a HEAD request: no body, whatever the headers say
        self._mode = ""  # "length", "chunked", "close", "none"
        self._left = 0  # bytes of body (length) or of the current chunk (chunked)
        self._chunk_state = "size"  # size, data, crlf, trailer
        self.chunks: deque[bytes] = deque()
        self.unread = 0
        self.eof = False
        self.keep_alive = True
        self.error: Exception | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_use:  # nothing was asked: a stray answer (a 408 before closing, say)
            self._fail(ConnectionError("upstream sent data on an idle connection"))
            return
        self._buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self._fail(ConnectionError(f"malformed response from upstream ({exc})"))
            return
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
        if self._mode == "close" and not self.eof and exc is None:
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
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        finally:
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
        self.error = exc
        if self.transport is not None:
            self.transport.abort()  # not close(): that waits for unsent upload data to drain
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(exc)
        self._wake()

    # -- parsing -------------------------------------------------------------------------
    def reset(self, head_only: bool) -> None:
        self.in_use, self.unfinished = True, False
        self.head, self.head_only = None, head_only
        self._mode, self._left, self._chunk_state = "", 0, "size"
        self.chunks.clear()
        self.unread, self.eof, self.keep_alive, self.error = 0, False, True, None

    def _parse(self) -> None:
        while True:
            if self.head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD:
                        raise ValueError("response head too long")
                    return
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                status, reason, headers, version = parse_head(head)
                if status == 101:
                    raise ValueError("101 Switching Protocols to a request that asked for no upgrade")
                if 100 <= status < 200:
                    continue  # interim (100 Continue, 103 Early Hints): the real one follows
                self._start_body(status, headers, version)
                self.head = (status, reason, headers)
                if self._mode == "none":
                    self.eof = True
                    return
                continue
            if self.eof or not self._buf:
                return
            if self._mode == "length":
                n = min(self._left, len(self._buf))
                self._emit(bytes(self._buf[:n]))
                del self._buf[:n]
                self._left -= n
                if self._left == 0:
                    self.eof = True
                continue
            if self._mode == "close":
                self._emit(bytes(self._buf))
                self._buf.clear()
                return
            if not self._chunked():  # needs more bytes
                return

    def _start_body(self, status: int, headers: CIMultiDict[str], version: str) -> None:
        connection = headers.get("Connection", "").lower()
        self.keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        if self.head_only or status in NO_BODY_STATUS:
            self._mode = "none"
        elif "Transfer-Encoding" in headers:  # chunked last, or (anything else) until the close
            codings = ",".join(headers.getall("Transfer-Encoding")).lower().split(",")
            chunked = codings[-1].strip() == "chunked"
            self._mode = "chunked" if chunked else "close"
            # With a Content-Length too the framing is ambiguous: read it as chunked, never reuse.
            self.keep_alive = self.keep_alive and chunked and "Content-Length" not in headers
        elif "Content-Length" in headers:
            value = headers["Content-Length"].strip()
            if not value.isdigit() or not value.isascii():
                raise ValueError(f"bad Content-Length {value[:20]!r}")
            self._left = int(value)
            self._mode = "length" if self._left else "none"
        else:
            self._mode, self.keep_alive = "close", False

    def _chunked(self) -> bool:
        """One step of chunked decoding; False when it needs more bytes."""
        buf = self._buf
        state = self._chunk_state
        if state == "size":
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 4096:
                    raise ValueError("chunk size line too long")
                return False
            size = bytes(buf[:end]).split(b";", 1)[0].strip()
            if not size or size.strip(HEX_DIGITS):
                raise ValueError(f"bad chunk size {size[:20]!r}")
            self._left = int(size, 16)
            del buf[: end + 2]
            self._chunk_state = "data" if self._left else "trailer"
            return True
        if state == "data":
            n = min(self._left, len(buf))
            self._emit(bytes(buf[:n]))
            del buf[:n]
            self._left -= n
            if self._left == 0:
                self._chunk_state = "crlf"
            return bool(buf)
        if state == "crlf":
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            del buf[:2]
            self._chunk_state = "size"
            return True
        end = buf.find(b"\r\n")  # trailer: lines until an empty one
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ValueError("trailer too long")
            return False
        del buf[: end + 2]
        if end == 0:
            self.eof = True
        return True

    def _emit(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.unread += len(data)


def parse_head(head: bytes) -> tuple[int, str, CIMultiDict[str], str]:
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")  # as aiohttp decodes them
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isascii() or not code.isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:40]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.add(name.strip(), value.strip())
    return int(code), reason, headers, version


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
        """The body's length when upstream said it (and did not send it chunked)."""
        value = self.headers.get("Content-Length")
        if value is None or not value.isdigit() or "Transfer-Encoding" in self.headers:
            return None
        return int(value)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").split(";", 1)[0].strip().lower()

    async def _next(self) -> bytes | None:
        conn = self._conn
        if conn is None:
            return None
        while True:
            if conn.chunks:
                return conn.take()
            if conn.eof:
                return None
            if conn.error is not None:
                raise conn.error
            await conn.wait(_timeout(self._read_timeout_s, self._deadline))

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
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
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
    ) -> Response:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        key = (url.scheme, url.raw_host or "", url.port or (443 if url.scheme == "https" else 80))
        head, stream, chunked = _request_head(method, url, headers, body)  # before any connection
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

    def _reuse(self, key: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            usable = not conn.lost and conn.error is None and not conn._buf
            if usable and conn.transport is not None and not conn.transport.is_closing():
                if now - conn.idle_since < conn.idle_limit:
                    return conn
            self._discard(conn)
        return None

    async def _connect(self, key: tuple[str, str, int], deadline: float | None) -> _Conn:
        scheme, host, port = key
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
        reusable = (
            conn.eof and conn.keep_alive and not (conn.unfinished or conn.unread or conn._paused_reading)
        )
        if self._closed or conn.lost or conn.error or conn._buf or not reusable:
            self._discard(conn)
            return
        limit = self._keepalive_s
        alive = conn.head[2].get("Keep-Alive", "") if conn.head else ""
        for part in alive.split(","):
            name, _, value = part.strip().partition("=")
            if name.lower() == "timeout" and value.strip().isdigit():
                limit = min(limit, max(0.0, int(value) - 1.0))  # leave before the server does
        conn.idle_since, conn.idle_limit = time.monotonic(), limit
        idle = self._idle.setdefault(conn.key, [])
        idle.append(conn)
        while idle and time.monotonic() - idle[0].idle_since >= idle[0].idle_limit:
            self._discard(idle.pop(0))  # the oldest first: LIFO reuse leaves them at the bottom

    @staticmethod
    def _discard(conn: _Conn) -> None:
        """Closed at once (abort): a connection given up mid-upload may hold unsent data that
        a graceful close would wait on for as long as upstream does not read."""
        if conn.transport is not None:
            conn.transport.abort()

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()


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
