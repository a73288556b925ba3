"""The hostile (or merely buggy) upstream: a raw-socket server that misbehaves in the ways
issue 8 lists, with two client identities using one Pool at once. Every answer it gives is
tagged with the Authorization of the request it was made for, and no identity may ever read
a tag that is not its own.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from yarl import URL

from gateway.config import Upstream as UpstreamConfig
from gateway.errors import BadGateway
from gateway.metrics import Metrics
from gateway.proxy.forward import Upstream
from gateway.proxy.http1 import MAX_INTERIM, PAUSE_AT, Pool, Response

A, B = "key-A", "key-B"  # two clients' keys; their fingerprints are the pool identities
TAG = re.compile(rb"for=(key-[A-Z])")


def tagged(auth: str, extra: bytes = b"") -> bytes:
    body = b'{"for=%s"}' % auth.encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@dataclass
class Link:
    """One upstream connection as the hostile server sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    served: list[str] = field(default_factory=list)  # the Authorization of each request, in order

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Behaviour = Callable[[Link, str, bytes], Awaitable[bool]]  # False: stop serving this connection


@dataclass
class Hostile:
    url: URL
    links: list[Link]
    requests: list[str]  # every request's Authorization, as received


@asynccontextmanager
async def hostile_upstream(behaviour: Behaviour) -> AsyncIterator[Hostile]:
    links: list[Link] = []
    requests: list[str] = []
    done: list[asyncio.Event] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        done.append(over := asyncio.Event())
        link = Link(reader, writer)
        links.append(link)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                auth = re.search(rb"\r\nAuthorization: ([^\r]*)", head)
                who = auth.group(1).decode() if auth else ""
                length = re.search(rb"\r\nContent-Length: (\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                requests.append(who)
                if not await behaviour(link, who, body):
                    break
                link.served.append(who)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.transport.abort()
            over.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Hostile(URL(f"http://127.0.0.1:{port}/v2/transcript/x"), links, requests)
    finally:
        server.close()
        for link in links:
            link.writer.transport.abort()  # every handler then ends on its own
        await asyncio.wait_for(asyncio.gather(*(over.wait() for over in done)), 2)
        await server.wait_closed()


def pool(read: float = 2.0) -> Pool:
    return Pool(connect_timeout_s=2.0, read_timeout_s=read)


async def fetch(p: Pool, url: URL, who: str, **kw: float) -> bytes | Exception:
    """One exchange as ``who``: the body read, or the error it ended with. Any tag in the
    bytes received must be ``who``'s."""
    try:
        resp = await p.request("GET", url, CIMultiDict({"Authorization": who}), None, identity=who, **kw)
    except (ConnectionError, TimeoutError) as exc:
        return exc
    try:
        body = await resp.read()
    except (ConnectionError, TimeoutError) as exc:
        return exc
    finally:
        resp.release()
    for tag in TAG.findall(body):
        assert tag.decode() == who, f"{who} received an answer made for {tag.decode()}"
    return body


async def test_late_stray_bytes_never_reach_another_identity() -> None:
    """A short Content-Length: the rest of the answer (a whole tagged response) follows
    100-150 ms later, or just as the next request arrives on the connection. Another identity
    never reads it; the same identity at worst gets a refusal or its own tag."""

    async def short_length(link: Link, who: str, body: bytes) -> bool:
        if link.served:  # the previous answer's tail, as late as it can be: just before this one
            link.send(tagged(link.served[-1]))
        link.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        loop = asyncio.get_running_loop()
        loop.call_later(0.1 + 0.05 * (len(link.served) % 2), link.send, tagged(who))
        return True

    async with hostile_upstream(short_length) as up:
        p = pool()
        for gap in (0.0, 0.12) * 4:
            results = [await fetch(p, up.url, A), await fetch(p, up.url, B)]  # one after the other
            results += await asyncio.gather(*(fetch(p, up.url, who) for who in (A, B, A, B)))
            for result in results:  # (each tag was checked in fetch)
                assert isinstance(result, Exception) or result == b"ok" or TAG.search(result)
            await asyncio.sleep(gap)  # 0.12 s: some stray tails land while their connection is idle
        await p.close()


async def test_a_reused_connection_is_polled_quiet_first() -> None:
    """Bytes already in the socket but not yet handed over by the event loop (it was busy):
    the connection is closed and another made, before a request is written on it."""

    async def answer(link: Link, who: str, body: bytes) -> bool:
        link.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + (b"again" if link.served else b"first"))
        return True

    async with hostile_upstream(answer) as up:
        p = pool()
        assert await fetch(p, up.url, A) == b"first"
        await asyncio.sleep(0.02)  # the upstream's side is idle, waiting for the next request
        # A stale answer lands in the client's socket; the loop does not run before the reuse.
        up.links[0].send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale")
        time.sleep(0.02)  # noqa: ASYNC251 (the point: the loop is busy while they arrive)
        assert await fetch(p, up.url, A) == b"first"  # a new connection's first answer
        assert len(up.links) == 2
        await p.close()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 6\r\nContent-Length: 2\r\n",  # two lengths: which one?
        b"Content-Length: 2\r\nContent-Length: 2\r\n",  # two, even equal
        b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",  # CL with TE
        b"X-Note: a\r\n Content-Length: 6\r\nContent-Length: 2\r\n",  # a folded line
        b"Transfer-Encoding: gzip, chunked\r\n",  # not exactly chunked
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ],
)
async def test_ambiguous_framing_is_a_502_and_the_connection_is_not_kept(framing: bytes) -> None:
    async def answer(link: Link, who: str, body: bytes) -> bool:
        if who == A:
            link.send(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n2\r\nok\r\n0\r\n\r\n" + tagged(A))
        else:
            link.send(tagged(B))
        return True

    async with hostile_upstream(answer) as up:
        p = pool()
        results = await asyncio.gather(fetch(p, up.url, A), fetch(p, up.url, B), fetch(p, up.url, A))
        assert isinstance(results[0], ConnectionError) and isinstance(results[2], ConnectionError)
        assert TAG.search(results[1])  # (its tag was checked)
        assert not p._idle.get(("http", "127.0.0.1", up.url.port, A))
        await p.close()

        # Through forward.Upstream, the caller's exception is a BadGateway (a 502 for the client).
        cfg = UpstreamConfig(connect_timeout_s=2, read_timeout_s=2)
        upstream = Upstream(cfg, Metrics(CollectorRegistry()))
        await upstream.start()
        with pytest.raises(BadGateway):
            resp = await upstream.send(
                "GET",
                up.url,
                headers=CIMultiDict({"Authorization": A}),
                data=None,
                group="g",
                admitted_at=time.perf_counter(),
                identity=A,
            )
            resp.release()
        await upstream.close()


async def test_bytes_after_the_response_are_refused_and_never_pooled() -> None:
    async def long_body(link: Link, who: str, body: bytes) -> bool:
        link.send(tagged(who) + b"EXTRA" if who == A else tagged(who))  # a long body
        return True

    async with hostile_upstream(long_body) as up:
        p = pool()
        a, b = await asyncio.gather(fetch(p, up.url, A), fetch(p, up.url, B))
        assert isinstance(a, ConnectionError) and TAG.search(b)
        assert not p._idle.get(("http", "127.0.0.1", up.url.port, A))
        await p.close()


async def test_an_early_answer_to_an_upload_then_garbage_is_refused() -> None:
    class Endless:
        async def iter_any(self) -> AsyncIterator[bytes]:
            while True:
                await asyncio.sleep(0)
                yield b"x" * 65536

    async def early(link: Link, who: str, body: bytes) -> bool:
        if who == A:  # answers the head at once, then garbage, and stops reading the upload
            link.send(b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 23\r\n\r\n{"error": "bad key!!!"}')
            link.send(b"GARBAGE")
            await asyncio.sleep(1)
            return False
        link.send(tagged(who))
        return True

    async def upload_as_a() -> Response | Exception:
        headers = CIMultiDict({"Authorization": A})
        try:
            resp = await p.request("POST", up.url, headers, Endless(), identity=A)
            await resp.read()
        except ConnectionError as exc:
            return exc
        resp.release()
        return resp

    async with hostile_upstream(early) as up:
        p = pool(read=5)
        a, b = await asyncio.wait_for(asyncio.gather(upload_as_a(), fetch(p, up.url, B)), 3)
        assert isinstance(a, ConnectionError) and TAG.search(b)
        assert not p._idle.get(("http", "127.0.0.1", up.url.port, A))
        await p.close()


async def test_a_reset_mid_body_is_a_payload_error_and_the_next_request_a_new_connection() -> None:
    resets = [1]

    async def reset(link: Link, who: str, body: bytes) -> bool:
        if who == A and resets:
            resets.pop()
            link.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"for=" + A.encode() + b"." * 100)
            await link.writer.drain()
            await asyncio.sleep(0.05)
            link.reset()
            return False
        link.send(tagged(who))
        return True

    async with hostile_upstream(reset) as up:
        p = pool()
        a, b = await asyncio.gather(fetch(p, up.url, A), fetch(p, up.url, B))
        assert isinstance(a, ConnectionError) and TAG.search(b)
        assert TAG.search(await fetch(p, up.url, A))
        await p.close()


async def test_a_flood_of_interim_answers_is_bounded() -> None:
    async def flood(link: Link, who: str, body: bytes) -> bool:
        if who == A:
            link.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * 200 + tagged(A))
        else:
            link.send(b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM + tagged(B))  # within bounds
        return True

    async with hostile_upstream(flood) as up:
        p = pool()
        a, b = await asyncio.gather(fetch(p, up.url, A), fetch(p, up.url, B))
        assert isinstance(a, ConnectionError) and TAG.search(b)
        await p.close()


async def test_an_endless_body_ends_at_the_deadline_with_memory_bounded() -> None:
    stop = asyncio.Event()

    async def endless(link: Link, who: str, body: bytes) -> bool:
        link.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%b\r\n" % (65536, (b"for=" + who.encode()) * (65536 // 9) + b"." * (65536 % 9))
        while not stop.is_set():
            link.send(chunk)
            await link.writer.drain()  # as fast as the client reads, no faster
        return False

    async with hostile_upstream(endless) as up:
        p = pool(read=5)
        started = time.monotonic()
        # Read continuously: data is always there, so only the request's deadline ends it.
        results = await asyncio.wait_for(
            asyncio.gather(fetch(p, up.url, A, timeout_s=0.5), fetch(p, up.url, B, timeout_s=0.5)), 4
        )
        assert all(isinstance(r, TimeoutError) for r in results) and time.monotonic() - started < 2

        # Not read at all: the connection stops reading past PAUSE_AT unread bytes.
        resp = await p.request("GET", up.url, CIMultiDict({"Authorization": A}), None, identity=A)
        await asyncio.sleep(0.3)
        conn = resp._conn
        assert conn is not None and conn._paused_reading and conn.unread < PAUSE_AT + 1024 * 1024
        resp.release()
        stop.set()
        await p.close()


async def test_an_exchange_that_timed_out_never_returns_its_connection_to_the_pool() -> None:
    """The body's end arrives after the reader gave up: the connection is whole again, yet it
    saw an anomaly, so it is closed, not reused."""

    async def slow_end(link: Link, who: str, body: bytes) -> bool:
        link.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await asyncio.sleep(0.3)
        link.send(b"0\r\n\r\n")
        return True

    async with hostile_upstream(slow_end) as up:
        p = pool(read=0.1)
        resp = await p.request("GET", up.url, CIMultiDict({"Authorization": A}), None, identity=A)
        with pytest.raises(TimeoutError):
            await resp.read()
        await asyncio.sleep(0.4)  # the end arrives: nothing unread, the body complete
        resp.release()
        assert not p._idle.get(("http", "127.0.0.1", up.url.port, A))
        await fetch(p, up.url, A)
        assert len(up.links) == 2  # not reused
        await p.close()


async def test_identities_never_share_an_idle_connection() -> None:
    async def answer(link: Link, who: str, body: bytes) -> bool:
        link.send(tagged(who))
        return True

    async with hostile_upstream(answer) as up:
        p = pool()
        for who in (A, B, A, B, A, B):
            assert TAG.search(await fetch(p, up.url, who))
        assert sorted(len(link.served) for link in up.links) == [3, 3]
        assert all(len(set(link.served)) == 1 for link in up.links)
        await p.close()


async def test_many_identities_hold_a_bounded_number_of_idle_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One pool per identity: a client cycling through made-up keys must not make the gateway
    keep an idle upstream connection (a descriptor) for each."""
    from gateway.proxy import http1

    monkeypatch.setattr(http1, "MAX_IDLE", 3)

    async def answer(link: Link, who: str, body: bytes) -> bool:
        link.send(tagged(who))
        return True

    async with hostile_upstream(answer) as up:
        p = pool()
        keys = [f"key-{chr(ord('C') + i)}" for i in range(10)]
        for who in keys:
            assert TAG.search(await fetch(p, up.url, who))
        assert len(p._lru) == 3 and sum(len(idle) for idle in p._idle.values()) == 3
        assert set(p._idle) == {("http", "127.0.0.1", up.url.port, who) for who in keys[-3:]}  # the newest
        for who in keys[-3:]:  # still reused
            assert TAG.search(await fetch(p, up.url, who))
        assert len(up.links) == 10
        await p.close()
