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

The parts: this module is the pool and the response handed to the caller; one connection
(the response read and parsed) is http1_conn.py, the request head http1_request.py.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiohappyeyeballs
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..errors import BadGateway
from .http1_conn import MAX_HEAD, MAX_INTERIM, PAUSE_AT, PayloadError, StaleConnection, _Conn, parse_head
from .http1_request import BodyStream, InvalidHead, _request_head

# Names that lived here before the connection and the request head moved out, imported from
# here by forward.py, handler.py, ws_wire.py, the tests and bench/parse_response.py.
__all__ = [
    "MAX_HEAD",
    "MAX_IDLE",
    "MAX_INTERIM",
    "PAUSE_AT",
    "BodyStream",
    "Connection",
    "InvalidHead",
    "NeverLeft",
    "PayloadError",
    "StaleConnection",
    "Pool",
    "Response",
    "_Conn",
    "_request_head",
    "default_tls",
    "parse_head",
]

MAX_IDLE = 256  # idle connections kept in all (every identity's pool together)
DNS_TTL_S = 300.0


class NeverLeft(BadGateway):
    """The request provably never reached upstream: its window lease may be refunded."""

    never_left = True


@functools.cache
def default_tls() -> ssl.SSLContext:
    """One context for every TLS connection (building one loads the CA store)."""
    return ssl.create_default_context()


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
        except ConnectionError as exc:
            self._discard(conn)
            if conn.stale() and not isinstance(exc, StaleConnection):
                raise StaleConnection(str(exc)) from exc
            raise
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
