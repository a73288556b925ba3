"""The relay's WebSocket framing (gateway/proxy/ws_wire.py): frames read whole from any
split of the byte stream, masks applied and removed, caps enforced, and the client handshake."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway.proxy import ws_wire
from gateway.proxy.ws_wire import BINARY, CLOSE, PING, TEXT, FrameReader, FrameTooLarge
from tests.helpers import self_signed_tls, serving, ws_frame


def test_frames_are_read_whole_from_any_split_of_the_stream() -> None:
    frames = [
        ws_wire.frame(TEXT, b'{"type": "Terminate"}', mask=True),
        ws_wire.frame(BINARY, bytes(range(256)) * 10, mask=True),  # 16-bit length
        ws_wire.frame(BINARY, b"x" * 70_000, mask=False),  # 64-bit length
        ws_wire.close_frame(1000, "bye", mask=False),
    ]
    stream = b"".join(frames)
    for step in (1, 2, 3, 7, 100, 4096, len(stream)):
        reader = FrameReader(1 << 20)
        got = []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i : i + step])
        assert [f.raw for f in got] == frames  # forwarded byte for byte
        assert reader.pending == 0
        assert got[0].payload() == b'{"type": "Terminate"}'
        assert got[1].payload() == bytes(range(256)) * 10 and got[1].masked
        assert got[2].size == 70_000 and not got[2].masked
        assert ws_wire.parse_close(got[3].payload()) == (1000, "bye")


def test_one_whole_frame_in_one_chunk_is_not_copied() -> None:
    data = ws_wire.frame(BINARY, b"a" * 1600, mask=True)
    (f,) = FrameReader(1 << 20).feed(data)
    assert f.raw is data


def test_a_frame_over_the_cap_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(1000)
    head = struct.pack("!BBQ", 0x82, 0x80 | 127, 10**12)
    with pytest.raises(FrameTooLarge):
        reader.feed(head)


def test_masks_are_random_and_close_codes_without_a_body_read_as_1005() -> None:
    a, b = ws_wire.frame(TEXT, b"same", mask=True), ws_wire.frame(TEXT, b"same", mask=True)
    assert a != b  # a fresh key each frame
    (fa,) = FrameReader(100).feed(a)
    assert fa.payload() == b"same"
    assert ws_wire.parse_close(b"") == (1005, "")
    assert ws_wire.close_frame(1005, mask=False) == bytes([0x80 | CLOSE, 0])


def test_the_accept_key_is_rfc_6455s_example() -> None:
    assert ws_wire.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_connect_speaks_to_a_real_websocket_server() -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen.append(request.headers["Authorization"])
        await ws.send_str("hello")  # may arrive with the 101
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=401)

    app = web.Application()
    app.router.add_get("/v3/ws", handler)
    app.router.add_get("/refuse", refuse)
    async with serving(app) as port:
        got: asyncio.Queue[ws_wire.Frame] = asyncio.Queue()
        up = await ws_wire.connect(
            URL(f"ws://127.0.0.1:{port}/v3/ws?x=1"), {"Authorization": "k"}, timeout_s=5, max_frame=1 << 20
        )
        lost = asyncio.Event()
        up.attach(lambda frames: [got.put_nowait(f) for f in frames] and None, lost.set)
        assert (await got.get()).payload() == b"hello"
        up.write(ws_wire.frame(BINARY, b"abc", mask=True))
        assert (await got.get()).payload() == b"cba"
        up.write(ws_wire.frame(PING, b"p", mask=True))  # aiohttp answers pings itself
        assert seen == ["k"]
        up.write(ws_wire.close_frame(1000, mask=True))
        close = await asyncio.wait_for(got.get(), 5)
        while close.opcode != CLOSE:
            close = await asyncio.wait_for(got.get(), 5)
        await asyncio.wait_for(lost.wait(), 5)  # the server closed the connection after its Close

        with pytest.raises(ws_wire.HandshakeRefused) as refused:
            await ws_wire.connect(URL(f"ws://127.0.0.1:{port}/refuse"), {}, timeout_s=5, max_frame=100)
        assert refused.value.status == 401
    with pytest.raises(ws_wire.NotReached):  # nothing listens there any more
        await ws_wire.connect(URL(f"ws://127.0.0.1:{port}/v3/ws"), {}, timeout_s=2, max_frame=100)


def test_a_long_close_reason_is_cut_between_characters() -> None:
    (f,) = FrameReader(1000).feed(ws_wire.close_frame(1000, "é" * 70, mask=False))
    code, reason = ws_wire.parse_close(f.payload())
    assert code == 1000 and reason == "é" * 61 and len(f.payload()) <= 125


def test_frames_and_a_lost_connection_before_a_consumer_attaches_are_kept() -> None:
    up = ws_wire.Upstream(1000)
    up._open = True  # as after the handshake
    up.data_received(ws_wire.frame(TEXT, b"early", mask=False))
    up.connection_lost(None)
    got: list[bytes] = []
    lost: list[bool] = []
    up.attach(lambda frames: got.extend(f.payload() for f in frames), lambda: lost.append(True))
    assert got == [b"early"] and lost == [True]


def test_a_deeply_nested_message_is_not_an_error() -> None:
    from gateway.products.streaming_relay import _kind

    assert _kind(b'{"a":' + b"[" * 100_000) == ""
    assert _kind(b'{"type": "Terminate"}') == "Terminate"


async def test_connect_over_tls_checks_the_servers_certificate(tmp_path: Path) -> None:
    server_tls, trusting = self_signed_tls(tmp_path)

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("over tls")
        async for _ in ws:
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v3/ws", handler)
    async with serving(app, tls=server_tls) as port:
        url = URL(f"wss://localhost:{port}/v3/ws")
        up = await ws_wire.connect(url, {}, timeout_s=5, max_frame=1 << 20, ssl_context=trusting)
        got: asyncio.Queue[ws_wire.Frame] = asyncio.Queue()
        up.attach(lambda frames: [got.put_nowait(f) for f in frames] and None, lambda: None)
        assert (await asyncio.wait_for(got.get(), 5)).payload() == b"over tls"
        up.close()
        with pytest.raises(ws_wire.NotReached):  # the system's CAs do not know this certificate
            await ws_wire.connect(url, {}, timeout_s=5, max_frame=1 << 20)


# -- strictness (RFC 6455 section 5) and the instance's byte budget -------------------------------
def raw_frame(b0: int, payload: bytes, *, mask: bool = True, length: int | None = None) -> bytes:
    """A frame built by hand, whatever its first byte says (FIN, RSV, opcode)."""
    return ws_frame(b0, payload, key=b"\x01\x02\x03\x04" if mask else None, length=length)


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (raw_frame(0x82, b"audio", mask=False), "unmasked client frame"),
        (raw_frame(0x82 | 0x40, b"audio"), "RSV bits"),
        (raw_frame(0x82 | 0x10, b"audio"), "RSV bits"),
        (raw_frame(0x83, b"x"), "reserved opcode 0x3"),
        (raw_frame(0x8B, b"x"), "reserved opcode 0xb"),
        (raw_frame(0x89, b"p" * 126), "control frame over 125 bytes"),
        (raw_frame(0x09, b"p"), "fragmented control frame"),
        (raw_frame(0x80, b"rest"), "continuation frame outside a message"),
        (raw_frame(0x02, b"part") + raw_frame(0x81, b"{}"), "new message inside one"),
        (raw_frame(0x01, b"{") + raw_frame(0x82, b"x"), "new message inside one"),
    ],
)
def test_a_frame_rfc_6455_forbids_is_a_protocol_error_with_the_frames_before_it(
    stream: bytes, expected: str
) -> None:
    before = raw_frame(0x82, b"fine")
    for step in (1, 3, len(before) + len(stream)):  # the same verdict from any split
        reader = FrameReader(1 << 20, masked=True)
        got: list[bytes] = []
        data = before + stream
        with pytest.raises(ws_wire.ProtocolError) as failed:
            for i in range(0, len(data), step):
                got += [f.raw for f in reader.feed(data[i : i + step])]
        got += [f.raw for f in failed.value.frames]
        assert expected in str(failed.value) and failed.value.code == 1002
        assert got[0] == before and all(raw[0] & 0x0F in (1, 2) and not raw[0] & 0x80 for raw in got[1:])
        with pytest.raises(ws_wire.ProtocolError):  # and it stays broken
            reader.feed(before)


def test_a_masked_frame_from_a_server_is_a_protocol_error_and_fragments_are_fine() -> None:
    with pytest.raises(ws_wire.ProtocolError, match="masked server frame"):
        FrameReader(100, masked=False).feed(raw_frame(0x81, b"{}", mask=True))
    reader = FrameReader(100, masked=True)  # text in two fragments, a ping between them
    stream = raw_frame(0x01, b"{") + raw_frame(0x89, b"p") + raw_frame(0x80, b"}")
    assert [(f.opcode, f.fin) for f in reader.feed(stream)] == [(TEXT, False), (PING, True), (0, True)]


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_no_endpoint_may_send_are_protocol_errors(code: int) -> None:
    with pytest.raises(ws_wire.ProtocolError) as failed:
        ws_wire.check_close(struct.pack("!H", code) + b"bye")
    assert failed.value.code == 1002


def test_close_bodies_are_checked() -> None:
    for code in (1000, 1001, 1003, 1007, 1011, 1014, 3000, 3009, 4999):
        assert ws_wire.check_close(struct.pack("!H", code) + "é".encode()) == (code, "é")
    assert ws_wire.check_close(b"") == (1005, "")
    with pytest.raises(ws_wire.ProtocolError, match="1-byte"):
        ws_wire.check_close(b"\x03")
    with pytest.raises(ws_wire.InvalidText) as failed:
        ws_wire.check_close(struct.pack("!H", 1000) + b"\xff\xfe")
    assert failed.value.code == 1007


def test_unfinished_frames_are_held_within_the_budget() -> None:
    budget = ws_wire.Budget(1000)
    a, b = FrameReader(1 << 20, budget=budget), FrameReader(1 << 20, budget=budget)
    frame_a = ws_wire.frame(BINARY, b"a" * 900, mask=True)
    a.feed(frame_a[:600])
    assert budget.used == 600 == a.pending
    with pytest.raises(ws_wire.OverBudget) as failed:
        b.feed(ws_wire.frame(BINARY, b"b" * 900, mask=True)[:500])  # 600 + 500 > 1000
    assert failed.value.code == 1008 and budget.used == 600 and b.pending == 0
    (done,) = a.feed(frame_a[600:])
    assert done.raw == frame_a and budget.used == 0  # a whole frame is no longer held
    a.feed(frame_a[:10])
    a.close()
    assert budget.used == 0 and a.pending == 0


def test_unmasking_is_aiohttps_c_function() -> None:
    from aiohttp._websocket.helpers import websocket_mask

    assert ws_wire._mask is websocket_mask
    data = bytes(range(256)) * 3 + b"xyz"
    buf = bytearray(data)
    ws_wire._mask_python(b"abcd", buf)  # the fallback agrees with it
    assert ws_wire.unmask(data, b"abcd") == bytes(buf) and ws_wire.unmask(bytes(buf), b"abcd") == data


async def test_an_upstream_that_speaks_before_it_is_asked_is_never_used() -> None:
    """A connection opened ahead of a session's upgrade (so it leaves within the guard) must
    not carry a session if upstream sent anything first: a forged 101 is not an answer."""
    forged = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"

    async def eager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(forged)
        await reader.read(1 << 16)
        writer.close()

    server = await asyncio.start_server(eager, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = URL(f"ws://127.0.0.1:{port}/v3/ws")
        proto = await ws_wire.open_connection(url, timeout_s=5, max_frame=100)
        for _ in range(100):
            if proto.closed:
                break
            await asyncio.sleep(0.01)
        assert proto.closed
        with pytest.raises(ws_wire.NotReached):  # nothing is sent on it
            await ws_wire.handshake(proto, url, {}, timeout_s=2)
    finally:
        server.close()
        await server.wait_closed()
