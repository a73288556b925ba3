"""What one streaming session is made of, shared by the modules that handle it: the
constants, the session's states, the client's leg (frames read from its connection), and the
session's state with the few writes every part makes to the client. The behaviour lives in
streaming_wait.py (waiting and admission), streaming_frames.py (the relay, frames both ways)
and streaming_guards.py (idle, maximum duration, spend caps, pings, ending); streaming_relay.py
puts them together as ``_Session``, one class, so a session is still one object.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from ..admission.engine import Grant
from ..proxy import ws_wire

if TYPE_CHECKING:
    from .streaming_relay import StreamingRelay

PASS_HEADERS = (hdrs.AUTHORIZATION, "AssemblyAI-Version")
TOO_MANY = 3009
# A graceful shutdown (SIGTERM) ends every session with this code: "try again later" (RFC 6455
# registry), which the Python SDK names ("Temporary server condition...") and the npm SDK
# retries when it comes before Begin; unlike 1000 it tells the app that it did not end the
# session itself, so it reconnects (to another instance) to go on.
SHUTTING_DOWN = 1013
SHUTDOWN_REASON = "aai-gateway: this gateway instance is shutting down; connect again"
TERMINATE = b'{"type": "Terminate"}'
FINAL_CONT_MASKED = ws_wire.frame(ws_wire.CONT, b"", mask=True)  # ends a fragmented message
FINAL_CONT = ws_wire.frame(ws_wire.CONT, b"", mask=False)
MAX_FRAME = 8 * 1024 * 1024
CLIENT_BUFFER = 4 * 1024 * 1024  # unread bytes to a client before it is cut off
LINGER_S = 1.0
PING_FRAME = ws_wire.frame(ws_wire.PING, b"aai-gateway", mask=False)
AUDIO, MESSAGE, TERMINATE_KIND = 0, 1, 2  # what a client frame is, for the relay
# Only a client's final text frames up to this size are unmasked and read (for Terminate,
# 21 bytes; the SDK's messages are all small): a bigger one is forwarded unread. Upstream's
# text frames are read for Termination up to UPSTREAM_READ_MAX.
READ_MAX = 1024
UPSTREAM_READ_MAX = 64 * 1024
FRAME_COST = 64  # a kept frame costs its payload plus this (its bookkeeping), so empty frames count
# The SDK waits 5 s for Termination after its Terminate (then stops reading): a Terminate
# the gateway keeps must reach upstream within this long, less than that by a second for
# upstream's answer; else the audio kept before it is dropped and the session ends at once.
TERMINATE_WITHIN_S = 4.0


class _ClientLeg:
    """The client's connection after the handshake: aiohttp hands every chunk it reads to
    this parser (``RequestHandler.set_parser``, as its own WebSocket reader gets them).
    Frames are checked as RFC 6455 requires (ws_wire.FrameReader, masked): a bad one closes
    the client with 1002 (1009 over the size cap, 1008 past the instance's byte cap) and
    ends the session, its upstream session terminated."""

    __slots__ = ("session", "reader", "broken")

    def __init__(self, session: _SessionState, max_frame: int, budget: ws_wire.Budget) -> None:
        self.session = session
        self.reader = ws_wire.FrameReader(max_frame, masked=True, budget=budget)
        self.broken = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.broken:
            return False, b""  # past a frame it refused, the stream cannot be read
        try:
            frames = self.reader.feed(data)
        except ws_wire.ProtocolError as exc:
            self.broken = True
            if exc.frames:
                self.session.on_client_frames(exc.frames)
            self.session.client_broke(exc.code, f"aai-gateway: {exc}")
            return False, b""
        if frames:
            self.session.on_client_frames(frames)
        return False, b""

    def feed_eof(self) -> None:
        self.session.client_went()


WAITING, REPLAYING, RELAYING, ENDED = "waiting", "replaying", "relaying", "ended"


class _SessionState:
    """One client's session: its state, and what it writes to the client. The methods below
    the writes are declared here for the parts that call one another (defined in
    streaming_wait.py, streaming_frames.py, streaming_guards.py; ``_Session`` joins them)."""

    def __init__(
        self,
        relay: StreamingRelay,
        request: web.Request,
        *,
        owner: str,
        max_wait_s: float,
    ) -> None:
        self.relay = relay
        self.request = request
        self.transport = request.transport  # the client's connection
        self.owner = owner
        self.max_wait_s = max_wait_s
        self.grant: Grant | None = None
        self.usage: dict[str, float] | None = None  # from upstream's Termination
        self.id = secrets.token_hex(12)  # the session's usage event
        self.state = WAITING
        self.opened_at = 0.0
        self.closed_at = 0.0
        self.upstream: ws_wire.Upstream | None = None
        self.connected: ws_wire.Upstream | None = None  # admitted: open, the upgrade not yet sent
        self.upstream_close: tuple[int, str] | None = None
        self.backlog: deque[tuple[float, int, ws_wire.Frame]] = deque()  # (at, kind, frame)
        self.backlog_bytes = 0
        self.client_gone = False  # it closed, or its connection ended
        self.client_closed = False  # the gateway sent it a close frame
        self.client_ended = False  # it sent Terminate before Begin
        self.terminated = False  # a Terminate went upstream
        self.end_reason = "client"  # it sent Terminate, unless set otherwise
        self.last_audio = self.last_seen = time.monotonic()
        self.left = asyncio.Event()  # the client left (or ended before any audio) while waiting
        self.termination = asyncio.Event()  # upstream's Termination (or its closing) was seen
        self.upstream_lost = asyncio.Event()
        self.replaying: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False  # the gateway is ending it
        self.warned = False  # of the maximum duration
        self.renewed = 0.0  # the open-sessions lease
        self.pinged = 0.0
        self.terminated_at = 0.0  # when a Terminate went upstream
        self.paused = False  # reading the client, while upstream reads slower
        self.fragment = AUDIO  # what a continuation frame continues
        self.gone = asyncio.Event()  # client_gone, awaitable
        self.replay_lag = 0.0  # how far the replay runs behind the client
        self.give_up: asyncio.TimerHandle | None = None  # a Terminate's wait for admission
        self.queued = False  # waiting for admission (WAITING also covers opening upstream)
        self.upstream_open = False  # a fragmented message forwarded upstream is not finished
        self.client_open = False  # nor one forwarded to the client
        self.skip_cont = False  # the rest of upstream's message, after the gateway ended it
        self.leg = _ClientLeg(self, MAX_FRAME, relay._budget)

    # -- to the client -------------------------------------------------------------------
    def _to_client(self, data: bytes) -> None:
        t = self.transport
        if not self.client_gone and not self.client_closed and t is not None and not t.is_closing():
            t.write(data)
            if t.get_write_buffer_size() > CLIENT_BUFFER:  # it does not read what it is sent
                self.client_broke(1008, "aai-gateway: the client does not read its messages")

    def _tell(self, message: dict[str, Any]) -> None:
        if self.client_open:  # inside upstream's fragmented message: end it first, skip its rest
            self._to_client(FINAL_CONT)
            self.client_open, self.skip_cont = False, True
        self._to_client(ws_wire.frame(ws_wire.TEXT, json.dumps(message).encode(), mask=False))

    def _send_error(self, code: int, reason: str) -> None:
        self._tell({"type": "Error", "error_code": code, "error": reason})
        self._close_client(code, reason)

    def _close_client(self, code: int, reason: str = "") -> None:
        if self.client_closed:
            return
        self.client_closed = True
        t = self.transport
        if not self.client_gone and t is not None and not t.is_closing():
            t.write(ws_wire.close_frame(code, reason, mask=False))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def client_went(self) -> None:
        """The client closed, or its connection ended."""
        if self.client_gone:
            return
        self.client_gone = True
        self.gone.set()
        if self.state == WAITING:
            self.left.set()
        elif self.state in (REPLAYING, RELAYING) and not self.terminated:
            # It did not end the session: the gateway does (billing).
            self.end_reason = "client_gone"
            self._spawn(self._terminate_upstream())

    def client_broke(self, code: int, reason: str) -> None:
        self._close_client(code, reason)
        self.client_went()

    # -- defined by the other parts of a session (see the class docstring) -----------------
    def on_client_frames(self, frames: list[ws_wire.Frame]) -> None:
        raise NotImplementedError

    def _client_data(self, now: float, kind: int, f: ws_wire.Frame) -> None:
        raise NotImplementedError

    def _drop_backlog(self) -> None:
        raise NotImplementedError

    def _send_upstream(self, kind: int, f: ws_wire.Frame) -> None:
        raise NotImplementedError

    async def _open_and_relay(self) -> None:
        raise NotImplementedError

    async def _terminate_upstream(self) -> None:
        raise NotImplementedError

    def _write_terminate(self, up: ws_wire.Upstream) -> None:
        raise NotImplementedError

    async def _end_lease(self) -> None:
        raise NotImplementedError


def _usage(termination: bytes) -> dict[str, float] | None:
    doc = json.loads(termination)
    try:
        usage = {
            "session_seconds": float(doc["session_duration_seconds"]),
            "audio_seconds": float(doc["audio_duration_seconds"]),
        }
    except (KeyError, TypeError, ValueError):
        return None
    # A hostile or buggy upstream's figures are not the bill: the gateway's own measure is.
    return usage if all(0 <= v < 86400 for v in usage.values()) else None


def _kind(data: bytes) -> str:
    """The ``type`` of a JSON message, or ""."""
    if not data.startswith(b"{"):
        return ""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return ""
    return str(doc.get("type", "")) if isinstance(doc, dict) else ""
