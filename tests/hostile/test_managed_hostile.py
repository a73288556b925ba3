"""The hostile client and the hostile upstream against managed mode (issue 11): gateway keys
in, the account's key out, and each project walled off from the others.

What every test here holds the gateway to, whatever it is sent or answered:

- no client key ever reaches upstream, and upstream hears the account key and nothing else
  (upstream's record is the raw header list, so a second ``Authorization`` would show);
- the account key appears in no answer a client reads;
- a refusal is JSON ``{"error": ...}`` with the status upstream would give (401 for a key
  that is not a gateway key, 400 for a request that cannot be read), and nothing behind a
  refusal reaches upstream;
- nothing a client or upstream sends makes the gateway answer 5xx or stop serving.

These tests found five bugs, each fixed in the commit after them: the first of two
``Authorization`` headers decided; a byte that is not UTF-8 in it was a 500; a session
opened with a key and a ``?token=`` that disagreed; an error answer's ``upload_url`` was
noted as an upload; and an upload answer the gateway did not read (compressed, large) was
noted for nobody, so open to every project.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.identity import presented_key
from gateway.sim.app import Sim, SimConfig, build_sim_app
from tests.helpers import gateway_config, running_gateway
from tests.test_managed import A1, A2, AUTH_ERROR, B1, UPSTREAM, projects

CLIENT_KEYS = (A1, A2, B1)
NOT_FOUND = {"error": "Transcript not found"}
UPLOAD_FORBIDDEN = {"error": "Cannot access uploaded file"}


@pytest.fixture(autouse=True)
def account_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    yield


# -- the rig ----------------------------------------------------------------------------------
@dataclass
class Heard:
    """One request as upstream received it: the raw header list, duplicates kept."""

    method: str
    target: str
    headers: list[tuple[bytes, bytes]]

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class Rig:
    url: str
    heard: list[Heard]
    sim: Sim | None = None

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 80)


def recording(heard: list[Heard]) -> Any:
    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        heard.append(Heard(request.method, request.raw_path, list(request.raw_headers)))
        return await handler(request)

    return record


@asynccontextmanager
async def managed(
    upstream: web.Application | None = None, *, sim: SimConfig | None = None, **overrides: Any
) -> AsyncIterator[Rig]:
    """A managed gateway (projects alpha: A1, A2; beta: B1) in front of the simulator, or of
    ``upstream``; every request upstream receives is recorded raw, before anything answers."""
    heard: list[Heard] = []
    the_sim = None
    if upstream is None:
        the_sim = Sim(sim or SimConfig(job_seconds=0.2))
        upstream = build_sim_app(the_sim)
    upstream.middlewares.insert(0, recording(heard))
    server = TestServer(upstream, host="127.0.0.1")
    await server.start_server()
    try:
        up = str(server.make_url("")).rstrip("/")
        async with running_gateway(gateway_config(up, projects=projects(), **overrides)) as (url, _, _):
            yield Rig(url, heard, the_sim)
    finally:
        await server.close()


def assert_nothing_leaked(rig: Rig, *answers: bytes, tokens_ok: bool = False) -> None:
    """No answer carries the account key; upstream heard no client key anywhere (target or
    headers), and at most one Authorization each time: the account key (or, ``tokens_ok``,
    a streaming session's temporary token, which goes upstream as it came)."""
    for answer in answers:
        assert UPSTREAM.encode() not in answer, answer[:300]
    for seen in rig.heard:
        blob = seen.target.encode() + b"".join(k + b": " + v for k, v in seen.headers)
        for key in CLIENT_KEYS:
            assert key.encode() not in blob, (seen.method, seen.target)
        auths = seen.all(b"authorization")
        assert len(auths) <= 1, (seen.target, len(auths))
        if auths and not tokens_ok:
            assert auths == [UPSTREAM.encode()], seen.target


# -- raw HTTP/1.1 -------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = field(repr=False, default=b"")

    def json(self) -> Any:
        return json.loads(self.body)

    def assert_error(self, *statuses: int) -> None:
        """A refusal in AssemblyAI's shape, with one of ``statuses``."""
        assert self.status in statuses, (self.status, self.body[:300])
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc = self.json()
        assert isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str), doc


def http_request(
    auths: list[bytes], *, method: bytes = b"GET", target: bytes = b"/v2/transcript?limit=1", **extra: bytes
) -> bytes:
    """A request as bytes: each of ``auths`` as an ``Authorization`` line, as given (any bytes);
    ``extra``: more header lines (``name=value``; underscores become dashes)."""
    lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: gw.test", b"Connection: close"]
    lines += [b"%s: %s" % (k.replace("_", "-").encode(), v) for k, v in extra.items()]
    lines += [b"Authorization: " + a for a in auths]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def exchange(rig: Rig, data: bytes, *, within: float = 10.0) -> Answer:
    """Send ``data`` on a new connection; read one answer, framed by its Content-Length or
    chunks (a 101: its head only). The connection is closed afterwards."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_answer(reader), within)
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if status == 101:
        pass
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.read()
    return Answer(status, headers, body, head + body)


async def call(rig: Rig, key: str | bytes, method: str, target: str, body: Any = None) -> Answer:
    """One request with one Authorization (a JSON body when ``body`` is given)."""
    auth = key.encode() if isinstance(key, str) else key
    extra: dict[str, bytes] = {}
    payload = b""
    if body is not None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        extra = {"Content_Type": b"application/json", "Content_Length": str(len(payload)).encode()}
        if isinstance(body, bytes):
            extra["Content_Type"] = b"application/octet-stream"
    data = http_request([auth], method=method.encode(), target=target.encode(), **extra) + payload
    return await exchange(rig, data)


# -- 1. the raw client: Authorization games ---------------------------------------------------
@pytest.mark.parametrize(
    "auths",
    [
        pytest.param([A1, "not-a-gateway-key"], id="valid-then-invalid"),
        pytest.param(["not-a-gateway-key", A1], id="invalid-then-valid"),
        pytest.param([A1, B1], id="alpha-then-beta"),
        pytest.param([B1, A1], id="beta-then-alpha"),
        pytest.param([A1, UPSTREAM], id="valid-then-the-account-key"),
    ],
)  # fmt: skip
async def test_two_authorization_headers_that_disagree_are_refused(auths: list[str]) -> None:
    """Two credentials that name different callers (or one that names none): the gateway
    cannot know which the client meant, and picking one lets a request ride on a key the
    client may not hold the rights of. Refused, before anything is sent."""
    async with managed() as rig:
        answer = await exchange(rig, http_request([a.encode() for a in auths]))
        answer.assert_error(400, 401)
        assert_nothing_leaked(rig, answer.raw)
        assert rig.heard == []


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("é".encode() + A1.encode(), id="utf8-before-the-key"),
        pytest.param(b"Bearer " + "ключ".encode(), id="utf8-bearer"),
        pytest.param(b"\xff\xfe" + A1.encode(), id="obs-text-before-the-key"),
        pytest.param(A1.encode() + b"\xe9", id="obs-text-after-the-key"),
        pytest.param(b"Bearer \x80\x81\xfe", id="obs-text-bearer"),
    ],
)  # fmt: skip
async def test_non_ascii_authorization_is_a_401(value: bytes) -> None:
    """Bytes above 0x7F (valid UTF-8, or obs-text that is not) are no gateway key: a 401 in
    upstream's words, the gateway still serving afterwards."""
    async with managed() as rig:
        answer = await exchange(rig, http_request([value]))
        assert answer.status == 401, (answer.status, answer.body[:300])
        assert answer.json() == AUTH_ERROR
        after = await call(rig, A1, "GET", "/v2/transcript?limit=1")
        assert after.status == 200, after.body[:300]
        assert_nothing_leaked(rig, answer.raw, after.raw)
        assert len(rig.heard) == 1


@pytest.mark.parametrize("prefix", [b"", b"Bearer ", b"Bearer " + A1.encode()])
async def test_an_authorization_over_the_field_limit_is_refused(prefix: bytes) -> None:
    """20 KB, over aiohttp's max_field_size (16384): refused by the parser (400 or 431) in
    JSON, nothing sent; just under the limit it is only a key that is not a gateway key."""
    async with managed() as rig:
        over = await exchange(rig, http_request([prefix + b"x" * 20_000]))
        over.assert_error(400, 431)
        under = await exchange(rig, http_request([prefix + b"x" * (16_000 - len(prefix))]))
        assert under.status == 401 and under.json() == AUTH_ERROR, under.body[:300]
        assert_nothing_leaked(rig, over.raw, under.raw)
        assert rig.heard == []


@pytest.mark.parametrize(
    "value",
    [
        b"", b" ", b"\t", b"Bearer", b"Bearer ", b"Bearer \t", b"bearer", b"Bearer Bearer " + A1.encode(),
        UPSTREAM.encode(), b"Bearer " + UPSTREAM.encode(), b"Basic " + UPSTREAM.encode(),
        A1.encode()[:-1], A1.encode() + b"x", A1.encode().upper(), b"Token " + A1.encode(),
        A1.encode() + b" " + B1.encode(), A1.encode() + b"," + B1.encode(), b"Bearer\t" + A1.encode(),
    ],
    ids=[
        "empty", "space", "tab", "bearer-alone", "bearer-space", "bearer-tab", "lower-bearer-alone",
        "bearer-bearer-key", "the-account-key", "bearer-the-account-key", "basic-the-account-key",
        "key-cut-short", "key-with-more", "key-upper-case", "other-scheme", "two-keys-space",
        "two-keys-comma", "bearer-tab-key",
    ],
)  # fmt: skip
async def test_anything_but_one_gateway_key_is_a_401_on_every_route(value: bytes) -> None:
    """Empty, a bare scheme, the account key itself (a client holding it must not use the
    gateway as if it were a project), near misses of a key, two keys in one value."""
    routes = [
        (b"GET", b"/v2/transcript?limit=1", b""),
        (b"POST", b"/v2/transcript", b'{"audio_url": "https://example.com/a.mp3"}'),
        (b"POST", b"/v2/upload", b"RIFF" + b"\0" * 64),
        (b"GET", b"/v3/token?expires_in_seconds=60", b""),
        (b"POST", b"/v1/chat/completions", b'{"model": "gpt-5", "messages": []}'),
    ]
    async with managed() as rig:
        for method, target, body in routes:
            data = http_request([value], method=method, target=target, Content_Length=b"%d" % len(body))
            answer = await exchange(rig, data + body)
            assert answer.status == 401, (method, target, answer.status, answer.body[:300])
            assert answer.json() == AUTH_ERROR
            assert_nothing_leaked(rig, answer.raw)
        assert rig.heard == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Authorization", A1.encode() + b" \t"), (b"Authorization", b"\t " + A1.encode()),
        (b"Authorization", b"bearer " + A1.encode()), (b"Authorization", b"BEARER " + A1.encode()),
        (b"Authorization", b"Bearer   " + A1.encode() + b"\t"), (b"authorization", A1.encode()),
        (b"AUTHORIZATION", b"Bearer " + B1.encode()), (b"aUtHoRiZaTiOn", A2.encode()),
    ],
    ids=["trailing-ws", "leading-ws", "lower-bearer", "upper-bearer", "bearer-spaces-tab",
         "lower-name", "upper-name", "mixed-name"],
)  # fmt: skip
async def test_a_gateway_key_in_any_legal_spelling_goes_upstream_as_the_account_key(
    name: bytes, value: bytes
) -> None:
    """Optional whitespace around the value and the case of the header name and of the
    scheme are not part of the key (RFC 9110): each spelling works, and upstream hears one
    Authorization, the account key's."""
    async with managed() as rig:
        data = http_request([]).replace(b"\r\n\r\n", b"\r\n%s: %s\r\n\r\n" % (name, value))
        answer = await exchange(rig, data)
        assert answer.status == 200, answer.body[:300]
        assert_nothing_leaked(rig, answer.raw)
        assert len(rig.heard) == 1 and rig.heard[0].all(b"authorization") == [UPSTREAM.encode()]


def ws_upgrade(auth: bytes | None, query: bytes) -> bytes:
    lines = [
        b"GET /v3/ws?sample_rate=16000&" + query + b" HTTP/1.1",
        b"Host: gw.test",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def temporary_token(rig: Rig, key: str) -> str:
    answer = await call(rig, key, "GET", "/v3/token?expires_in_seconds=60")
    assert answer.status == 200, answer.body[:300]
    return str(answer.json()["token"])


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("alpha-key+beta-token"),
        pytest.param("beta-token-header+alpha-token"),
        pytest.param("alpha-key+unknown-token"),
        pytest.param("bad-key+alpha-token"),
        pytest.param("the-account-key+alpha-token"),
    ],
)  # fmt: skip
async def test_a_session_with_both_token_and_authorization_that_disagree_is_refused(case: str) -> None:
    """``/v3/ws`` with ``?token=`` AND ``Authorization`` naming different callers: refused
    before the upgrade (400 or 401, JSON), nothing sent upstream, and the other project's
    one-use token still unspent (a session opened on it would spend it and bill the wrong
    project)."""
    async with managed() as rig:
        assert rig.sim is not None
        alpha, beta = await temporary_token(rig, A1), await temporary_token(rig, B1)
        auth, token = {
            "alpha-key+beta-token": (A1, beta),
            "beta-token-header+alpha-token": (beta, alpha),
            "alpha-key+unknown-token": (A1, "not-a-token"),
            "bad-key+alpha-token": ("not-a-gateway-key", alpha),
            "the-account-key+alpha-token": (UPSTREAM, alpha),
        }[case]
        before = len(rig.heard)
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        try:
            writer.write(ws_upgrade(auth.encode(), b"token=" + token.encode()))
            answer = await asyncio.wait_for(read_answer(reader), 10)
        finally:
            writer.close()
        answer.assert_error(400, 401)
        assert rig.heard[before:] == []
        assert {alpha, beta} <= set(rig.sim.streaming.tokens)  # neither token was spent
        assert_nothing_leaked(rig, answer.raw)


# -- 2. the hostile upstream: what POST /v2/upload answers -----------------------------------
CDN = "https://cdn.hostile.test/upload/"


@dataclass
class Bad:
    """One way to answer an upload: status, content type, body (and Content-Encoding);
    ``url``: the string another project might then present as ``audio_url``; ``owned``:
    whether the answer really gave an upload (2xx, ``upload_url`` a string), so that the
    gateway must keep it to the project that made it."""

    status: int
    content_type: str
    body: bytes
    url: str
    owned: bool = False
    gzip_if_asked: bool = False  # gzip the body when the request accepts it, as servers do
    chunked: bool = False
    # What the client gets instead of upstream's answer: a 2xx upload answer too large to read
    # is a 502 (passed on unread, its upload would be noted for nobody); it gave nobody a URL.
    refused: int | None = None


def _doc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


BAD_UPLOADS = {
    "url-a-number": Bad(200, "application/json", _doc({"upload_url": 12345}), "12345"),
    "url-null": Bad(200, "application/json", _doc({"upload_url": None}), "null"),
    "url-an-object": Bad(200, "application/json", _doc({"upload_url": {"href": CDN + "o"}}), CDN + "o"),
    "url-a-list": Bad(200, "application/json", _doc({"upload_url": [CDN + "l"]}), CDN + "l"),
    "url-missing": Bad(200, "application/json", _doc({"url": CDN + "m"}), CDN + "m"),
    "answer-a-list": Bad(200, "application/json", _doc([{"upload_url": CDN + "a"}]), CDN + "a"),
    "not-json": Bad(200, "text/plain", f"upload_url={CDN}t".encode(), CDN + "t"),
    "json-cut-short": Bad(200, "application/json", f'{{"upload_url": "{CDN}c"'.encode(), CDN + "c"),
    "html-500": Bad(500, "text/html", b"<html><body><h1>500 Internal Server Error</h1></body></html>", CDN),
    "json-500-with-a-url": Bad(500, "application/json", _doc({"error": "boom", "upload_url": CDN + "e"}),
                               CDN + "e"),
    "json-400-with-a-url": Bad(400, "application/json", _doc({"error": "bad", "upload_url": CDN + "f"}),
                               CDN + "f"),
    "url-huge": Bad(200, "application/json", _doc({"upload_url": CDN + "h" * 60_000}), CDN + "h" * 60_000,
                    owned=True),
    "url-chunked": Bad(200, "application/json", _doc({"upload_url": CDN + "k"}), CDN + "k", owned=True,
                       chunked=True),
    "url-gzipped": Bad(200, "application/json", _doc({"upload_url": CDN + "g"}), CDN + "g", owned=True,
                       gzip_if_asked=True),
    "url-in-a-5mb-answer": Bad(200, "application/json",
                               _doc({"upload_url": CDN + "b", "pad": "x" * 5_000_000}), CDN + "b",
                               refused=502),
}  # fmt: skip


def hostile_upload(bad: Bad) -> web.Application:
    """An upstream whose ``POST /v2/upload`` answers ``bad``; ``POST /v2/transcript``
    takes any ``audio_url`` (the gateway alone decides whose an upload is: upstream hears
    one account key), and a transcript is always queued."""

    async def upload(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Content-Type": bad.content_type}
        body = bad.body
        if bad.gzip_if_asked and "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            body = gzip.compress(body)
        if not bad.chunked:
            return web.Response(status=bad.status, body=body, headers=headers)
        resp = web.StreamResponse(status=bad.status, headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(body), 7):
            await resp.write(body[i : i + 7])
        await resp.write_eof()
        return resp

    async def create(request: web.Request) -> web.Response:
        doc = await request.json()
        return web.json_response({"id": f"t{len(doc['audio_url'])}", "status": "queued", **doc})

    async def get(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "status": "queued"})

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/v2/upload", upload)
    app.router.add_post("/v2/transcript", create)
    app.router.add_get("/v2/transcript/{id}", get)
    return app


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
async def test_a_malformed_upload_answer_is_passed_on_and_owns_nothing_it_should_not(name: str) -> None:
    """The client gets upstream's status and body (the gateway does not invent an upload; a
    2xx answer too large to read is a 502), the gateway keeps serving, and ownership follows
    what upstream really said: an answer that gave no upload (an error, or no ``upload_url``
    string) makes nothing the project's, so another project presenting that value is left to
    upstream; an answer that did give one (however it was framed or compressed) is the
    uploader's alone: another project is refused, 403 in upstream's words, nothing sent."""
    bad = BAD_UPLOADS[name]
    async with managed(hostile_upload(bad)) as rig:
        payload = b"RIFF" + b"\0" * 256
        data = http_request(
            [A1.encode()], method=b"POST", target=b"/v2/upload", Content_Type=b"application/octet-stream",
            Content_Length=b"%d" % len(payload), Accept_Encoding=b"gzip, deflate",
        )  # fmt: skip
        answer = await exchange(rig, data + payload)
        if bad.refused is not None:
            answer.assert_error(bad.refused)
        else:
            assert answer.status == bad.status, (answer.status, answer.body[:300])
        got = answer.body if bad.refused is None else bad.body
        if answer.headers.get("content-encoding") == "gzip":
            got = gzip.decompress(got)
        want = bad.body
        try:
            assert json.loads(got) == json.loads(want)
        except ValueError:
            assert got == want, got[:300]

        heard = len(rig.heard)
        other = await call(rig, B1, "POST", "/v2/transcript", {"audio_url": bad.url})
        if bad.owned:
            assert other.status == 403 and other.json() == UPLOAD_FORBIDDEN, (other.status, other.body[:300])
            assert len(rig.heard) == heard  # refused here, nothing sent
        else:
            assert other.status == 200, (other.status, other.body[:300])  # left to upstream
        own = await call(rig, A2, "POST", "/v2/transcript", {"audio_url": bad.url})
        assert own.status == 200, (own.status, own.body[:300])
        assert_nothing_leaked(rig, answer.raw, other.raw, own.raw)


# -- 3. two projects at once --------------------------------------------------------------------
async def test_two_projects_at_once_never_see_each_other() -> None:
    """Twenty clients of each project, all at once, upload, create, poll, list, delete and
    try each other's ids and uploads. Every cross access is upstream's own refusal (404
    ``Transcript not found``, 403 ``Cannot access uploaded file``) and sends nothing for an
    upload; every own access works; a list shows exactly the project's own."""
    n = 20
    keys = {"alpha": (A1, A2), "beta": (B1,)}
    async with managed(transcripts={"poll_refresh_s": 0.05}) as rig:

        async def make(project: str, i: int) -> tuple[str, str, str]:
            key = keys[project][i % len(keys[project])]
            up = await call(rig, key, "POST", "/v2/upload", b"RIFF" + bytes([i]) * 512)
            assert up.status == 200, up.body[:300]
            url = up.json()["upload_url"]
            made = await call(rig, key, "POST", "/v2/transcript", {"audio_url": url})
            assert made.status == 200, made.body[:300]
            return project, made.json()["id"], url

        made = await asyncio.gather(*(make(p, i) for i in range(n) for p in keys))
        ids = {p: [i for q, i, _ in made if q == p] for p in keys}
        urls = {p: [u for q, _, u in made if q == p] for p in keys}
        assert len(set(ids["alpha"] + ids["beta"])) == 2 * n

        async def cross(me: str, other: str, i: int) -> None:
            key = keys[me][i % len(keys[me])]
            theirs, mine = ids[other][i], ids[me][i]
            for target in (f"/v2/transcript/{theirs}", f"/v2/transcript/{theirs}/sentences"):
                answer = await call(rig, key, "GET", target)
                assert (answer.status, answer.json()) == (404, NOT_FOUND), (target, answer.body[:300])
            gone = await call(rig, key, "DELETE", f"/v2/transcript/{theirs}")
            assert (gone.status, gone.json()) == (404, NOT_FOUND), gone.body[:300]
            steal = await call(rig, key, "POST", "/v2/transcript", {"audio_url": urls[other][i]})
            assert (steal.status, steal.json()) == (403, UPLOAD_FORBIDDEN), steal.body[:300]
            own = await call(rig, key, "GET", f"/v2/transcript/{mine}")
            assert own.status == 200 and own.json()["id"] == mine, own.body[:300]
            listed = await call(rig, key, "GET", "/v2/transcript?limit=100")
            assert listed.status == 200, listed.body[:300]
            seen = {t["id"] for t in listed.json()["transcripts"]}
            assert seen <= set(ids[me]), seen - set(ids[me])

        await asyncio.gather(
            *(cross(me, other, i) for i in range(n) for me, other in (("alpha", "beta"), ("beta", "alpha")))
        )

        async def finish(project: str, i: int) -> None:
            key = keys[project][i % len(keys[project])]
            job = ids[project][i]
            for _ in range(200):
                answer = await call(rig, key, "GET", f"/v2/transcript/{job}")
                if answer.json()["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{job} never completed")
            other = next(k for p, ks in keys.items() if p != project for k in ks)
            stolen = await call(rig, other, "DELETE", f"/v2/transcript/{job}")
            assert (stolen.status, stolen.json()) == (404, NOT_FOUND), stolen.body[:300]
            gone = await call(rig, key, "DELETE", f"/v2/transcript/{job}")
            assert gone.status == 200, gone.body[:300]

        for project in keys:  # every list complete and exact once all are made and before any is deleted
            listed = await call(rig, keys[project][0], "GET", "/v2/transcript?limit=100")
            assert {t["id"] for t in listed.json()["transcripts"]} == set(ids[project])
        await asyncio.gather(*(finish(p, i) for i in range(n) for p in keys))
        posts = [h for h in rig.heard if h.target == "/v2/transcript" and h.method == "POST"]
        assert len(posts) == 2 * n  # the refused ones never went upstream
        assert_nothing_leaked(rig)
        assert rig.sim is not None and rig.sim.report()["violations"] == []


async def test_another_projects_transcript_named_by_its_upstream_id_is_not_found() -> None:
    """Clients see gateway ids only; a project that learnt the upstream id behind another
    project's (from a log, a webhook relay, a support ticket) presents it instead. Upstream
    would show it to anyone holding the account key, which every request here carries: the
    gateway must refuse it (404 in upstream's words), and send nothing."""
    async with managed(transcripts={"poll_refresh_s": 0.05}) as rig:
        assert rig.sim is not None
        made = await call(rig, A1, "POST", "/v2/transcript", {"audio_url": "https://example.com/a.mp3"})
        assert made.status == 200, made.body[:300]
        (upstream_id,) = rig.sim.transcripts.jobs
        assert upstream_id != made.json()["id"]
        answers = []
        before = len(rig.heard)
        for method, target, body in [
            ("GET", f"/v2/transcript/{upstream_id}", None),
            ("GET", f"/v2/transcript/{upstream_id}/sentences", None),
            (
                "POST",
                "/v1/chat/completions",
                {"model": "gpt-5", "messages": [], "transcript_id": upstream_id},
            ),
            ("DELETE", f"/v2/transcript/{upstream_id}", None),
        ]:
            answer = await call(rig, B1, method, target, body)
            answers.append(answer.raw)
            assert (answer.status, answer.json()) == (404, NOT_FOUND), (method, target, answer.body[:300])
        assert rig.heard[before:] == []
        assert upstream_id in rig.sim.transcripts.jobs  # not deleted
        assert_nothing_leaked(rig, *answers)


# -- 4. fuzz: any Authorization ------------------------------------------------------------------
KEY_MUTATIONS = st.builds(  # junk put into a key, or a character of it swapped for junk
    lambda key, cut, junk, into: key[:cut] + junk + key[cut + (0 if into else 1) :],
    st.sampled_from([A1.encode(), B1.encode(), b"Bearer " + A2.encode(), UPSTREAM.encode()]),
    st.integers(0, 60),
    st.binary(min_size=1, max_size=4),
    st.booleans(),
)  # fmt: skip
SPELLINGS = st.builds(  # a real key, legally spelt: these must work (the oracle's other side)
    lambda pre, scheme, key, post: pre + scheme + key + post,
    st.sampled_from([b"", b" ", b"\t", b" \t "]),
    st.sampled_from([b"", b"Bearer ", b"bearer ", b"BEARER \t", b"Bearer   "]),
    st.sampled_from([k.encode() for k in CLIENT_KEYS]),
    st.sampled_from([b"", b" ", b"\t", b"\t \t"]),
)
TEXT_VALUES = (
    st.text(max_size=120).map(lambda s: s.encode()) | KEY_MUTATIONS.filter(lambda v: v.isascii()) | SPELLINGS
)
ROUTES = st.sampled_from([b"/v2/transcript?limit=1", b"/v3/token?expires_in_seconds=60"])
FUZZ = settings(
    max_examples=300, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip


async def fuzz_one(rig: Rig, value: bytes, target: bytes) -> None:
    """The oracle: a 200 only for a value that is a gateway key (upstream then heard one
    request, with the account key); anything else a 400 or 401 in JSON, nothing sent."""
    before = len(rig.heard)
    answer = await exchange(rig, http_request([value], target=target))
    new = rig.heard[before:]
    assert answer.status < 500, (answer.status, answer.body[:300], value)
    is_key = presented_key(value.decode("utf-8", "surrogateescape")) in CLIENT_KEYS
    if answer.status == 200:
        assert is_key and len(new) == 1, (value, new)
    else:
        answer.assert_error(400, 401)
        assert new == [], (value, new)
    assert_nothing_leaked(rig, answer.raw)


def run_fuzz(strategy: st.SearchStrategy[bytes], first: bytes | None = None) -> None:
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    try:
        rig = loop.run_until_complete(stack.enter_async_context(managed()))

        @FUZZ
        @given(strategy, ROUTES)
        def one(value: bytes, target: bytes) -> None:
            loop.run_until_complete(fuzz_one(rig, value, target))

        if first is not None:
            one = example(first, b"/v2/transcript?limit=1")(one)
        one()
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()


def test_fuzz_any_text_authorization_is_a_401_or_400_never_5xx() -> None:
    """Any text (UTF-8 on the wire, control characters and all) and near misses of real
    keys (the account key's among them)."""
    run_fuzz(TEXT_VALUES)


def test_fuzz_any_bytes_authorization_is_a_401_or_400_never_5xx() -> None:
    """Any bytes at all, obs-text (not UTF-8) included, and key mutations with such bytes."""
    run_fuzz(st.binary(max_size=200) | KEY_MUTATIONS, first=b"\x80")
