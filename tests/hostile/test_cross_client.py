"""Several clients on different keys at once, one of them an attacker, in front of an upstream
that misbehaves when the attacker asks it to: nobody ever receives bytes meant for another
key, and upstream receives nothing the gateway did not admit.

The upstream tags every answer with the ``Authorization`` it was made for, so a victim that
reads any other tag has received bytes meant for someone else. The attacker's tricks cover
both ends: request smuggling through a compressed body, pipelining and CL/TE games from a raw
socket, dot segments; and, upstream, stray bytes after an answer, a short Content-Length
followed by a forged answer, duplicate framing headers, folded headers and resets mid-body.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httptools
import pytest

from tests.helpers import gateway_config, metric, running_gateway

VICTIMS = ("victim-key-1", "victim-key-2", "victim-key-3")
ATTACKER = "attacker-key"
EVIL = ("stray", "shortcl", "dupcl", "fold", "reset", "interim")


@dataclass
class Seen:
    method: str
    path: str
    auth: str
    body: int


@dataclass
class TaggingUpstream:
    """A raw HTTP/1.1 upstream: answers ``{"tag": <Authorization>, "n": ...}``; ``?evil=...``
    makes it misbehave on that connection after (or instead of) a proper answer."""

    seen: list[Seen] = field(default_factory=list)
    bad_requests: int = 0
    n: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[str, str, dict[str, str], int]] = asyncio.Queue()
        state: dict[str, Any] = {}

        class P:
            def on_message_begin(self) -> None:
                state.update(url=b"", headers={}, body=0)

            def on_url(self, url: bytes) -> None:
                state["url"] += url

            def on_header(self, name: bytes, value: bytes) -> None:
                state["headers"][name.decode("latin-1").lower()] = value.decode("latin-1")

            def on_body(self, body: bytes) -> None:
                state["body"] += len(body)

            def on_message_complete(self) -> None:
                queue.put_nowait(
                    (
                        parser.get_method().decode(),
                        state["url"].decode("latin-1"),
                        state["headers"],
                        state["body"],
                    )
                )

        parser = httptools.HttpRequestParser(P())

        async def feed() -> None:
            try:
                while data := await reader.read(65536):
                    parser.feed_data(data)
            except httptools.HttpParserError:
                self.bad_requests += 1
            except (ConnectionError, httptools.HttpParserUpgrade):
                pass
            queue.put_nowait(("", "", {}, -1))

        feeder = asyncio.create_task(feed())
        try:
            while True:
                method, url, headers, body = await queue.get()
                if body < 0:
                    return
                auth = headers.get("authorization", "")
                self.seen.append(Seen(method, url.split("?")[0], auth, body))
                self.n += 1
                evil = url.split("evil=")[1].split("&")[0] if "evil=" in url else ""
                if not await self._answer(writer, auth, evil):
                    return
        except (asyncio.CancelledError, ConnectionError):
            return  # the test is over, or the gateway hung up
        finally:
            feeder.cancel()
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, auth: str, evil: str) -> bool:
        body = json.dumps({"tag": auth, "n": self.n}).encode()
        forged = json.dumps({"tag": auth, "forged": True}).encode()
        forged_answer = (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/json\r\n\r\n%b"
            % (
                len(forged),
                forged,
            )
        )
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if evil == "stray":
            writer.write(head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
            await asyncio.sleep(0.12)
            writer.write(forged_answer)
        elif evil == "shortcl":
            writer.write(head + b"Content-Length: %d\r\n\r\n%b" % (len(body) - 5, body) + forged_answer)
        elif evil == "dupcl":
            writer.write(head + b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n%b" % (len(body), body))
            writer.write(forged_answer)
        elif evil == "fold":
            writer.write(
                head + b"X-A: a\r\n Content-Length: 5\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            writer.write(forged_answer)
        elif evil == "reset":
            writer.write(head + b"Content-Length: %d\r\n\r\n%b" % (len(body) + 100, body))
            await writer.drain()
            writer.transport.abort()
            return False
        elif evil == "interim":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" * 5)
            writer.write(head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        else:
            writer.write(head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        return True


async def _raw(port: int, data: bytes, *, read_for: float = 1.0) -> bytes:
    """Send raw bytes to the gateway; everything it answers within ``read_for`` seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


def _smuggling_upload() -> bytes:
    """A gzip body whose INFLATED tail is a second request made with the attacker's key."""
    tail = (
        b"POST /v2/transcript HTTP/1.1\r\nHost: x\r\nAuthorization: attacker-key\r\n"
        b'Content-Length: 28\r\nContent-Type: application/json\r\n\r\n{"audio_url": "https://a/b"}'
    )
    return gzip.compress(b"x" * 64 + b"\r\n\r\n" + tail)


async def _attacker(url: str, port: int, until: float, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    headers = {"Authorization": ATTACKER}
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        while loop.time() < until:
            trick = rng.randrange(6)
            try:
                if trick == 0:
                    evil = rng.choice(EVIL)
                    async with http.get(
                        f"{url}/v2/transcript/u-{rng.randrange(99)}?evil={evil}", headers=headers
                    ) as r:
                        await r.read()
                elif trick == 1:
                    body = _smuggling_upload()
                    async with http.post(
                        url + "/v2/upload", data=body, headers={**headers, "Content-Encoding": "gzip"}
                    ) as r:
                        await r.read()
                elif trick == 2:  # pipelined requests on one raw connection, the second smuggled by TE
                    await _raw(
                        port,
                        b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: attacker-key\r\n"
                        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                        b"GET /v2/transcript/smuggled HTTP/1.1\r\nHost: g\r\n"
                        b"Authorization: attacker-key\r\n\r\n",
                        read_for=0.3,
                    )
                elif trick == 3:  # dot segments aiming at another route
                    await _raw(
                        port,
                        b"GET /v2/x/../../v2/transcript/%2e%2e/dots HTTP/1.1\r\nHost: g\r\n"
                        b"Authorization: attacker-key\r\nConnection: close\r\n\r\n",
                        read_for=0.3,
                    )
                elif trick == 4:  # a body shorter than declared, then the connection dropped
                    await _raw(
                        port,
                        b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: attacker-key\r\n"
                        b"Content-Length: 100\r\n\r\nonly-a-little",
                        read_for=0.05,
                    )
                else:  # absolute-form target
                    await _raw(
                        port,
                        b"GET http://elsewhere/v2/transcript/abs HTTP/1.1\r\nHost: g\r\n"
                        b"Authorization: attacker-key\r\nConnection: close\r\n\r\n",
                        read_for=0.3,
                    )
            except (aiohttp.ClientError, ConnectionError):
                pass


async def _victim(url: str, key: str, until: float, results: Counter[str]) -> None:
    loop = asyncio.get_running_loop()
    headers = {"Authorization": key}
    async with aiohttp.ClientSession() as http:
        i = 0
        while loop.time() < until:
            i += 1
            if i % 3:
                req = http.get(f"{url}/v2/transcript/v-{i}", headers=headers)
            else:
                req = http.post(f"{url}/v2/upload", data=b"audio" * 100, headers=headers)
            async with req as r:
                body = await r.read()
            assert r.status == 200, (r.status, body[:200])
            doc = json.loads(body)
            assert doc.get("tag") == key, f"{key} received an answer meant for {doc.get('tag')!r}: {doc}"
            assert "forged" not in doc, doc
            results[key] += 1


@pytest.mark.slow
async def test_no_client_reads_another_clients_answer() -> None:
    upstream = TaggingUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    up_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    config = gateway_config(up_url, limits={"requests": {"limit": 100_000, "window_s": 60}})
    rng = random.Random(8)
    try:
        async with running_gateway(config) as (url, app, registry):
            port = int(url.rsplit(":", 1)[1])
            until = asyncio.get_running_loop().time() + 4.0
            results: Counter[str] = Counter()
            await asyncio.gather(
                *(_victim(url, key, until, results) for key in VICTIMS),
                _attacker(url, port, until, rng),
                _attacker(url, port, until, random.Random(9)),
            )
            assert all(results[key] > 20 for key in VICTIMS), results
            admitted = metric(registry, "aai_gateway_admissions_total", limit="requests")
    finally:
        server.close()
        await server.wait_closed()
    # Upstream got nothing the gateway did not admit, and nothing smuggled.
    assert len(upstream.seen) <= admitted, (len(upstream.seen), admitted)
    assert upstream.bad_requests == 0
    paths = Counter((s.method, s.path) for s in upstream.seen)
    assert not [p for p in paths if p[0] == "POST" and p[1] == "/v2/transcript"], paths
    assert ("GET", "/v2/transcript/smuggled") not in paths, paths
    assert all(".." not in s.path and "%2e" not in s.path.lower() for s in upstream.seen), paths
    assert {s.auth for s in upstream.seen} <= {*VICTIMS, ATTACKER}


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v2/x HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"G@T /v2/x HTTP/1.1\r\nHost: g\r\n\r\n",
        b"GET /v2/x HTTP/1.1\r\nHost: g\r\nAuthorization secret-key-123\r\n\r\n",
        b"GET /v2/x HTTP/1.1\r\nHost: g\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /v2/x HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nExpect: nonsense\r\nAuthorization: k\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nabc",
    ],
)
async def test_requests_aiohttp_cannot_parse_get_json_errors(raw: bytes) -> None:
    """aiohttp answers these itself, before any middleware (an unknown Expect, too): still
    AssemblyAI's shape, and nothing reaches upstream."""
    upstream = TaggingUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    config = gateway_config(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        async with running_gateway(config) as (url, _, _):
            answer = await _raw(int(url.rsplit(":", 1)[1]), raw, read_for=2.0)
    finally:
        server.close()
        await server.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1][:1] == b"4", answer[:300]
    assert b"application/json" in head, answer[:300]
    doc = json.loads(body)
    assert set(doc) == {"error"} and isinstance(doc["error"], str)
    assert b"secret-key-123" not in answer
    assert upstream.seen == []
