"""Log lines carry no key, no token and no raw control character (gateway/logs.py).

Found by trying: aiohttp's error log for a malformed request quoted the offending header line,
``Authorization`` included, at ERROR level; the access log printed the percent-decoded path, so
``%0a`` forged a log line; the webhook receiver's token was in every access-log line for it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
from aiohttp import web

from gateway.app import build_app
from gateway.logs import (
    FORMAT,
    MASK,
    AccessLogger,
    Redactor,
    escape,
    escape_path,
    protect,
    redact,
    sanitize,
)
from gateway.products.transcripts.webhooks import RECEIVER_PATH
from tests.helpers import gateway_config, running_sim

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


@contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Every logger at DEBUG into one protected handler, formatted as ``aai-gateway serve`` does."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = protect(logging.StreamHandler(stream))
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


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
