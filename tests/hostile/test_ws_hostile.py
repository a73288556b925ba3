"""The streaming relay against a hostile client and a hostile (or merely buggy) upstream, on
raw sockets: every frame written by hand. Each hostile session runs beside a well-behaved
client on another key, whose every message is checked to be its own (the simulator's Begin
carries the session id, which the simulator maps to the key that opened it; the raw upstream
below tags every message with its key).

Covered (issue 8: "Protocol strictness", "Storage and memory anyone can fill"):
- frames RFC 6455 forbids (unmasked, RSV bits, reserved opcodes, fragmented or oversized
  control frames, close codes no endpoint may send, a continuation outside a message) close
  the client with 1002 (1007 for a close reason that is not UTF-8), and the upstream session
  still ends with Terminate;
- a large text frame is forwarded unread: never unmasked, never parsed;
- caps across the instance: sessions waiting for admission (more get 3009 at once) and bytes
  held for unfinished frames (past it: 1008);
- upstream frames RFC 6455 forbids are never forwarded: the client gets 1011, upstream a
  Terminate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web

from gateway.products import streaming_relay
from gateway.products.streaming_relay import StreamingRelay
from gateway.proxy import ws_wire
from gateway.sim.app import Sim, SimConfig
from tests.helpers import gateway_config, metric, running_gateway, running_sim, ws_frame

PCM = b"\0\0" * 800  # 50 ms of 16 kHz PCM16


# -- a raw WebSocket client --------------------------------------------------------------------
def hand_frame(b0: int, payload: bytes, *, mask: bool = True, key: bytes = b"\x11\x22\x33\x44") -> bytes:
    """A frame as a hostile client writes it: any first byte (FIN, RSV, opcode), masked or not."""
    return ws_frame(b0, payload, key=key if mask else None)


@dataclass
class Raw:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    wire: ws_wire.FrameReader = field(default_factory=lambda: ws_wire.FrameReader(16 << 20, masked=False))
    got: bytearray = field(default_factory=bytearray)  # every byte the gateway sent after the 101
    kept: list[ws_wire.Frame] = field(default_factory=list)

    @classmethod
    async def open(cls, url: str, key: str) -> Raw:
        u = yarl.URL(url)
        assert u.host is not None and u.port is not None
        reader, writer = await asyncio.open_connection(u.host, u.port)
        nonce = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {u.raw_path_qs} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: {key}\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert ws_wire.accept_key(nonce).encode() in head
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def text(self, doc: dict[str, Any]) -> None:
        self.send(ws_wire.frame(ws_wire.TEXT, json.dumps(doc).encode(), mask=True))

    async def frame(self, within: float = 5.0) -> ws_wire.Frame | None:
        """The gateway's next frame (checked as strictly as the gateway checks its peers),
        or None at the end of the connection."""
        async with asyncio.timeout(within):
            while not self.kept:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.got += data
                self.kept += self.wire.feed(data)
        return self.kept.pop(0)

    async def messages(self, within: float = 5.0) -> tuple[list[dict[str, Any]], int | None, str]:
        """Every JSON message until the gateway's Close: (messages, close code, reason)."""
        out: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + within
        while True:
            f = await self.frame(max(0.01, deadline - asyncio.get_running_loop().time()))
            if f is None:
                return out, None, ""
            if f.opcode == ws_wire.TEXT:
                out.append(json.loads(f.payload()))
            elif f.opcode == ws_wire.CLOSE:
                code, reason = ws_wire.check_close(f.payload())
                self.send(ws_wire.close_frame(code if code != 1005 else 1000, mask=True))
                return out, code, reason

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


@asynccontextmanager
async def sim_gateway(
    sim_cfg: SimConfig | None = None, **overrides: Any
) -> AsyncIterator[tuple[Sim, str, web.Application, Any]]:
    async with running_sim(sim_cfg or SimConfig()) as (sim, sim_url):
        overrides.setdefault("limits", {"streaming_sessions": {"limit": 100, "window_s": 60}})
        async with running_gateway(gateway_config(sim_url, **overrides)) as (url, app, registry):
            yield sim, url.replace("http", "ws") + "/v3/ws?sample_rate=16000", app, registry


def relay_of(app: web.Application) -> StreamingRelay:
    for route in app.router.routes():
        if route.method == "GET" and route.resource is not None and route.resource.canonical == "/v3/ws":
            relay = getattr(route.handler, "__self__", None)
            assert isinstance(relay, StreamingRelay)
            return relay
    raise AssertionError("no /v3/ws route")


async def good_client(sim: Sim, url: str, key: str, seconds: float = 0.6) -> list[dict[str, Any]]:
    """A well-behaved session on its own key: Begin, audio at real time, Terminate; every
    message it gets is its own (its Begin names a session the simulator opened for its key)."""
    ws = await Raw.open(url, key)
    try:
        begin = (await ws.frame(10)) or pytest.fail("no Begin")
        first = json.loads(begin.payload())
        assert first["type"] == "Begin" and sim.streaming.sessions[first["id"]].key == key
        for _ in range(int(seconds / 0.05)):
            ws.send(ws_wire.frame(ws_wire.BINARY, PCM, mask=True))
            await asyncio.sleep(0.05)
        ws.text({"type": "Terminate"})
        got, code, _ = await ws.messages()
        assert code == 1000 and got[-1]["type"] == "Termination", got
        assert all(m.get("id", first["id"]) == first["id"] for m in got)  # no other session's Begin
        return [first, *got]
    finally:
        await ws.close()


# -- the hostile client ------------------------------------------------------------------------
BAD_CLIENT_FRAMES: dict[str, tuple[bytes, int]] = {
    "unmasked": (hand_frame(0x82, PCM, mask=False), 1002),
    "rsv1": (hand_frame(0x82 | 0x40, PCM), 1002),
    "rsv3": (hand_frame(0x81 | 0x10, b'{"type": "Terminate"}'), 1002),
    "reserved opcode 0x3": (hand_frame(0x83, b"data"), 1002),
    "reserved opcode 0xB": (hand_frame(0x8B, b"ctl"), 1002),
    "ping of 126 bytes": (hand_frame(0x89, b"p" * 126), 1002),
    "fragmented ping": (hand_frame(0x09, b"p") + hand_frame(0x80, b"q"), 1002),
    "continuation outside a message": (hand_frame(0x80, PCM), 1002),
    "new message inside a fragmented one": (hand_frame(0x02, PCM) + hand_frame(0x82, PCM), 1002),
    "close 999": (hand_frame(0x88, struct.pack("!H", 999)), 1002),
    "close 1005": (hand_frame(0x88, struct.pack("!H", 1005)), 1002),
    "close 1006": (hand_frame(0x88, struct.pack("!H", 1006)), 1002),
    "close 1015": (hand_frame(0x88, struct.pack("!H", 1015)), 1002),
    "close 2000": (hand_frame(0x88, struct.pack("!H", 2000)), 1002),
    "close 5000": (hand_frame(0x88, struct.pack("!H", 5000)), 1002),
    "close with a 1-byte body": (hand_frame(0x88, b"\x03"), 1002),
    "close reason not UTF-8": (hand_frame(0x88, struct.pack("!H", 1000) + b"\xc3\x28"), 1007),
}


@pytest.mark.parametrize("case", list(BAD_CLIENT_FRAMES))
async def test_a_frame_rfc_6455_forbids_closes_the_client_1002_and_terminates_upstream(case: str) -> None:
    bad, expected = BAD_CLIENT_FRAMES[case]
    async with sim_gateway() as (sim, url, app, _):
        other = asyncio.ensure_future(good_client(sim, url, "key-good"))
        ws = await Raw.open(url, "key-hostile")
        begin = json.loads(((await ws.frame(10)) or pytest.fail("no Begin")).payload())
        assert sim.streaming.sessions[begin["id"]].key == "key-hostile"
        ws.send(ws_wire.frame(ws_wire.BINARY, PCM, mask=True))
        ws.send(bad)
        got, code, reason = await ws.messages()
        await ws.close()
        assert code == expected, (case, code, reason, got)
        assert reason.startswith("aai-gateway:")
        assert all(m.get("id", begin["id"]) == begin["id"] for m in got)
        await other
        # The billing guard: the hostile client's upstream session still ended with Terminate.
        await until(lambda: sim.streaming.open_sessions == 0)
        hostile = sim.streaming.sessions[begin["id"]]
        assert hostile.terminated and sim.streaming.report()["left_open"] == 0
        assert all(m.encode() != bad for m in hostile.messages)  # the bad frame never went upstream
        assert relay_of(app)._budget.used == 0


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_large_text_frame_is_forwarded_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 MiB of ``{`` in one text frame, from several clients at once: never unmasked, never
    parsed (only text frames up to READ_MAX are read), and /healthz answers meanwhile."""
    unmasked: list[int] = []
    parsed: list[int] = []
    payload, kind = ws_wire.Frame.payload, streaming_relay._kind

    def counting_payload(self: ws_wire.Frame) -> bytes:
        unmasked.append(self.size)
        return payload(self)

    def counting_kind(data: bytes) -> str:
        parsed.append(len(data))
        return kind(data)

    monkeypatch.setattr(ws_wire.Frame, "payload", counting_payload)
    monkeypatch.setattr(streaming_relay, "_kind", counting_kind)
    big = ws_wire.frame(ws_wire.TEXT, b"{" * streaming_relay.MAX_FRAME, mask=True)
    async with sim_gateway() as (sim, url, _, _), aiohttp.ClientSession() as http:
        health = url.split("/v3/ws")[0].replace("ws", "http", 1) + "/healthz"
        other = asyncio.ensure_future(good_client(sim, url, "key-good", seconds=1.0))
        clients = [await Raw.open(url, f"key-big-{i}") for i in range(4)]
        for ws in clients:
            await ws.frame(10)  # Begin
        for ws in clients:
            ws.send(big)
        slowest = 0.0
        for _ in range(10):  # the event loop keeps answering while the frames stream through
            started = time.monotonic()
            async with http.get(health) as r:
                assert r.status == 200
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.02)
        for ws in clients:
            _, code, _ = await ws.messages(10)
            assert code in (1009, 1011, 1000), code  # forwarded: upstream refuses it (its cap)
            await ws.close()
        await other
        assert slowest < 2.0
    assert max(unmasked) <= 64 * 1024  # no 8 MiB frame was ever unmasked
    assert parsed and max(parsed) <= 1024  # nor parsed; the good client's Terminate was read


async def test_sessions_over_max_waiting_sessions_get_3009_at_once() -> None:
    overrides = {
        "limits": {"streaming_sessions": {"limit": 1, "window_s": 30}},
        "streaming": {"max_waiting_sessions": 2, "max_wait_s": 30},
    }
    async with sim_gateway(**overrides) as (sim, url, app, registry):
        waiting_now = lambda: metric(registry, "aai_gateway_sessions_waiting")  # noqa: E731
        first = await Raw.open(url, "key-a")
        assert json.loads(((await first.frame(10)) or pytest.fail()).payload())["type"] == "Begin"
        waiting = [await Raw.open(url, f"key-w{i}") for i in range(2)]
        await until(lambda: waiting_now() == 2)
        started = time.monotonic()
        refused = await Raw.open(url, "key-b")
        got, code, reason = await refused.messages(within=2)  # not after max_wait_s
        assert time.monotonic() - started < 2
        assert code == 3009 and got[-1]["type"] == "Error" and got[-1]["error_code"] == 3009
        assert "max_waiting_sessions" in reason and "aai-gateway" in got[-1]["error"]
        await refused.close()
        await waiting[0].close()  # one leaves: room for another to wait
        await until(lambda: waiting_now() == 1)
        again = await Raw.open(url, "key-c")
        with pytest.raises(TimeoutError):  # it waits (no 3009)
            await again.frame(0.3)
        for ws in (again, waiting[1], first):
            await ws.close()
        await until(lambda: waiting_now() == 0 and relay_of(app)._waiting == 0)
        assert sim.streaming.report()["sessions"] == 1


async def test_unfinished_frames_across_sessions_are_bounded_by_max_buffered_bytes() -> None:
    cap = 1 << 20
    async with sim_gateway(streaming={"max_buffered_bytes": cap}) as (sim, url, app, _):
        relay = relay_of(app)
        other = asyncio.ensure_future(good_client(sim, url, "key-good"))
        clients = [await Raw.open(url, f"key-partial-{i}") for i in range(3)]
        for ws in clients:
            await ws.frame(10)  # Begin
        part = hand_frame(0x82, b"\0" * (4 << 20))[: 400 * 1024]  # a 4 MiB frame, 400 KiB of it
        for ws in clients[:2]:
            ws.send(part)
            await ws.writer.drain()
        await until(lambda: unfinished(relay) >= 2 * (400 * 1024 - 20))
        clients[2].send(part)  # past the cap: closed 1008, nothing more held
        _, code, reason = await clients[2].messages()
        assert code == 1008 and "unfinished frames" in reason
        assert relay._budget.used <= cap and unfinished(relay) <= cap
        await other  # the other key's session went on meanwhile
        for ws in clients:
            await ws.close()
        await until(lambda: relay._budget.used == 0)  # given back when the sessions ended
        await until(lambda: sim.streaming.open_sessions == 0)
        assert sim.streaming.report()["left_open"] == 0


def unfinished(relay: StreamingRelay) -> int:
    """Bytes of unfinished frames the relay's client legs hold."""
    legs = (getattr(s.request.protocol, "_payload_parser", None) for s in relay._sessions)
    return sum(leg.reader.pending for leg in legs if leg is not None)


# -- the hostile upstream ------------------------------------------------------------------------
@dataclass
class UpstreamSession:
    key: str
    messages: list[bytes] = field(default_factory=list)  # text the gateway sent
    close_code: int | None = None


class HostileUpstream:
    """A streaming upstream on raw sockets: Begin tagged with the key that opened the
    session, a Turn tagged with it per audio frame, Termination on Terminate. For a key
    starting with ``bad:`` it answers the first audio frame with ``bad_frame`` (carrying the
    marker LEAK, visible on the wire) instead."""

    def __init__(self, bad_frame: bytes) -> None:
        self.bad_frame = bad_frame
        self.sessions: list[UpstreamSession] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
        }
        s = UpstreamSession(headers.get("authorization", ""))
        self.sessions.append(s)
        accept = ws_wire.accept_key(headers["sec-websocket-key"])
        writer.write(
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )

        def say(doc: dict[str, Any]) -> None:
            writer.write(ws_wire.frame(ws_wire.TEXT, json.dumps({**doc, "key": s.key}).encode(), mask=False))

        say({"type": "Begin", "id": s.key})
        wire = ws_wire.FrameReader(1 << 20, masked=True)  # the gateway must speak properly too
        try:
            while data := await reader.read(65536):
                for f in wire.feed(data):
                    if f.opcode == ws_wire.BINARY:
                        if s.key.startswith("bad:"):
                            writer.write(self.bad_frame)
                        else:
                            say({"type": "Turn", "transcript": f"for {s.key}"})
                    elif f.opcode == ws_wire.TEXT:
                        s.messages.append(f.payload())
                        if b"Terminate" in f.payload():
                            say(
                                {
                                    "type": "Termination",
                                    "audio_duration_seconds": 1,
                                    "session_duration_seconds": 1,
                                }
                            )
                            writer.write(ws_wire.close_frame(1000, mask=False))
                    elif f.opcode == ws_wire.CLOSE:
                        s.close_code = ws_wire.check_close(f.payload())[0]
                        return
        except (ConnectionError, ws_wire.ProtocolError):
            pass
        finally:
            writer.close()


BAD_UPSTREAM_FRAMES = {
    "masked": hand_frame(0x81, b'{"type": "Turn", "LEAK": 1}', mask=True, key=b"\0\0\0\0"),
    "rsv1": hand_frame(0x81 | 0x40, b'{"type": "Turn", "LEAK": 1}', mask=False),
    "reserved opcode 0x3": hand_frame(0x83, b"LEAK", mask=False),
    "reserved opcode 0xC": hand_frame(0x8C, b"LEAK", mask=False),
    "ping of 126 bytes": hand_frame(0x89, b"LEAK" * 32 + b"xx", mask=False),
    "continuation outside a message": hand_frame(0x80, b"LEAK", mask=False),
    "close 999": hand_frame(0x88, struct.pack("!H", 999) + b"LEAK", mask=False),
}


@pytest.mark.parametrize("case", list(BAD_UPSTREAM_FRAMES))
async def test_a_bad_frame_from_upstream_is_never_forwarded_and_ends_the_session(case: str) -> None:
    upstream = HostileUpstream(BAD_UPSTREAM_FRAMES[case])
    async with upstream as streaming_url, running_sim() as (_, sim_url):
        cfg = gateway_config(
            sim_url,
            upstream={"api_url": sim_url, "llm_url": sim_url, "streaming_url": streaming_url},
            limits={"streaming_sessions": {"limit": 100, "window_s": 60}},
        )
        async with running_gateway(cfg) as (url, app, _):
            ws_url = url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
            good, bad = await Raw.open(ws_url, "good:1"), await Raw.open(ws_url, "bad:1")
            for ws in (good, bad):
                ws.send(ws_wire.frame(ws_wire.BINARY, PCM, mask=True))
            got, code, reason = await bad.messages()
            assert code == 1011 and "protocol" in reason, (code, reason, got)
            assert b"LEAK" not in bad.got and b"LEAK" not in good.got
            assert all(m["key"] == "bad:1" for m in got)
            good.send(ws_wire.frame(ws_wire.BINARY, PCM, mask=True))
            good.text({"type": "Terminate"})
            mine, good_code, _ = await good.messages()
            assert good_code == 1000 and [m["type"] for m in mine] == ["Begin", "Turn", "Turn", "Termination"]
            assert all(m["key"] == "good:1" for m in mine)  # never a byte meant for the other
            await good.close()
            await bad.close()
            # The billing guard: upstream got a Terminate for the broken session, then a Close.
            (broken,) = [s for s in upstream.sessions if s.key == "bad:1"]
            await until(lambda: broken.close_code is not None)
            assert any(b"Terminate" in m for m in broken.messages) and broken.close_code in (1002, 1009)
            await until(lambda: relay_of(app)._budget.used == 0)
