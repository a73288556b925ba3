"""The hostile client against the request side: compressed and mis-sized bodies, CL/TE games,
pipelining, slow bodies and path tricks, with clients on different keys at once.

The upstream here is a raw HTTP/1.1 server (llhttp through httptools) that records exactly what
it received and tags every answer with the ``Authorization`` it was made for, so a client that
reads another tag received bytes meant for someone else; its request count is compared with
the gateway's admissions (every request here takes a token from the account window).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httptools
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from gateway.products import llm
from gateway.products.catalog import Catalog
from tests.helpers import gateway_config, metric, running_gateway

ALICE, MALLORY = "alice-key", "mallory-key"


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    conn: int = 0  # the gateway's port for the upstream connection it came on

    @property
    def auth(self) -> str:
        return self.headers.get("authorization", "")


@dataclass
class TagUpstream:
    """Records every complete request; answers ``{"tag": <Authorization>, "n", "target"}``."""

    seen: list[Seen] = field(default_factory=list)
    cut: int = 0  # requests whose body never completed (the gateway aborted the connection)
    bad: int = 0  # bytes llhttp could not parse as requests
    delay_s: float = 0.0  # before each answer
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        done: asyncio.Queue[Seen | None] = asyncio.Queue()
        cur: dict[str, Any] = {}

        class Events:
            def on_message_begin(self) -> None:
                cur.clear()
                cur.update(url=b"", headers={}, body=b"", open=True)

            def on_url(self, url: bytes) -> None:
                cur["url"] += url

            def on_header(self, name: bytes, value: bytes) -> None:
                cur["headers"][name.decode("latin-1").lower()] = value.decode("latin-1")

            def on_body(self, body: bytes) -> None:
                cur["body"] += body

            def on_message_complete(self) -> None:
                cur["open"] = False
                method = parser.get_method().decode()
                seen = Seen(method, cur["url"].decode("latin-1"), cur["headers"], cur["body"], port)
                done.put_nowait(seen)

        parser = httptools.HttpRequestParser(Events())
        port = writer.get_extra_info("peername")[1]

        async def feed() -> None:
            try:
                while data := await reader.read(65536):
                    parser.feed_data(data)
            except httptools.HttpParserError:
                self.bad += 1
            except ConnectionError:
                pass
            if cur.get("open"):
                self.cut += 1
            done.put_nowait(None)

        feeder = asyncio.create_task(feed())
        try:
            while (seen := await done.get()) is not None:
                self.seen.append(seen)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                doc: dict[str, Any] = {"tag": seen.auth, "n": len(self.seen), "target": seen.target}
                if seen.method == "POST" and seen.target == "/v2/transcript":
                    doc.update(id=f"up-{len(self.seen)}", status="queued")
                body = json.dumps(doc).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body)
                )
                await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            writer.close()


@dataclass
class Rig:
    upstream: TagUpstream
    url: str
    port: int
    registry: CollectorRegistry

    @property
    def admitted(self) -> float:
        return metric(self.registry, "aai_gateway_admissions_total", limit="requests")


@asynccontextmanager
async def rig(**overrides: Any) -> AsyncIterator[Rig]:
    """A gateway in front of a TagUpstream."""
    upstream = TagUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    up_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    overrides.setdefault("limits", {"requests": {"limit": 100_000, "window_s": 60}})
    try:
        async with running_gateway(gateway_config(up_url, **overrides)) as (url, _, registry):
            yield Rig(upstream, url, int(url.rsplit(":", 1)[1]), registry)
    finally:
        server.close()
        for task in list(upstream.tasks):
            task.cancel()
        await asyncio.gather(*upstream.tasks, return_exceptions=True)
        await server.wait_closed()


async def raw(
    port: int, data: bytes, *, read_for: float = 2.0, then: list[bytes] | None = None, answers: int = 0
) -> bytes:
    """Send raw bytes (and ``then`` pieces, 0.2 s apart); everything answered until the
    gateway closes the connection, ``answers`` responses arrived, or ``read_for`` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""

    async def trickle() -> None:
        for piece in then or ():
            await asyncio.sleep(0.2)
            writer.write(piece)

    sender = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                out += chunk
                if answers and len(responses(out)) >= answers:
                    break
    except (TimeoutError, ConnectionError):
        pass
    finally:
        sender.cancel()
        writer.close()
    return out


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP/1.1 responses in ``data`` (status, headers, body), in order."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    cur: dict[str, Any] = {}

    class Events:
        def on_message_begin(self) -> None:
            cur.update(headers={}, body=b"")

        def on_header(self, name: bytes, value: bytes) -> None:
            cur["headers"][name.decode().lower()] = value.decode()

        def on_body(self, body: bytes) -> None:
            cur["body"] += body

        def on_message_complete(self) -> None:
            out.append((parser.get_status_code(), cur["headers"], cur["body"]))

    parser = httptools.HttpResponseParser(Events())
    try:
        parser.feed_data(data)
    except httptools.HttpParserError:
        pass
    return out


def request(method: str, target: str, *, key: str = MALLORY, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw", f"Authorization: {key}"]
    headers.setdefault("Connection", "close")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body and "Content-Length" not in headers and "Transfer-Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


SMUGGLED = (
    b"POST /v2/transcript HTTP/1.1\r\nHost: x\r\nAuthorization: mallory-key\r\n"
    b'Content-Length: 28\r\nContent-Type: application/json\r\n\r\n{"audio_url": "https://a/b"}'
    b"GET /v2/transcript/smuggled HTTP/1.1\r\nHost: x\r\nAuthorization: mallory-key\r\n\r\n"
)


def smuggling_gzip() -> bytes:
    """A gzip body whose INFLATED tail is more requests, made with Mallory's key."""
    return gzip.compress(b"x" * 64 + b"\r\n\r\n" + SMUGGLED)


async def alice_polls(url: str, times: int) -> list[dict[str, Any]]:
    out = []
    async with aiohttp.ClientSession() as http:
        for i in range(times):
            async with http.get(f"{url}/v2/transcript/a-{i}", headers={"Authorization": ALICE}) as r:
                assert r.status == 200
                out.append(await r.json())
    return out


# -- request smuggling through request-body decompression -----------------------------------
async def test_gzip_upload_goes_upstream_as_sent_and_smuggles_nothing() -> None:
    async with rig() as g:
        body = smuggling_gzip()
        g.upstream.delay_s = 0.05  # the two clients overlap on the upstream pool
        mallory = [
            raw(g.port, request("POST", "/v2/upload", body=body, Content_Encoding="gzip")) for _ in range(3)
        ]
        answers, *mallorys = await asyncio.gather(alice_polls(g.url, 10), *mallory)
        for got in mallorys:
            [(status, _, payload)] = responses(got)
            assert status == 200 and json.loads(payload)["tag"] == MALLORY
        assert [a["tag"] for a in answers] == [ALICE] * 10  # only her own answers
        uploads = [s for s in g.upstream.seen if s.target == "/v2/upload"]
        assert len(uploads) == 3
        for s in uploads:  # exactly the bytes sent, still labelled as gzip
            assert s.body == body and s.headers["content-encoding"] == "gzip"
            assert s.headers["content-length"] == str(len(body))
        expected = ["/v2/upload"] * 3 + [f"/v2/transcript/a-{i}" for i in range(10)]
        assert sorted(s.target for s in g.upstream.seen) == sorted(expected)
        assert len(g.upstream.seen) == g.admitted == 13 and g.upstream.bad == 0


async def test_held_chat_body_compressed_is_read_and_forwarded_as_received() -> None:
    async with rig() as g, aiohttp.ClientSession() as http:
        doc = json.dumps({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}).encode()
        cases = [
            ("gzip", gzip.compress(doc), "application/json"),
            ("deflate", zlib.compress(doc), "application/json"),
            ("gzip", gzip.compress(doc), "application/x-www-form-urlencoded"),  # curl's default type
        ]
        for coding, body, ctype in cases:
            headers = {"Authorization": ALICE, "Content-Encoding": coding, "Content-Type": ctype}
            async with http.post(g.url + "/v1/chat/completions", data=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["tag"] == ALICE
            seen = g.upstream.seen[-1]
            assert seen.body == body and seen.headers["content-encoding"] == coding  # not inflated
        assert metric(g.registry, "aai_gateway_admissions_total", limit="llm:gpt-5") == 3  # model read


async def test_bodies_the_gateway_cannot_read_are_refused_and_cost_nothing() -> None:
    cap = 64 * 1024
    async with rig(proxy={"max_json_body_bytes": cap}) as g, aiohttp.ClientSession() as http:
        bomb = gzip.compress(b'{"model": "gpt-5", "x": "' + b"0" * (50 * cap) + b'"}')
        assert len(bomb) < cap  # small on the wire; 50x the cap inflated
        cases = [
            ("gzip", bomb, 413, "larger"),
            ("br", b"\x0b\x02\x80{}\x03", 415, "Content-Encoding"),
            ("zstd", b"(\xb5/\xfd", 415, "Content-Encoding"),
            ("gzip", gzip.compress(b'{"model": "gpt-5"}')[:-6], 400, "cut short"),
            ("gzip", b"not gzip at all", 400, "compressed"),
        ]
        for coding, body, status, text in cases:
            headers = {"Authorization": ALICE, "Content-Encoding": coding}
            async with http.post(g.url + "/v1/chat/completions", data=body, headers=headers) as r:
                payload = await r.json()
                assert r.status == status and set(payload) == {"error"} and text in payload["error"], payload
        assert g.upstream.seen == [] and g.admitted == 0


async def test_upstream_connections_are_never_shared_between_keys() -> None:
    async with rig() as g:
        await asyncio.gather(alice_polls(g.url, 20), *(alice_polls(g.url, 5) for _ in range(3)))
        async with aiohttp.ClientSession() as http:
            for i in range(20):
                headers = {"Authorization": MALLORY if i % 2 else "another-key"}
                async with http.get(f"{g.url}/v2/transcript/m-{i}", headers=headers) as r:
                    assert (await r.json())["tag"] == headers["Authorization"]
        keys_per_conn: dict[int, set[str]] = {}
        for s in g.upstream.seen:
            keys_per_conn.setdefault(s.conn, set()).add(s.auth)
        assert all(len(keys) == 1 for keys in keys_per_conn.values()), keys_per_conn
        assert len(keys_per_conn) < len(g.upstream.seen)  # connections were reused, within a key


# -- CL/TE games and pipelining from a raw client -------------------------------------------
FRAMING_GAMES = [
    # Content-Length and Transfer-Encoding together (the classic CL.TE / TE.CL desync)
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v2/transcript/smuggled HTTP/1.1\r\nHost: g\r\n"
    b"Authorization: mallory-key\r\n\r\n",
    # two different Content-Lengths
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\nContent-Length: 3\r\n"
    b"Content-Length: 40\r\n\r\nabcGET /v2/transcript/smuggled HTTP/1.1\r\nHost: g\r\n\r\n",
    # an obfuscated Transfer-Encoding
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\n"
    b"Transfer-Encoding: xchunked\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    # a folded header hiding a Content-Length
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\nX-A: a\r\n"
    b" Content-Length: 40\r\nContent-Length: 3\r\n\r\nabc",
    # a bad chunk size, then a smuggled request
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\nGET /v2/transcript/smuggled HTTP/1.1\r\n\r\n",
    # a chunk longer than its size line
    b"POST /v2/upload HTTP/1.1\r\nHost: g\r\nAuthorization: mallory-key\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdefGET /v2/transcript/smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
    # a compressed upload, the inflated tail a request (over a raw socket this time)
    request("POST", "/v2/upload", body=smuggling_gzip(), Content_Encoding="gzip"),
]


async def test_framing_games_never_reach_upstream_as_extra_requests() -> None:
    async with rig() as g:
        for i, game in enumerate(FRAMING_GAMES):
            before = len(g.upstream.seen)
            alice = asyncio.ensure_future(alice_polls(g.url, 2))
            got = await raw(g.port, game, read_for=1.0)
            assert [a["tag"] for a in await alice] == [ALICE, ALICE]
            for status, headers, payload in responses(got):
                assert status < 500, (i, got[:300])
                if status >= 400 and headers.get("content-type", "").startswith("application/json"):
                    assert set(json.loads(payload)) == {"error"}
                elif status >= 400:  # aiohttp's own parser refused the bytes: it then hangs up
                    assert status == 400 and got.endswith(payload), (i, got[:300])
                else:
                    assert json.loads(payload)["tag"] == MALLORY
            new = g.upstream.seen[before:]
            assert [s for s in new if s.auth != ALICE] == [s for s in new if s.target == "/v2/upload"], i
            assert len([s for s in new if s.auth != ALICE]) <= 1, (i, new)
            assert not [s for s in g.upstream.seen if "smuggled" in s.target or s.target == "/v2/transcript"]
        assert len(g.upstream.seen) == g.admitted and g.upstream.bad == 0


async def test_pipelined_requests_are_each_admitted_and_answered_in_order() -> None:
    async with rig() as g:
        upload = smuggling_gzip()
        pipeline = request(
            "POST", "/v2/upload", body=upload, Content_Encoding="gzip", Connection="keep-alive"
        )
        pipeline += b"".join(
            request("GET", f"/v2/transcript/p-{i}", Connection="close" if i == 2 else "keep-alive")
            for i in range(3)
        )
        got = responses(await raw(g.port, pipeline))
        targets = ["/v2/upload", *(f"/v2/transcript/p-{i}" for i in range(3))]
        assert [json.loads(b)["target"] for _, _, b in got] == targets
        assert [s.target for s in g.upstream.seen] == targets and g.upstream.seen[0].body == upload
        assert len(g.upstream.seen) == g.admitted == 4


# -- bodies that do not arrive ----------------------------------------------------------------
async def test_trickled_chunked_upload_is_cut_within_the_bound() -> None:
    proxy = {"client_body_timeout_s": 0.4, "client_body_min_rate": 500}
    async with rig(proxy=proxy) as g:
        head = request("POST", "/v2/upload", Transfer_Encoding="chunked")
        started = time.monotonic()
        got = await raw(g.port, head + b"1\r\na\r\n", then=[b"1\r\nb\r\n"] * 20, read_for=3.0, answers=1)
        took = time.monotonic() - started
        [(status, _, payload)] = responses(got)
        assert status == 408 and set(json.loads(payload)) == {"error"}
        assert took < 1.5  # 0.4 s plus 1 s per 500 bytes, and a little slack; never the 4 s trickle
        await asyncio.sleep(0.1)
        assert g.upstream.seen == [] and g.upstream.cut == 1  # upstream's exchange was aborted
        assert g.admitted == 1  # its head had reached upstream: the token is not given back


async def test_trickled_held_body_is_a_408_and_costs_nothing() -> None:
    proxy = {"client_body_timeout_s": 0.4, "client_body_min_rate": 500}
    async with rig(proxy=proxy) as g:
        doc = b'{"model": "gpt-5", "messages": []}'
        head = request("POST", "/v1/chat/completions", Content_Length=str(len(doc)))
        got = await raw(g.port, head + doc[:5], then=[doc[i : i + 1] for i in range(5, len(doc))], answers=1)
        [(status, _, payload)] = responses(got)
        assert status == 408 and "did not arrive in time" in json.loads(payload)["error"]
        assert g.upstream.seen == [] and g.admitted == 0


async def test_body_short_of_its_content_length_aborts_the_upstream_exchange() -> None:
    async with rig() as g:
        await raw(g.port, request("POST", "/v2/upload", Content_Length="1000") + b"x" * 100, read_for=0.3)
        alice = await alice_polls(g.url, 3)  # the next exchanges on the pool are hers, whole
        assert [a["tag"] for a in alice] == [ALICE] * 3
        assert [s.auth for s in g.upstream.seen] == [ALICE] * 3 and g.upstream.cut == 1


# -- path tricks ---------------------------------------------------------------------------------
async def test_dot_segments_and_odd_paths_are_refused_before_routing() -> None:
    async with rig() as g:
        body = b'{"audio_url": "https://a/b"}'
        for target in [
            "/v2/x/../../v2/transcript",
            "/v2/x/%2e%2e/transcript",
            "/v2/x/%2E./transcript",
            "/v2/./transcript",
            "/v2//transcript",
            "/v2/transcript%2Fabc",
            "/v2/transcript%5cabc",
            "/v2/transcript/%00",
            "/v1/x/%2e%2e/chat/completions",
            "http://evil.example/v2/x/../transcript",
        ]:
            got = responses(
                await raw(g.port, request("POST", target, body=body, Content_Type="application/json"))
            )
            [(status, _, payload)] = got
            assert status == 400 and "path is not allowed" in json.loads(payload)["error"], target
        assert g.upstream.seen == [] and g.admitted == 0


async def test_a_path_read_leniently_elsewhere_never_skips_its_route() -> None:
    async with rig() as g:
        body = b'{"audio_url": "https://a/b"}'
        for method, target in [
            ("POST", "/v2/transcript/"),
            ("POST", "/v2/transcript;x=1"),
            ("GET", "/v2/transcript/"),
            ("POST", "/v1/chat/completions/"),  # same route: served, not refused
            ("GET", "/v2/transcript/abc/"),
            ("GET", "/v2/upload/"),  # same route: served
            ("GET", "/v1/models;v=1"),  # same route: served
        ]:
            sent = request(method, target, body=body if method == "POST" else b"")
            [(status, _, payload)] = responses(await raw(g.port, sent))
            if target.startswith("/v2/transcript"):
                assert status == 400 and "names another route" in json.loads(payload)["error"], target
            else:
                assert status != 400 or "model" in json.loads(payload)["error"], (target, payload)
        assert [s.target for s in g.upstream.seen] == ["/v2/upload/", "/v1/models;v=1"]


async def test_absolute_form_targets_are_routed_and_forwarded_by_their_path() -> None:
    async with rig() as g:
        got = responses(await raw(g.port, request("GET", "http://evil.example/v2/transcript/abc?x=%41")))
        [(status, _, payload)] = got
        assert status == 200 and json.loads(payload)["target"] == "/v2/transcript/abc?x=%41"
        doc = b'{"model": "gpt-5"}'
        got = responses(
            await raw(g.port, request("POST", "https://evil.example/v1/chat/completions", body=doc))
        )
        assert [s for s, _, _ in got] == [200]
        assert metric(g.registry, "aai_gateway_admissions_total", limit="llm:gpt-5") == 1  # the chat route
        got = responses(await raw(g.port, request("GET", "ftp://evil.example/v2/transcript/abc")))
        assert [s for s, _, _ in got] == [400]
        assert [s.target for s in g.upstream.seen] == ["/v2/transcript/abc?x=%41", "/v1/chat/completions"]
        assert len(g.upstream.seen) == g.admitted


# -- rough edges ---------------------------------------------------------------------------------
async def test_models_list_waits_the_queue_max_wait_not_the_chat_one() -> None:
    cfg = gateway_config("http://127.0.0.1:9", queue={"max_wait_s": 7.0, "llm_max_wait_s": 2.0})
    catalog = Catalog(cfg.limits)
    models = await llm.plan(make_mocked_request("GET", "/v1/models"), cfg, catalog)
    assert models.max_wait_s == 7.0
