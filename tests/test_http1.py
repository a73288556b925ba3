"""The upstream HTTP/1.1 client (gateway/proxy/http1.py) against real servers: an aiohttp
server for well-formed exchanges, and a raw socket server for the answers a real upstream
(or a broken one) may give that aiohttp would never write."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.proxy.http1 import NeverLeft, PayloadError, Pool
from tests.helpers import self_signed_tls, serving

H: CIMultiDict[str] = CIMultiDict({"Authorization": "k"})
CLOSE = b"<close>"


@asynccontextmanager
async def raw_server(answer: Callable[[bytes], bytes | None]) -> AsyncIterator[tuple[URL, list[int]]]:
    """Answers each request head with ``answer(head)`` (None: close without answering; an
    answer ending in CLOSE: close after it); yields the URL and the connections made."""
    connections: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                out = answer(head)
                if out is None:
                    break
                writer.write(out.removesuffix(CLOSE))
                await writer.drain()
                if out.endswith(CLOSE):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield URL(f"http://127.0.0.1:{port}/v2/transcript/x"), connections
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.01)


def pool(**kw: float) -> Pool:
    return Pool(connect_timeout_s=kw.get("connect", 2.0), read_timeout_s=kw.get("read", 2.0))


async def test_a_chunked_answer_split_anywhere_is_read_whole_and_the_connection_reused() -> None:
    body = (
        b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (b"hello ", b"chunked ", b"world"))
        + b"0\r\nX: t\r\n\r\n"
    )
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n" + body
    async with raw_server(lambda head: raw) as (url, connections):
        p = pool()
        for _ in range(3):
            resp = await p.request("GET", url, H, None)
            assert resp.status == 200 and resp.content_type == "application/json"
            assert await resp.read() == b"hello chunked world"
            resp.release()
        assert connections == [1]  # kept alive
        await p.close()


async def test_the_parser_survives_every_split_of_a_response() -> None:
    from gateway.proxy.http1 import _Conn

    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\n\r\n"
    )
    for step in range(1, len(raw) + 1):
        conn = _Conn(("http", "h", 80, ""))
        conn.reset(head_only=False)
        for i in range(0, len(raw), step):
            conn.data_received(raw[i : i + step])
        assert conn.head is not None and conn.head[0] == 201 and conn.eof
        assert conn.take() == b"abc"


async def test_a_body_until_close_a_head_request_and_connection_close() -> None:
    def answer(head: bytes) -> bytes | None:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"  # no body follows
        return b"HTTP/1.0 200 OK\r\n\r\nuntil the end" + CLOSE

    async with raw_server(answer) as (url, connections):
        p = pool()
        resp = await p.request("HEAD", url, H, None)
        assert resp.content_length == 999 and await resp.read() == b""
        resp.release()
        resp = await p.request("GET", url, H, None)
        assert await asyncio.wait_for(resp.read(), 5) == b"until the end"  # the server closes after it
        resp.release()
        await p.close()


async def test_a_body_cut_short_is_a_payload_error_and_a_silent_upstream_a_timeout() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort" + CLOSE
    async with raw_server(lambda head: cut) as (url, _):
        p = pool()
        resp = await p.request("GET", url, H, None)
        with pytest.raises(PayloadError):
            await resp.read()
        resp.release()
        await p.close()

    async with raw_server(lambda head: b"") as (url, _):  # reads the request, answers nothing
        p = pool(read=0.2)
        with pytest.raises(TimeoutError):
            await p.request("GET", url, H, None)
        with pytest.raises(TimeoutError):  # a request's own bound
            await pool(read=10).request("GET", url, H, None, timeout_s=0.2)


async def test_nothing_listening_is_never_left() -> None:
    async with raw_server(lambda head: None) as (url, _):
        pass
    with pytest.raises(NeverLeft):
        await pool().request("GET", url, H, None)


async def test_a_malformed_answer_is_a_connection_error() -> None:
    async with raw_server(lambda head: b"SPDY/9 what\r\n\r\n") as (url, _):
        with pytest.raises(ConnectionError):
            await pool().request("GET", url, H, None)


async def test_an_unread_body_or_a_short_keep_alive_is_not_reused() -> None:
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"]
    async with raw_server(lambda head: answers[0]) as (url, connections):
        p = pool()
        for _ in range(2):
            (await p.request("GET", url, H, None)).release()  # body never read
        assert len(connections) == 2
        answers[0] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=1\r\n\r\nhello"
        for _ in range(2):
            resp = await p.request("GET", url, H, None)
            await resp.read()
            resp.release()
        assert len(connections) == 4  # timeout=1: the gateway leaves at once, before the server does
        await p.close()


async def test_bodies_stream_both_ways_chunked_or_sized_with_flow_control() -> None:
    seen: dict[str, object] = {}
    big = bytes(range(256)) * 40_000  # ~10 MB back

    async def upload(request: web.Request) -> web.Response:
        data = await request.read()
        seen["te"] = request.headers.get("Transfer-Encoding")
        seen["cl"] = request.headers.get("Content-Length")
        seen["host"] = request.headers.get("Host")
        seen["size"] = len(data)
        return web.Response(body=big)

    class Stream:
        def __init__(self, parts: list[bytes]) -> None:
            self.parts = parts

        async def iter_any(self) -> AsyncIterator[bytes]:
            for part in self.parts:
                await asyncio.sleep(0)
                yield part

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/v2/upload", upload)
    async with serving(app) as port:
        url = URL(f"http://127.0.0.1:{port}/v2/upload")
        p = pool()
        parts = [b"x" * 65536] * 80  # 5 MB up
        resp = await p.request("POST", url, H, Stream(parts))  # no Content-Length: chunked
        got = b"".join([chunk async for chunk in resp.content.iter_any()])
        resp.release()
        assert got == big and seen == {
            "te": "chunked",
            "cl": None,
            "host": f"127.0.0.1:{port}",
            "size": 5242880,
        }
        sized = CIMultiDict(H, **{"Content-Length": str(5242880)})
        resp = await p.request("POST", url, sized, Stream(parts))
        assert len(await resp.read()) == len(big) and seen["cl"] == "5242880" and seen["te"] is None
        resp.release()
        resp = await p.request("POST", url, H, b'{"a": 1}')
        await resp.read()
        resp.release()
        assert seen["cl"] == "8" and seen["size"] == 8
        await p.close()


async def test_a_stray_answer_on_an_idle_connection_never_reaches_the_next_request() -> None:
    sent: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sent.append(1)
        if len(sent) > 1:  # a second connection: a plain answer
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await asyncio.sleep(0.1)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 5\r\n\r\nstale")  # then silence
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")  # (were the connection reused: answered stale)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    p = pool()
    resp = await p.request("GET", url, H, None)
    assert await resp.read() == b"ok"
    resp.release()
    await asyncio.sleep(0.3)  # the stray 408 arrives while the connection is idle
    resp = await p.request("GET", url, H, None)
    assert resp.status == 200 and await resp.read() == b"second"  # a fresh connection
    resp.release()
    assert len(sent) == 2
    await p.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.6)  # the second connection's handler closes its side


async def test_an_early_answer_to_an_upload_is_the_answer() -> None:
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 23\r\n\r\n{"error": "bad key!!!"}')
        await writer.drain()
        await done.wait()  # reads nothing more meanwhile: the upload stalls
        writer.close()
        await writer.wait_closed()

    class Endless:
        async def iter_any(self) -> AsyncIterator[bytes]:
            while True:
                await asyncio.sleep(0)
                yield b"x" * 65536

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2/upload")
    p = pool(read=5)
    resp = await asyncio.wait_for(p.request("POST", url, H, Endless()), 3)
    assert resp.status == 401 and b"bad key" in await resp.read()
    resp.release()  # not reused: its body was never finished
    assert not p._idle.get(("http", "127.0.0.1", url.port, ""))
    done.set()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.05)


async def test_a_large_answer_released_unread_does_not_leave_a_paused_connection_pooled() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"z" * 2_000_000
    async with raw_server(lambda head: big) as (url, connections):
        p = pool(read=2)
        resp = await p.request("GET", url, H, None)
        await asyncio.sleep(0.2)  # more than a MiB arrives, unread: reading pauses
        resp.release()
        resp = await p.request("GET", url, H, None)
        assert len(await resp.read()) == 2_000_000
        resp.release()
        assert len(connections) == 2
        await p.close()


def test_request_heads_refuse_control_characters_and_name_the_host_properly() -> None:
    from gateway.proxy.http1 import InvalidHead, _request_head

    head, _, _ = _request_head("GET", URL("http://[::1]:8080/a?b=1"), CIMultiDict(H), None)
    assert b"GET /a?b=1 HTTP/1.1\r\nHost: [::1]:8080\r\n" in head
    head, _, _ = _request_head("POST", URL("https://bücher.de/x"), CIMultiDict(H), None)
    assert b"Host: xn--bcher-kva.de\r\n" in head and b"Content-Length: 0\r\n" in head
    with pytest.raises(InvalidHead):
        _request_head("GET", URL("http://h/x"), CIMultiDict({"X-A": "a\x00b"}), None)


async def test_https_with_the_servers_certificate_checked(tmp_path: Path) -> None:
    server_tls, trusting = self_signed_tls(tmp_path)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"host": request.headers["Host"]})

    app = web.Application()
    app.router.add_get("/v2/x", hello)
    async with serving(app, tls=server_tls) as port:
        url = URL(f"https://localhost:{port}/v2/x")
        p = Pool(connect_timeout_s=5, read_timeout_s=5, tls=trusting)
        used = []
        for _ in range(3):  # kept alive: the quiet check passes over TLS too (session tickets read)
            resp = await p.request("GET", url, H, None)
            assert resp.status == 200 and b'"host": "localhost:' in await resp.read()
            used.append(resp._conn)
            resp.release()
            await asyncio.sleep(0.05)
        assert used[0] is not None and all(conn is used[0] for conn in used)
        await p.close()
        with pytest.raises(NeverLeft):  # the system's CAs do not know this certificate
            await pool().request("GET", url, H, None)


def test_answers_that_are_not_strict_http_are_refused() -> None:
    from gateway.proxy.http1 import _Conn

    def parse(raw: bytes) -> _Conn:
        conn = _Conn(("http", "h", 80, ""))
        conn.reset(head_only=False)
        conn.data_received(raw)
        return conn

    for bad in (
        b"HTTP/1.1 2_00 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n",
    ):
        assert parse(bad).error is not None, bad
    body = b"2\r\nab\r\n0\r\n\r\n"
    ok = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert ok.error is None and ok.eof and ok.take() == b"ab" and ok.keep_alive
    # Framing that two readers could read two ways is refused outright (it used to be read,
    # then the connection dropped): a coding before chunked, chunked with a Content-Length.
    codings = b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
    assert parse(b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n" + body).error is not None
    both = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n" + body)
    assert both.error is not None and not both.reusable()


def test_a_retry_after_that_is_neither_seconds_nor_a_date_is_ignored() -> None:
    from gateway.proxy.handler import upstream_retry_delay

    assert upstream_retry_delay({"Retry-After": "soon"}, default=1.5) == 1.5
    assert upstream_retry_delay({"Retry-After": "2"}) == 2.0
