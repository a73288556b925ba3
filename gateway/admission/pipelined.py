"""The admission hot path's Redis connection: one socket, commands pipelined, hiredis replies.

Every admission is one EVALSHA. Through redis-py each costs ~100 µs of gateway CPU (a pool
checkout, an ``asyncio.timeout`` around each read, its command layers); here it is one
``hiredis.pack_command``, one buffered write shared by every command issued in the same
event-loop turn, and a future resolved in order as hiredis parses the replies
(docs/benchmarks.md has the figures). redis-py still does everything else (pub/sub,
readiness, admin, tests).

Failure model: replies come back in the order commands were sent, so the first thing that
could break that order (a timeout, a lost or refused connection) fails every command in
flight on that socket and drops it; the next call reconnects (and, given ``locate``, finds
the server anew: so does a MOVED/ASK/READONLY reply). Errors are redis-py's
exception types, so RedisStore translates them in one place. A caller that is cancelled
leaves its reply to be read and discarded: the order is kept.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
from redis import exceptions as redis_errors
from redis.connection import parse_url

FLUSH_AT = 64  # commands buffered in one loop turn before they are written without waiting for its end
# Error replies that mean "not here": the account's slot moved (Cluster) or the server was
# demoted to a replica (a failover); the connection is dropped and the server located again.
_ELSEWHERE = ("MOVED ", "ASK ", "READONLY ", "CLUSTERDOWN ")

Locate = Callable[[], Awaitable[tuple[str, int]]]  # where the data lives now: (host, port)


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout: float = 0.25) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.sent: collections.deque[float] = collections.deque()  # when each waiter's command left
        self.timeout = timeout
        self.watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.flush_scheduled = False
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                waiter = self.waiters.popleft()
                self.sent.popleft()
                if waiter.done():
                    continue  # its caller gave up; the reply is read so the order holds
                if isinstance(reply, hiredis.ReplyError):
                    if str(reply).startswith(_ELSEWHERE):
                        # The data is no longer on this server (a resharding, a failover, a
                        # demoted primary): drop the socket, the next call locates it again.
                        waiter.set_exception(redis_errors.ConnectionError(f"redis moved: {reply}"))
                        self.fail(redis_errors.ConnectionError(f"redis moved: {reply}"))
                        return
                    waiter.set_exception(redis_errors.ResponseError(str(reply)))
                else:
                    waiter.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(redis_errors.ConnectionError(f"protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed")
        self._fail_all(redis_errors.ConnectionError(f"redis connection lost: {self.lost}"))

    def flush_soon(self) -> None:
        """One write per event-loop turn for every command issued in it, or sooner once
        ``FLUSH_AT`` commands are waiting: a burst issued in one turn (10,000 requests arriving
        at once) reaches Redis while the rest of it is still being built, not after."""
        if len(self.buffer) >= FLUSH_AT:
            self.flush()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.buffer and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.buffer))
        self.buffer.clear()

    def fail(self, exc: Exception) -> None:
        self.lost = exc
        self._fail_all(exc)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, exc: Exception) -> None:
        self.sent.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def expect(self, waiter: asyncio.Future[Any], now: float) -> None:
        """Track a reply; one timer per connection watches the oldest (not one per call)."""
        self.waiters.append(waiter)
        self.sent.append(now)
        if self.watchdog is None:
            self.watchdog = asyncio.get_running_loop().call_at(now + self.timeout, self._check)

    def _check(self) -> None:
        self.watchdog = None
        if not self.sent:
            return
        loop = asyncio.get_running_loop()
        due = self.sent[0] + self.timeout
        if loop.time() >= due:
            # A reply is late; it may still come after later ones were expected: drop the socket.
            self.fail(redis_errors.TimeoutError("redis call timed out"))
        else:
            self.watchdog = loop.call_at(due, self._check)


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = b"%d" % value
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array_header(count: int) -> bytes:
    return b"*%d\r\n" % count


class PipelinedRedis:
    """``await conn.call("EVALSHA", ...)`` over one pipelined connection to ``url``.

    ``locate``, when given, names the server at each (re)connect instead of ``url``'s host
    (the slot's master on a Cluster, Sentinel's primary: topology.py); ``url`` still gives
    the user, password, database and TLS.
    """

    def __init__(
        self, url: str, *, timeout_ms: int = 250, connect_timeout_ms: int = 500, locate: Locate | None = None
    ) -> None:
        self._opts = parse_url(url)  # type: ignore[no-untyped-call]
        self._locate = locate
        self._timeout = timeout_ms / 1000
        self._connect_timeout = connect_timeout_ms / 1000
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        opts = self._opts
        if self._locate is not None:
            try:
                host, port = await asyncio.wait_for(self._locate(), 2 * self._connect_timeout)
            except TimeoutError as exc:
                raise redis_errors.TimeoutError("timed out locating redis") from exc
            opts = {**opts, "host": host, "port": port}
        if "path" in opts:
            coro = loop.create_unix_connection(lambda: _Protocol(self._timeout), opts["path"])
        else:
            context = None
            if (
                opts.get("connection_class") is not None
                and opts["connection_class"].__name__ == "SSLConnection"
            ):
                context = ssl.create_default_context()
                if str(opts.get("ssl_cert_reqs", "")).lower() == "none":
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
            coro = loop.create_connection(
                lambda: _Protocol(self._timeout),
                opts.get("host", "localhost"),
                opts.get("port", 6379),
                ssl=context,
            )
        try:
            _, proto = await asyncio.wait_for(coro, self._connect_timeout)
        except TimeoutError as exc:
            raise redis_errors.TimeoutError("timed out connecting to redis") from exc
        except OSError as exc:
            raise redis_errors.ConnectionError(f"cannot connect to redis: {exc}") from exc
        # Authenticate and select before anything else; pipelined like any command.
        hello: list[tuple[Any, ...]] = []
        if opts.get("password"):
            hello.append(
                ("AUTH", opts["username"], opts["password"])
                if opts.get("username")
                else ("AUTH", opts["password"])
            )
        if opts.get("db"):
            hello.append(("SELECT", opts["db"]))
        waits = [self._send(proto, cmd) for cmd in hello]
        proto.flush()
        try:
            for w in waits:
                await asyncio.wait_for(w, self._connect_timeout)
        except BaseException:
            proto.fail(redis_errors.ConnectionError("redis handshake failed"))
            raise
        return proto

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        connecting = self._connecting
        if connecting is None:
            # One connect shared by every caller, and owned by none of them: each awaits it
            # through a shield, so a caller cancelled mid-connect (a client leaving) never
            # cancels it for the others (nor kills a background task awaiting it).
            connecting = self._connecting = asyncio.ensure_future(self._open())
            connecting.add_done_callback(self._connected)
        return await asyncio.shield(connecting)

    async def connect(self) -> None:
        """Open the connection now (a gateway starting), so the first burst of requests does
        not wait for it; a failure is left for the first call to meet again."""
        await self._connection()

    def _connected(self, connecting: asyncio.Future[_Protocol]) -> None:
        if self._connecting is connecting:
            self._connecting = None
        if connecting.cancelled():
            return
        if connecting.exception() is None:  # retrieved here too: every caller may have left
            self._proto = connecting.result()

    def _send(self, proto: _Protocol, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        return self._send_packed(proto, hiredis.pack_command(args))

    @staticmethod
    def _send_packed(proto: _Protocol, payload: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        proto.expect(waiter, loop.time())
        proto.buffer.append(payload)
        return waiter

    async def call(self, *args: Any) -> Any:
        return await self.call_packed(hiredis.pack_command(args))

    async def call_packed(self, payload: bytes) -> Any:
        """Send one command already in RESP form (``bulk``, ``array_header``)."""
        return await self._submit(payload)

    def _submit(self, payload: bytes) -> Awaitable[Any]:
        """The command's reply (a future); a coroutine only while (re)connecting."""
        proto = self._proto
        if proto is None or proto.lost is not None:
            return self._submit_after_connect(payload)
        waiter = self._send_packed(proto, payload)
        proto.flush_soon()
        return waiter

    async def _submit_after_connect(self, payload: bytes) -> Any:
        proto = await self._connection()
        waiter = self._send_packed(proto, payload)
        proto.flush_soon()
        return await waiter

    async def evalsha(self, script: Any, payload: bytes) -> Any:
        """Run an EVALSHA already packed; load ``script`` and resend on NOSCRIPT."""
        try:
            return await self._submit(payload)
        except redis_errors.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.call("SCRIPT", "LOAD", script)
        return await self._submit(payload)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None
