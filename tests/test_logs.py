"""Log lines carry no key, no token and no raw control character (gateway/logs.py).

Found by trying: aiohttp's error log for a malformed request quoted the offending header line,
``Authorization`` included, at ERROR level; the access log printed the percent-decoded path, so
``%0a`` forged a log line; the webhook receiver's token was in every access-log line for it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from gateway.app import build_app
from gateway.logs import (
    FORMAT,
    MASK,
    AccessLogger,
    JsonFormatter,
    Redactor,
    escape,
    escape_path,
    redact,
    sanitize,
)
from gateway.products.transcripts.webhooks import RECEIVER_PATH
from tests.helpers import captured_logs, gateway_config, running_sim, start_gateway_process

SECRET = "secret-key-123"
HEX_KEY = "0123456789abcdef0123456789abcdef"  # the shape of an AssemblyAI key
RECORD_HEAD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]")


# --- the helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: {SECRET}",
        f"authorization:{SECRET}",
        f"b'Authorization: {SECRET}\\x01'",  # aiohttp's error for a bad header value
        f"b'Authorization {SECRET}'",  # a header line without its colon
        f"Proxy-Authorization: Basic {SECRET}",
        f"{{'Authorization': '{SECRET}', 'Host': 'x'}}",
        f'{{"Authorization": "{SECRET}"}}',
        f"Authorization: Bearer {SECRET}",
        f"sent with Bearer {SECRET} to upstream",
        f"GET /v3/ws?sample_rate=16000&token={SECRET}&x=1",
        f'{{"webhook_auth_header_value": "{SECRET}", "webhook_url": "https://h/x"}}',
        f"webhook_auth_header_value={SECRET}",
        f"redis://user:{SECRET}@redis:6379/0",
        f"password={SECRET}",
        f"{RECEIVER_PATH}/5e3c1f2a-1b2c-8d4e-8f00-123456789abc/{SECRET}",
        f"Cookie: session={SECRET}",
        f"X-Api-Key: {SECRET}",
    ],
)
def test_credentials_are_redacted(text: str) -> None:
    """Every shape a credential takes in a log message comes out as ***."""
    out = redact(text)
    assert SECRET not in out, out
    assert MASK in out


def test_a_bare_key_shaped_word_and_given_secrets_are_redacted() -> None:
    assert HEX_KEY not in redact(f"key {HEX_KEY} refused")
    assert redact("vault key abc-DEF_123 loaded", secrets=["abc-DEF_123"]) == "vault key *** loaded"
    # ids the gateway logs (UUIDs) and ordinary words stay readable
    job = "5e3c1f2a-1b2c-8d4e-8f00-123456789abc"
    for kept in (f"job {job}: upstream answered 429; requeued", "Invalid header token:\n\n    b'Bad Line'"):
        assert redact(kept) == kept
    assert redact("max_tokens=5") == "max_tokens=5"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\x0ab"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("\x00\x7f\x85", "\\x00\\x7f\\x85"),
        ("a\u2028b\u202eevil", "a\\u2028b\\u202eevil"),
        ("café ünïcode 日本", "café ünïcode 日本"),
        ("plain text", "plain text"),
    ],
)
def test_control_characters_are_escaped(raw: str, shown: str) -> None:
    assert escape(raw) == shown
    assert sanitize(raw) == shown


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("/v2/transcript", "/v2/transcript"),
        ("/v2/x%0aFORGED", "/v2/x%0aFORGED"),  # raw: percent-escapes stay as sent
        ('/a"b\\c', "/a\\x22b\\x5cc"),
        ("/caf\u00e9", "/caf\\xc3\\xa9"),
        ("/x\udcff", "/x\\xff"),  # a byte the parser could not decode
    ],
)
def test_a_path_is_escaped_as_bytes(raw: str, shown: str) -> None:
    assert escape_path(raw) == shown


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_the_redactor_formats_then_sanitizes_message_and_traceback() -> None:
    """A record's message (with its arguments) is one line; its traceback is kept, each line
    redacted, escaped and indented, so no line of it can pass for a record of its own."""
    try:
        raise ValueError(f"bad line b'Authorization: {SECRET}'\n2026-01-01 00:00:00,000 INFO FORGED")
    except ValueError as exc:
        record = _record("Error handling %s from %s", f"/a\nFORGED token={SECRET}", "127.0.0.1", exc=exc)
    assert Redactor().filter(record) is True
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter(FORMAT))
    out = handler.format(record)
    assert SECRET not in out
    lines = out.splitlines()
    assert "/a\\x0aFORGED token=***" in lines[0]
    assert "Traceback (most recent call last):" in out
    assert all(line.startswith(" ") for line in lines[1:]), out
    assert Redactor().filter(record) and handler.format(record) == out  # idempotent


# --- a gateway, its logs at DEBUG, and raw-socket clients ---------------------------------------


@asynccontextmanager
async def gateway_with_access_log() -> AsyncIterator[int]:
    async with running_sim() as (_, sim_url):
        app = build_app(gateway_config(sim_url))
        runner = web.AppRunner(
            app,
            access_log_class=AccessLogger,
            access_log=logging.getLogger("gateway.access"),
            handler_cancellation=True,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield runner.addresses[0][1]
        finally:
            await runner.cleanup()


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return head
    finally:
        writer.close()


HOSTILE = [
    # a bad header line after the key: aiohttp logs the parse error at ERROR
    f"GET /v2/x%0aFORGED HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\nBad Header Line\r\n\r\n",
    # a bad byte in the key's own line: the error quotes that line
    f"GET /v2/x HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\x01\r\n\r\n",
    f"GET /v2/x HTTP/1.1\r\nHost: x\r\nAuthorization {SECRET}\r\n\r\n",
    f"GET /v2/x HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\n folded\r\n\r\n",
    f"GE\x01T /v2/x HTTP/1.1\r\nAuthorization: {SECRET}\r\n\r\n",  # bad method: logged at DEBUG
    # well formed, with a path that decodes to a forged line and a key in the query
    f"GET /v2/x%0d%0a2026-01-01%2000:00:00,000%20INFO%20FORGED?token={SECRET} HTTP/1.1\r\n"
    f"Host: x\r\nAuthorization: {SECRET}\r\n\r\n",
    f"GET /caf\u00e9\u202eFORGED HTTP/1.1\r\nHost: x\r\nAuthorization: {SECRET}\r\n\r\n",
]


async def test_hostile_requests_leave_no_key_and_no_forged_line() -> None:
    with captured_logs() as stream:
        async with gateway_with_access_log() as port:
            for request in HOSTILE:
                head = await exchange(port, request.encode("utf-8"))
                assert head.split(b" ")[1] in (b"400", b"401", b"404"), (request, head)
    output = stream.getvalue()
    assert "Error handling request" in output  # aiohttp did log the bad requests
    assert "FORGED" in output
    assert SECRET not in output
    assert not RAW_CONTROL.search(output), output
    for line in output.splitlines():
        assert RECORD_HEAD.match(line) or line.startswith(" ") or not line, line
        if "FORGED" in line and not line.startswith(" "):
            assert "gateway.access" in line and '"GET /' in line, line  # part of its own record


async def test_the_webhook_receiver_token_is_not_in_the_access_log() -> None:
    job = "5e3c1f2a-1b2c-8d4e-8f00-123456789abc"
    token = "tok" + HEX_KEY[3:]
    with captured_logs() as stream:
        async with gateway_with_access_log() as port:
            for path in (
                f"{RECEIVER_PATH}/{job}/{token}",
                f"{RECEIVER_PATH}/{job}/{token}?x=1",
                f"/_aai/%77ebhook/{job}/{token[:3]}%{ord(token[3]):02x}{token[4:]}",  # encoded, still routed
            ):
                req = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}"
                await exchange(port, req.encode())
            await exchange(port, f"GET {RECEIVER_PATH}/{job}/{token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    output = stream.getvalue()
    access = [line for line in output.splitlines() if "gateway.access" in line]
    assert len(access) == 4, output
    assert token not in output and token[4:] not in output, output
    assert all(f"{RECEIVER_PATH}/{job}/{MASK}" in line for line in access), access


def test_redaction_follows_the_receiver_path() -> None:
    """The redaction uses the receiver's path from where the route is defined."""
    assert redact(f"{RECEIVER_PATH}/id/abc") == f"{RECEIVER_PATH}/id/{MASK}"


# --- JSON lines and the access fields ----------------------------------------------------------

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def _ask(port: int, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def _request_id(answer: bytes) -> str:
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    (value,) = [
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith("x-request-id:")
    ]
    return value


async def test_json_lines_carry_the_access_fields_and_never_a_key_query_or_body() -> None:
    key = HEX_KEY
    body = b'{"model": "gpt-5", "messages": [{"role": "user", "content": "body-text-never-logged"}]}'
    with captured_logs(JsonFormatter()) as stream:
        async with gateway_with_access_log() as port:
            named = {"Authorization": key, "X-Request-Id": "req-123.A_b"}
            models = await _ask(port, "GET", f"/v1/models?token={SECRET}", named)
            chat_path = "/v1/chat/completions?x=query-never-logged"
            chat = await _ask(port, "POST", chat_path, {"Authorization": key}, body)
            insane = [
                await _ask(port, "GET", "/v1/models", {"X-Request-Id": bad})
                for bad in ("has space", "x" * 129, 'q"uote', "")
            ]
            await exchange(port, f"GET /v2/x HTTP/1.1\r\nHost: x\r\nAuthorization {SECRET}\r\n\r\n".encode())
    assert b" 200 " in models.split(b"\r\n")[0] and b" 200 " in chat.split(b"\r\n")[0], (models, chat)
    assert _request_id(models) == "req-123.A_b"  # a sane id is kept and echoed
    assert UUID.fullmatch(_request_id(chat))  # none given: one is made
    made = [_request_id(answer) for answer in insane]
    assert all(UUID.fullmatch(rid) for rid in made) and len(set(made)) == 4, made
    records = [json.loads(line) for line in stream.getvalue().splitlines()]  # each line: one object
    # (aiohttp.access: the simulator's own log, in this process; the gateway logs to gateway.access)
    output = json.dumps([r for r in records if r["logger"] != "aiohttp.access"])
    for needle in (key, SECRET, "query-never-logged", "body-text-never-logged", "has space"):
        assert needle not in output, needle
    access = {r["request_id"]: r for r in records if r.get("type") == "access"}
    first = access["req-123.A_b"]
    assert first["logger"] == "gateway.access" and first["level"] == "INFO"
    assert first["method"] == "GET" and first["path"] == "/v1/models" and first["status"] == 200
    assert first["group"] == "llm" and first["limits"] == ["requests"]
    assert first["wait_ms"] >= 0 and first["upstream_ms"] > 0 and first["duration_ms"] > 0
    assert re.fullmatch(r"[0-9a-f]{16}", first["key"]), first
    second = access[_request_id(chat)]
    assert second["path"] == "/v1/chat/completions" and second["status"] == 200
    assert sorted(second["limits"]) == ["llm:gpt-5", "requests"] and second["key"] == first["key"]
    for rid in made:
        assert access[rid]["key"] is None and access[rid]["status"] == 200
    refused = [r for r in access.values() if r["status"] == 400]
    assert len(refused) == 1 and UUID.fullmatch(refused[0]["request_id"]), refused
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)


async def test_serve_writes_json_lines_when_asked_by_the_environment(tmp_path: Path) -> None:
    """``AAI_GATEWAY_LOG_FORMAT=json``: every line ``aai-gateway serve`` writes is JSON."""
    raw = {"transcripts": {"data_dir": str(tmp_path / "data")}}
    gw = start_gateway_process(raw, env={"AAI_GATEWAY_LOG_FORMAT": "json"})
    try:
        await gw.ready(path=None)  # (no request: the one access line below is the client's)
        answer = await _ask(gw.port, "GET", "/healthz", {"X-Request-Id": "from-client"})
        assert _request_id(answer) == "from-client"
    finally:
        _, output = await gw.stop()
    records = [json.loads(line) for line in output.splitlines()]
    assert any("listening on http://" in r["message"] for r in records), records
    (line,) = [r for r in records if r.get("type") == "access"]
    assert line["request_id"] == "from-client" and line["path"] == "/healthz" and line["group"] == "other"
