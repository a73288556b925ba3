"""Property-based fuzzing of the request surface: random methods, paths (dot segments, encoded
slashes, control characters, absolute-form), headers (keys, content types and codings) and
bodies (JSON, compressed or not, binary; sized or chunked), sent over raw sockets to one
gateway in front of a tagging upstream. For every request:

- the gateway never answers a client's input with a 5xx;
- every error the gateway makes is JSON ``{"error": str}`` (bytes aiohttp's HTTP parser
  refuses get its own plain-text 400 and a closed connection, before the gateway runs);
- an answer that came from upstream was made for the key that asked, for the exact target
  that was routed, and is the only request upstream received for it;
- an error the gateway made itself sent nothing upstream;
- upstream never received more requests than the gateway admitted.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from contextlib import AsyncExitStack
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.test_request_hostile import ALICE, MALLORY, Rig, rig

SEGMENTS = [
    "v1", "v2", "v3", "transcript", "upload", "chat", "completions", "understanding", "models",
    "token", "ws", "healthz", "metrics", "readyz", "abc", "..", ".", "%2e%2e", "%2E.", ".%2e",
    "%2F", "%2f", "%5C", "%00", "%0a", "%0D", "%7F", "", "a%20b", "~x", "%41", "%25", "x;y",
    "%c3%a9", "%ff",
]  # fmt: skip
ROUTES = ["/v2/transcript", "/v2/upload", "/v1/chat/completions", "/v1/understanding", "/v1/models",
          "/v3/token", "/v2/transcript/abc", "/v2/transcript/abc/sentences"]  # fmt: skip
UNRESERVED = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"
QUERY = UNRESERVED + "=&%+"


@st.composite
def targets(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        path = draw(st.sampled_from(ROUTES))
    else:
        segs = draw(st.lists(st.sampled_from(SEGMENTS) | st.text(UNRESERVED + "%", max_size=6), max_size=6))
        path = "/" + "/".join(segs)
    if draw(st.booleans()):
        path += "?" + draw(st.text(QUERY, max_size=20))
    if draw(st.integers(0, 5)) == 0:
        path = draw(st.sampled_from(["http://h.example", "https://h", "HTTP://x:1"])) + path
    return path


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "model": st.sampled_from(["gpt-5", "", "bad model", "x" * 300]) | st.integers(),
                "audio_url": st.sampled_from(["https://a/b.mp3", ""]),
                "messages": st.just([]),
                "transcript_id": st.text(UNRESERVED, max_size=10),
                "pad": st.text(max_size=50),
            },
        )
    )
    raw_body = draw(
        st.sampled_from(["json", "binary", "empty", "notjson"]).flatmap(
            lambda kind: {
                "json": st.just(json.dumps(doc).encode()),
                "binary": st.binary(max_size=300),
                "empty": st.just(b""),
                "notjson": st.just(b"{not json"),
            }[kind]
        )
    )
    coding = draw(st.sampled_from([None, "gzip", "deflate", "br", "identity", "gzip, gzip", "x-junk"]))
    body = raw_body
    if coding in ("gzip", "deflate") and draw(st.booleans()):  # else: labelled but not compressed
        body = gzip.compress(raw_body) if coding == "gzip" else zlib.compress(raw_body)
    if draw(st.integers(0, 10)) == 0:
        body = gzip.compress(b"{" + b" " * 100_000 + b"}")  # inflates past the cap
        coding = "gzip"
    headers: list[tuple[str, str]] = []
    key = draw(st.sampled_from([ALICE, MALLORY, None]))
    if key is not None:
        headers.append(("Authorization", key))
    types = [None, "application/json", "application/x-www-form-urlencoded", "text/plain"]
    ctype = draw(st.sampled_from(types))
    if ctype:
        headers.append(("Content-Type", ctype))
    if coding:
        headers.append(("Content-Encoding", coding))
    extra = st.tuples(
        st.sampled_from(["X-Custom", "Accept", "X-AAI-Gateway-Priority", "Idempotency-Key"]),
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-", max_size=12),
    )
    headers += draw(st.lists(extra, max_size=3))
    return {
        "method": draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FOO"])),
        "target": draw(targets()),
        "headers": headers,
        "body": body,
        "chunked": draw(st.booleans()) and bool(body),
        "key": key or "",
    }


def encode(req: dict[str, Any]) -> bytes:
    lines = [f"{req['method']} {req['target']} HTTP/1.1", "Host: gw", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in req["headers"]]
    body: bytes = req["body"]
    if req["chunked"]:
        lines.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:half], body[half:]) if p) + b"0\r\n\r\n"
    elif body or req["method"] in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse(data: bytes, head_only: bool) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = data.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    status = int(first.split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if head_only:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            body, rest = body + rest[:n], rest[n + 2 :]
        return status, headers, body
    return status, headers, rest[: int(headers.get("content-length", len(rest)))]


async def exchange(g: Rig, req: dict[str, Any]) -> None:
    before = len(g.upstream.seen)
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    writer.write(encode(req))
    async with asyncio.timeout(10):
        data = await reader.read()
    writer.close()
    await asyncio.sleep(0)  # the upstream records what it received
    assert data, req
    status, headers, body = parse(data, req["method"] == "HEAD")
    new = g.upstream.seen[before:]
    assert status < 500, (status, body[:300], req)
    doc: Any = None
    if body and headers.get("content-type", "").startswith("application/json"):
        doc = json.loads(body)
    tagged = isinstance(doc, dict) and "tag" in doc
    if tagged:  # upstream's answer: for this key, this exact target, one request
        assert doc["tag"] == req["key"], (doc, req)
        assert len(new) == 1 and new[0].auth == req["key"], (new, req)
        sent = req["target"]
        if not sent.startswith("/"):  # absolute-form: forwarded in origin-form
            sent = "/" + sent.split("/", 3)[3] if sent.count("/") >= 3 else "/"
        if not sent.startswith("/v2/transcript?") and sent.split("?")[0] != "/v2/transcript":
            assert doc["target"].rstrip("?") == sent.rstrip("?"), (doc, req)  # an empty query is none
    elif status >= 400:
        parser_refused = status == 400 and headers.get("content-type", "").startswith("text/plain")
        if req["method"] != "HEAD" and not parser_refused:  # (aiohttp's parser answers in text)
            assert isinstance(doc, dict) and set(doc) == {"error"}, (status, body[:300], req)
            assert isinstance(doc["error"], str)
        assert new == [], (new, req)
    else:
        assert len(new) <= 1, (new, req)
    assert len(g.upstream.seen) <= g.admitted


def test_request_surface_fuzz() -> None:
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    try:
        g = loop.run_until_complete(
            stack.enter_async_context(rig(proxy={"max_json_body_bytes": 4096, "client_body_timeout_s": 5}))
        )

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests())
        def one(req: dict[str, Any]) -> None:
            loop.run_until_complete(exchange(g, req))

        one()
        assert g.upstream.bad == 0 and len(g.upstream.seen) > 20
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
