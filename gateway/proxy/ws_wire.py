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

The frames (everything above but ``connect()``) are ws_frames.py's; this module is the
upstream leg, and every name is imported from here (``from ..proxy import ws_wire``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from collections.abc import Callable
from typing import cast

from multidict import CIMultiDict
from yarl import URL

from .http1 import default_tls, parse_head
from .ws_frames import (
    BINARY,
    CLOSE,
    CONT,
    GUID,
    PING,
    PONG,
    TEXT,
    Budget,
    Frame,
    FrameReader,
    FrameTooLarge,
    InvalidText,
    OverBudget,
    ProtocolError,
    _mask,
    _mask_python,
    accept_key,
    check_close,
    close_frame,
    frame,
    parse_close,
    unmask,
    valid_close_code,
)

# Names that lived here before the frames moved to ws_frames.py, used as ``ws_wire.X`` by the
# streaming relay, the tests and the benchmarks.
__all__ = [
    "BINARY",
    "CLOSE",
    "CONT",
    "GUID",
    "PING",
    "PONG",
    "TEXT",
    "Budget",
    "Frame",
    "FrameReader",
    "FrameTooLarge",
    "HandshakeRefused",
    "InvalidText",
    "NotReached",
    "OverBudget",
    "ProtocolError",
    "Upstream",
    "_mask",
    "_mask_python",
    "accept_key",
    "check_close",
    "close_frame",
    "connect",
    "frame",
    "handshake",
    "open_connection",
    "parse_close",
    "unmask",
    "valid_close_code",
]

MAX_HEAD = 64 * 1024  # the upstream handshake's response head


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
