"""WebSocket on the wire (RFC 6455), just what a frame-forwarding relay needs.

The streaming relay does not decode and re-encode every audio frame: a client's frames are
masked, which is exactly what upstream must receive, and upstream's are unmasked, which is
exactly what the client must receive. So the relay reads frame *boundaries* (headers only),
forwards each frame's bytes unchanged, and unmasks only the few small frames it must read
(text messages such as ``Terminate`` / ``Termination``, and control frames). That halves the
relay's CPU per frame compared with a full WebSocket stack on each side (bench/
streaming_sessions.py) and keeps the timing of every frame as the client sent it.

No extension is ever negotiated on either side (no permessage-deflate: audio does not
compress, and a compressed frame could not be forwarded as is), so the two legs carry the
same frames.

- ``FrameReader``: bytes in, whole frames out (``Frame``), with a size cap;
- ``frame()`` / ``close_frame()``: frames the gateway writes itself (masked towards upstream);
- ``accept_key()``: the server handshake's ``Sec-WebSocket-Accept``;
- ``connect()``: the client handshake to upstream over a raw asyncio connection (TLS for
  ``wss://``), returning the protocol that then delivers upstream's frames.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from multidict import CIMultiDict
from yarl import URL

from ..proxy.http1 import default_tls, parse_head

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEAD = 64 * 1024  # the upstream handshake's response head


class FrameTooLarge(Exception):
    pass


@dataclass(slots=True)
class Frame:
    opcode: int
    fin: bool
    raw: bytes  # the whole frame as received, header included
    head: int  # header length (mask key included)
    masked: bool

    def payload(self) -> bytes:
        """The payload, unmasked (only for the small frames the relay must read)."""
        data = self.raw[self.head :]
        if not self.masked or not data:
            return data
        key = self.raw[self.head - 4 : self.head]
        return _xor(data, key)

    @property
    def size(self) -> int:
        return len(self.raw) - self.head


def _xor(data: bytes, key: bytes) -> bytes:
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class FrameReader:
    """Incremental: ``feed(chunk)`` returns the frames the chunk completed."""

    __slots__ = ("_buf", "_max", "_need")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()  # an incomplete frame
        self._max = max_frame
        self._need = 0  # bytes the incomplete frame still lacks, when its header is known

    def feed(self, data: bytes) -> list[Frame]:
        if self._buf:
            self._buf += data  # a large frame arriving in many chunks: no quadratic copying
            if len(self._buf) < self._need:
                return []
            buf: bytes = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data
        self._need = 0
        out: list[Frame] = []
        pos, total = 0, len(buf)
        while total - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if total - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif length == 127:
                if total - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if length > self._max:
                raise FrameTooLarge(f"a frame of {length} bytes (the cap is {self._max})")
            masked = bool(b1 & 0x80)
            if masked:
                head += 4
            end = pos + head + length
            if end > total:
                self._need = end - pos
                break
            raw = buf if (pos == 0 and end == total) else buf[pos:end]
            out.append(Frame(b0 & 0x0F, bool(b0 & 0x80), raw, head, masked))
            pos = end
        if pos < total:
            self._buf += memoryview(buf)[pos:]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


def frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; masked (with a fresh random key) when the gateway is the client."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + (_xor(payload, key) if payload else b"")


def close_frame(code: int, reason: str = "", *, mask: bool) -> bytes:
    """A Close frame; its reason cut to the 123 bytes a control frame allows, never inside a
    UTF-8 character (a client must reject a reason that is not valid UTF-8)."""
    text = reason.encode()[:123].decode(errors="ignore").encode()
    payload = struct.pack("!H", code) + text if code not in (1005, 1006) else b""
    return frame(CLOSE, payload, mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    (code,) = struct.unpack_from("!H", payload)
    return code, payload[2:].decode(errors="replace")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


# -- the upstream leg: a client handshake over a raw connection ----------------------------------
class NotReached(ConnectionError):
    pass


class HandshakeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body


class Upstream(asyncio.Protocol):
    """The gateway's connection to the streaming host. After the handshake every whole frame
    goes to the consumer's ``on_frames``, and ``on_lost`` is called once, when the connection
    ends; until a consumer ``attach``-es, frames are kept and a lost connection remembered."""

    def __init__(self, max_frame: int) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_frames: Callable[[list[Frame]], None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._on_pause: Callable[[bool], None] | None = None
        self._reader = FrameReader(max_frame)
        self._head = b""
        self._handshake: asyncio.Future[tuple[int, CIMultiDict[str], bytes]] | None = None
        self._open = False
        self._early: list[Frame] = []
        self._lost = False

    def attach(
        self,
        on_frames: Callable[[list[Frame]], None],
        on_lost: Callable[[], None],
        on_pause: Callable[[bool], None] | None = None,
    ) -> None:
        self._on_frames, self._on_lost, self._on_pause = on_frames, on_lost, on_pause
        early, self._early = self._early, []
        if early:
            on_frames(early)
        if self._lost:
            on_lost()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._open:
            self._frames(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self._fail(ConnectionError("upstream's handshake answer is too long"))
            return
        try:
            status, _, headers, _ = parse_head(self._head[:end])
        except (ValueError, IndexError):
            status, headers = 502, CIMultiDict()
        rest = self._head[end + 4 :]
        self._head = b""
        if status == 101:
            self._open = True
            if rest:
                self._frames(rest)
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result((status, headers, rest))

    def _frames(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameTooLarge:
            self.write(close_frame(1009, "message too big", mask=True))
            self.close()
            return
        if self._on_frames is None:
            self._early.extend(frames)
        elif frames:
            self._on_frames(frames)

    def _fail(self, exc: BaseException) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("upstream closed the connection during the handshake"))
        if self._open:
            self._open = False
            if self._on_lost is None:
                self._lost = True
            else:
                self._on_lost()

    def pause_writing(self) -> None:
        if self._on_pause is not None:
            self._on_pause(True)

    def resume_writing(self) -> None:
        if self._on_pause is not None:
            self._on_pause(False)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()


async def connect(
    url: URL,
    headers: dict[str, str],
    *,
    timeout_s: float,
    max_frame: int,
    ssl_context: ssl.SSLContext | None = None,
) -> Upstream:
    """Open a WebSocket to ``url`` (ws:// or wss://). ``NotReached``: no connection, so the
    request never reached upstream; ``HandshakeRefused``: upstream's HTTP answer was not 101;
    ``TimeoutError`` / ``ConnectionError``: connected, but the handshake never ended."""
    loop = asyncio.get_running_loop()
    secure = url.scheme == "wss"
    host = url.raw_host or ""  # IDNA, as DNS and TLS want it
    port = url.port or (443 if secure else 80)
    if secure and ssl_context is None:
        ssl_context = default_tls()
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {url.raw_path_qs} HTTP/1.1",
        f"Host: {url.host_port_subcomponent}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError as exc:  # HTTP/1.1 headers are latin-1; never sent
        raise NotReached("a header the request cannot carry (not latin-1)") from exc
    proto = Upstream(max_frame)
    deadline = loop.time() + timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: proto, host, port, ssl=ssl_context if secure else None,
                server_hostname=host if secure else None,
            )  # fmt: skip
    except (OSError, TimeoutError) as exc:
        raise NotReached(f"{type(exc).__name__}: {exc}") from exc
    proto.transport = transport  # uvloop may call connection_made only after this returns
    proto._handshake = loop.create_future()
    proto.transport.write(head)
    try:
        async with asyncio.timeout(max(0.01, deadline - loop.time())):
            status, answer, rest = await proto._handshake
            if status != 101:
                raise HandshakeRefused(status, rest)
            if answer.get("sec-websocket-accept") != accept_key(key):
                raise HandshakeRefused(502, b"upstream's Sec-WebSocket-Accept does not match")
            if answer.get("sec-websocket-extensions"):
                raise HandshakeRefused(502, b"upstream chose an extension the gateway did not offer")
    except BaseException:
        proto.close()
        raise
    return proto
