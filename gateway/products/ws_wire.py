"""WebSocket on the wire (RFC 6455), just what a frame-forwarding relay needs.

The streaming relay does not decode and re-encode every audio frame: a client's frames are
masked, which is exactly what upstream must receive, and upstream's are unmasked, which is
exactly what the client must receive. So the relay reads frame *boundaries* (headers only),
forwards each frame's bytes unchanged, and unmasks only the few small frames it must read
(text messages such as ``Terminate`` / ``Termination``, and control frames), in C (aiohttp's
``websocket_mask``). That halves the relay's CPU per frame compared with a full WebSocket
stack on each side (bench/streaming_sessions.py) and keeps the timing of every frame as the
client sent it.

No extension is ever negotiated on either side (no permessage-deflate: audio does not
compress, and a compressed frame could not be forwarded as is), so the two legs carry the
same frames.

- ``FrameReader``: bytes in, whole frames out (``Frame``), checked (RFC 6455 section 5), with
  a size cap and, optionally, an instance-wide ``Budget`` for unfinished frames;
- ``check_close()``: a received Close frame's code and reason, as RFC 6455 7.4 allows them;
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


class ProtocolError(Exception):
    """The peer broke RFC 6455: the connection fails, closed with ``code``. ``frames``: the
    whole frames read before the bad one (the caller may still act on them)."""

    code = 1002  # protocol error

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.frames: list[Frame] = []


class FrameTooLarge(ProtocolError):
    code = 1009  # message too big


class OverBudget(ProtocolError):
    """An unfinished frame would take the instance past its cap on bytes held for its peers."""

    code = 1008  # policy violation


class InvalidText(ProtocolError):
    code = 1007  # not UTF-8 where UTF-8 is required (a close reason)


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
        return unmask(data, self.raw[self.head - 4 : self.head])

    @property
    def size(self) -> int:
        return len(self.raw) - self.head


def unmask(data: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3 masking (its own inverse), in C: aiohttp's Cython ``websocket_mask``."""
    buf = bytearray(data)
    _mask(key, buf)
    return bytes(buf)


def _mask_python(mask: bytes, data: bytearray) -> None:  # only when aiohttp's is missing
    n = len(data)
    stream = (mask * (n // 4 + 1))[:n]
    data[:] = (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


try:
    from aiohttp._websocket.helpers import websocket_mask as _mask  # masks a bytearray in place
except ImportError:  # pragma: no cover
    _mask = _mask_python


def _first_byte_error(b0: int) -> str:
    """What is wrong with a frame's first byte (FIN, RSV1-3, opcode), or ""."""
    op = b0 & 0x0F
    if b0 & 0x70:
        return "RSV bits set, but no extension was negotiated"
    if 3 <= op <= 7 or op >= 0xB:
        return f"reserved opcode {op:#x}"
    if op >= 8 and not b0 & 0x80:
        return "a fragmented control frame"
    return ""


_B0_ERROR = tuple(_first_byte_error(b) for b in range(256))  # one lookup per frame


class Budget:
    """Bytes held for peers across all the connections of an instance, under a cap."""

    __slots__ = ("cap", "used")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.cap:
            return False
        self.used += n
        return True

    def force(self, n: int) -> None:
        """Held regardless of the cap (a few bytes that must never be dropped)."""
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class FrameReader:
    """Incremental: ``feed(chunk)`` returns the frames the chunk completed, checked as RFC
    6455 section 5 requires of a peer that negotiated no extension: no RSV bit, no reserved
    opcode, control frames final and at most 125 bytes, continuation frames only inside a
    fragmented message and no new message inside one, and every frame masked (``masked=True``:
    a server reading its client) or none (``masked=False``: a client reading its server;
    ``None``: not checked). A bad frame raises ``ProtocolError`` (``FrameTooLarge`` over
    ``max_frame``; ``OverBudget`` when an unfinished frame's bytes cannot be held within
    ``budget``), and so does every feed after it. Only frame headers are read."""

    __slots__ = ("_buf", "_max", "_need", "_mask_bit", "_open", "_budget", "_held", "_error")

    def __init__(self, max_frame: int, *, masked: bool | None = None, budget: Budget | None = None) -> None:
        self._buf = bytearray()  # an incomplete frame
        self._max = max_frame
        self._need = 0  # bytes the incomplete frame still lacks, when its header is known
        self._mask_bit = -1 if masked is None else (0x80 if masked else 0)
        self._open = False  # inside a fragmented message
        self._budget = budget
        self._held = 0  # bytes of _buf counted in the budget
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise type(self._error)(str(self._error))
        if self._buf:
            if len(self._buf) + len(data) < self._need:  # still unfinished: held
                if not self._hold(len(data)):
                    raise self._fail(OverBudget("the gateway holds too many unfinished frames"), [])
                self._buf += data  # a large frame arriving in many chunks: no quadratic copying
                return []
            self._buf += data
            buf: bytes = bytes(self._buf)
            self._buf.clear()
            self._release()
        else:
            buf = data
        self._need = 0
        out: list[Frame] = []
        pos, total = 0, len(buf)
        while total - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            error = _B0_ERROR[b0]
            if error:
                raise self._fail(ProtocolError(error), out)
            if self._mask_bit >= 0 and (b1 & 0x80) != self._mask_bit:
                error = "an unmasked client frame" if self._mask_bit else "a masked server frame"
                raise self._fail(ProtocolError(error), out)
            op = b0 & 0x0F
            length, head = b1 & 0x7F, 2
            if op >= 8:
                if length > 125:
                    raise self._fail(ProtocolError("a control frame over 125 bytes"), out)
            elif (op == CONT) != self._open:
                error = "a continuation frame outside a message" if op == CONT else "a new message inside one"
                raise self._fail(ProtocolError(error), out)
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
                raise self._fail(FrameTooLarge(f"a frame of {length} bytes (the cap is {self._max})"), out)
            masked = bool(b1 & 0x80)
            if masked:
                head += 4
            end = pos + head + length
            if end > total:
                self._need = end - pos
                break
            raw = buf if (pos == 0 and end == total) else buf[pos:end]
            fin = bool(b0 & 0x80)
            if op < 8:
                self._open = not fin
            out.append(Frame(op, fin, raw, head, masked))
            pos = end
        if pos < total:
            if not self._hold(total - pos):
                raise self._fail(OverBudget("the gateway holds too many unfinished frames"), out)
            self._buf += memoryview(buf)[pos:]
        return out

    def _hold(self, n: int) -> bool:
        if self._budget is not None:
            if not self._budget.take(n):
                return False
            self._held += n
        return True

    def _release(self) -> None:
        if self._budget is not None and self._held:
            self._budget.give(self._held)
        self._held = 0

    def _fail(self, exc: ProtocolError, frames: list[Frame]) -> ProtocolError:
        exc.frames = frames
        self._error = exc
        self.close()
        return exc

    def close(self) -> None:
        """Drop the unfinished frame (its bytes leave the budget); safe to call again."""
        self._buf = bytearray()
        self._need = 0
        self._release()

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
    return head + key + (unmask(payload, key) if payload else b"")


def close_frame(code: int, reason: str = "", *, mask: bool) -> bytes:
    """A Close frame; its reason cut to the 123 bytes a control frame allows, never inside a
    UTF-8 character (a client must reject a reason that is not valid UTF-8)."""
    text = reason.encode()[:123].decode(errors="ignore").encode()
    payload = struct.pack("!H", code) + text if code not in (1005, 1006) else b""
    return frame(CLOSE, payload, mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Lenient: (code, reason) of any Close body; 1005 when it has none."""
    if len(payload) < 2:
        return 1005, ""
    (code,) = struct.unpack_from("!H", payload)
    return code, payload[2:].decode(errors="replace")


def valid_close_code(code: int) -> bool:
    """A code an endpoint may send (RFC 6455 7.4 and IANA's registry): 1000-1003, 1007-1014,
    and 3000-4999 (registered and private use). Never 1004-1006 or 1015, nor anything else."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def check_close(payload: bytes) -> tuple[int, str]:
    """Strict: (code, reason) of a received Close body (1005 when it has none), or
    ``ProtocolError``: a 1-byte body, a code no endpoint may send; ``InvalidText`` (1007): a
    reason that is not UTF-8."""
    if not payload:
        return 1005, ""
    if len(payload) < 2:
        raise ProtocolError("a close frame with a 1-byte body")
    (code,) = struct.unpack_from("!H", payload)
    if not valid_close_code(code):
        raise ProtocolError(f"close code {code} is not one an endpoint may send")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise InvalidText("a close reason that is not UTF-8") from None


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
    ends; until a consumer ``attach``-es, frames are kept and a lost connection remembered.

    Upstream's frames are checked as strictly as a client's (``FrameReader``, unmasked): a
    bad one is never delivered; the frames before it are, then the consumer's ``on_error``
    (which must end the connection); without one, the connection is closed with the
    error's code."""

    def __init__(self, max_frame: int) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_frames: Callable[[list[Frame]], None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._on_pause: Callable[[bool], None] | None = None
        self._on_error: Callable[[ProtocolError], None] | None = None
        self._reader = FrameReader(max_frame, masked=False)
        self._head = b""
        self._handshake: asyncio.Future[tuple[int, CIMultiDict[str], bytes]] | None = None
        self._open = False
        self._early: list[Frame] = []
        self._lost = False
        self.error: ProtocolError | None = None  # the first bad frame upstream sent

    def attach(
        self,
        on_frames: Callable[[list[Frame]], None],
        on_lost: Callable[[], None],
        on_pause: Callable[[bool], None] | None = None,
        on_error: Callable[[ProtocolError], None] | None = None,
    ) -> None:
        self._on_frames, self._on_lost, self._on_pause = on_frames, on_lost, on_pause
        self._on_error = on_error
        early, self._early = self._early, []
        if early:
            on_frames(early)
        if self.error is not None:
            self._broke(self.error)
        if self._lost:
            on_lost()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._open:
            self._frames(data)
            return
        if self._handshake is None:  # upstream spoke before it was asked anything
            self._fail(ConnectionError("upstream sent bytes before the request"))
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
        if self.error is not None:
            return  # past a bad frame, nothing upstream sends is read
        try:
            frames = self._reader.feed(data)
        except ProtocolError as exc:
            self.error = exc
            self._deliver(exc.frames)
            if self._on_frames is not None:
                self._broke(exc)
            return
        self._deliver(frames)

    def _deliver(self, frames: list[Frame]) -> None:
        if self._on_frames is None:
            self._early.extend(frames)
        elif frames:
            self._on_frames(frames)

    def _broke(self, exc: ProtocolError) -> None:
        if self._on_error is not None:
            self._on_error(exc)
        else:
            self.write(close_frame(exc.code, str(exc), mask=True))
            self.close()

    def _fail(self, exc: BaseException) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._reader.close()
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
    """Open a WebSocket to ``url`` (ws:// or wss://): ``open_connection`` then ``handshake``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    proto = await open_connection(url, timeout_s=timeout_s, max_frame=max_frame, ssl_context=ssl_context)
    return await handshake(proto, url, headers, timeout_s=deadline - loop.time())


async def open_connection(
    url: URL, *, timeout_s: float, max_frame: int, ssl_context: ssl.SSLContext | None = None
) -> Upstream:
    """The connection (TCP, and TLS for wss://) with nothing sent on it yet: upstream has seen
    no request, so a session admitted meanwhile may still give its token back.
    ``NotReached``: no connection."""
    loop = asyncio.get_running_loop()
    secure = url.scheme == "wss"
    host = url.raw_host or ""  # IDNA, as DNS and TLS want it
    port = url.port or (443 if secure else 80)
    if secure and ssl_context is None:
        ssl_context = default_tls()
    proto = Upstream(max_frame)
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: proto, host, port, ssl=ssl_context if secure else None,
                server_hostname=host if secure else None,
            )  # fmt: skip
    except (OSError, TimeoutError) as exc:
        raise NotReached(f"{type(exc).__name__}: {exc}") from exc
    proto.transport = transport  # uvloop may call connection_made only after this returns
    return proto


async def handshake(proto: Upstream, url: URL, headers: dict[str, str], *, timeout_s: float) -> Upstream:
    """Send the upgrade request on an open connection and read upstream's answer.
    ``NotReached``: nothing was sent (a header the request cannot carry, or the connection
    was closed meanwhile); ``HandshakeRefused``: upstream's HTTP answer was not 101;
    ``TimeoutError`` / ``ConnectionError``: sent, but the handshake never ended."""
    loop = asyncio.get_running_loop()
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
        proto.close()
        raise NotReached("a header the request cannot carry (not latin-1)") from exc
    if proto.closed:
        raise NotReached("the connection closed before the request was sent")
    proto._handshake = loop.create_future()
    assert proto.transport is not None
    proto.transport.write(head)
    try:
        async with asyncio.timeout(max(0.01, timeout_s)):
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
