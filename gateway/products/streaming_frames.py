"""The relay of a streaming session: the client's frames and upstream's, forwarded both
ways whole and unchanged (only text and control frames are read), the upstream session
opened and the kept backlog replayed at its pace. Part of ``_Session`` (streaming_relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import WSCloseCode

from ..errors import GatewayError
from ..proxy import ws_wire
from .streaming_session import (
    AUDIO,
    ENDED,
    FINAL_CONT_MASKED,
    FRAME_COST,
    MESSAGE,
    PASS_HEADERS,
    READ_MAX,
    RELAYING,
    REPLAYING,
    SHUTDOWN_REASON,
    SHUTTING_DOWN,
    TERMINATE_KIND,
    UPSTREAM_READ_MAX,
    _SessionState,
    _usage,
)


class _Relaying(_SessionState):
    """Frames both ways, and the upstream session opened and replayed to."""

    def on_client_frames(self, frames: list[ws_wire.Frame]) -> None:
        if self.client_gone:
            return  # after its Close, nothing it sends counts
        now = self.last_seen = time.monotonic()
        for f in frames:
            op = f.opcode
            if op == ws_wire.BINARY:
                self.last_audio = now
                self.fragment = AUDIO
                self._client_data(now, AUDIO, f)
            elif op == ws_wire.TEXT:
                kind = MESSAGE
                if f.fin and f.size <= READ_MAX:  # a bigger one is forwarded unread
                    data = f.payload()
                    if b"Terminate" in data and streaming_relay._kind(data) == "Terminate":
                        kind = TERMINATE_KIND
                self.fragment = MESSAGE
                self._client_data(now, kind, f)
            elif op == ws_wire.CONT:  # the rest of a fragmented message: of the same kind
                if self.fragment == AUDIO:
                    self.last_audio = now
                self._client_data(now, self.fragment, f)
            elif op == ws_wire.PING:
                self._to_client(ws_wire.frame(ws_wire.PONG, f.payload(), mask=False))
            elif op == ws_wire.CLOSE:
                try:
                    code, _ = ws_wire.check_close(f.payload())
                except ws_wire.ProtocolError as exc:
                    self.client_broke(exc.code, f"aai-gateway: {exc}")
                    return
                self._close_client(code if code != 1005 else WSCloseCode.OK)
                self.client_went()
                return

    def _send_upstream(self, kind: int, f: ws_wire.Frame) -> None:
        up = self.upstream
        if up is None or up.closed or self.terminated:
            return
        # Upstream must see well-formed messages even when frames were dropped (a full
        # buffer, a cut replay): a continuation whose start was dropped is dropped too, and
        # a message left open is ended (an empty final continuation) before the next one.
        if f.opcode == ws_wire.CONT:
            if not self.upstream_open:
                return
        elif self.upstream_open:
            up.write(FINAL_CONT_MASKED)
        self.upstream_open = not f.fin
        up.write(f.raw)
        r = self.relay
        if kind == AUDIO:
            r._frames_audio.inc()
            r._metrics.session_bytes.inc(f.size)
        else:
            r._frames_message.inc()
            if kind == TERMINATE_KIND:
                self.terminated = True
                self.terminated_at = time.monotonic()

    def on_upstream_frames(self, frames: list[ws_wire.Frame]) -> None:
        up = self.upstream
        assert up is not None
        for f in frames:
            op = f.opcode
            if op == ws_wire.TEXT:
                ended = (
                    f.size <= UPSTREAM_READ_MAX
                    and b"Termination" in f.raw
                    and streaming_relay._kind(f.payload()) == "Termination"
                )
                if ended:
                    self.relay._frames_termination.inc()
                    self.usage = _usage(f.payload())
                self.client_open, self.skip_cont = not f.fin, False
                self._to_client(f.raw)
                if ended:
                    self.termination.set()
            elif op == ws_wire.BINARY:
                self.client_open, self.skip_cont = not f.fin, False
                self._to_client(f.raw)
            elif op == ws_wire.CONT:
                if self.skip_cont:  # the gateway ended this message to tell the client something
                    self.skip_cont = not f.fin
                    continue
                self.client_open = not f.fin
                self._to_client(f.raw)
            elif op == ws_wire.PING:
                up.write(ws_wire.frame(ws_wire.PONG, f.payload(), mask=True))
            elif op == ws_wire.CLOSE:
                try:
                    self.upstream_close = ws_wire.check_close(f.payload())
                except ws_wire.ProtocolError as exc:
                    self._upstream_broke(exc)
                    return
                up.write(ws_wire.close_frame(self.upstream_close[0], mask=True))
                up.close()
                return

    def _upstream_broke(self, exc: ws_wire.ProtocolError) -> None:
        """Upstream sent a frame RFC 6455 forbids (a buggy upstream): it is not forwarded; the
        upstream session still ends with Terminate (billing), then the connection closes
        with the error's code; the client is closed with 1011, told why."""
        up = self.upstream
        if up is None:
            return
        self.end_reason = "upstream_error"
        self.upstream_close = (1011, f"aai-gateway: the streaming service broke the protocol ({exc})")
        if self.replaying is not None:
            self.replaying.cancel()
        self._write_terminate(up)
        up.write(ws_wire.close_frame(exc.code, str(exc), mask=True))
        up.close()

    def _upstream_lost(self) -> None:
        self.termination.set()
        self.upstream_lost.set()

    def _pause_client(self, paused: bool) -> None:
        """Upstream reads slower than the client sends: stop reading the client meanwhile."""
        self.paused = paused
        with contextlib.suppress(AttributeError, RuntimeError):
            if paused:
                self.transport.pause_reading()  # type: ignore[union-attr]
            else:
                self.transport.resume_reading()  # type: ignore[union-attr]

    async def _open_and_relay(self) -> None:
        relay = self.relay
        headers = {k: self.request.headers[k] for k in PASS_HEADERS if k in self.request.headers}
        assert self.connected is not None
        try:
            self.upstream = await ws_wire.handshake(
                self.connected,
                relay._upstream_url(self.request),
                headers,
                timeout_s=relay._cfg.upstream.connect_timeout_s,
            )
        except ws_wire.HandshakeRefused as exc:
            self.end_reason = "upstream_error"
            await self._end_lease()  # upstream answered (the request counted); no session open
            self._send_error(1008 if exc.status in (401, 403) else 1011, f"upstream refused: {exc.status}")
            return
        except ws_wire.NotReached as exc:  # never reached upstream: the token comes back
            self.end_reason = "upstream_error"
            assert self.grant is not None
            with contextlib.suppress(GatewayError):
                await relay._engine.release(self.grant)
            self._send_error(1011, f"aai-gateway: could not reach the streaming service ({exc})")
            return
        except (TimeoutError, ConnectionError) as exc:
            self.end_reason = "upstream_error"
            await self._end_lease()
            self._send_error(
                1011, f"aai-gateway: the streaming service did not answer ({type(exc).__name__})"
            )
            return
        up = self.upstream
        self.opened_at = self.last_audio = self.renewed = time.monotonic()
        relay._metrics.sessions_admitted.inc()
        up.attach(self.on_upstream_frames, self._upstream_lost, self._pause_client, self._upstream_broke)
        if self.backlog:
            self.state = REPLAYING
            self.replaying = self._spawn(self._replay())
        else:
            self.state = RELAYING
        if self.client_gone or self.stopping:  # it left, or the gateway is stopping, meanwhile
            if self.end_reason == "client":
                self.end_reason = "client_gone"
            self._spawn(self._terminate_upstream())
        try:
            await self.upstream_lost.wait()
        finally:
            self.state = ENDED
            self.closed_at = time.monotonic()
            up.close()
            code, reason = self.upstream_close or (
                1011,
                "aai-gateway: the streaming service's connection was lost",
            )
            if code not in (WSCloseCode.OK, 1005) and self.end_reason == "client":
                self.end_reason = "upstream_error"
            if self.end_reason == "shutdown" and code in (WSCloseCode.OK, 1005):
                code, reason = SHUTTING_DOWN, SHUTDOWN_REASON  # upstream ended it because the gateway asked
            self._close_client(code if code != 1005 else WSCloseCode.OK, reason)
            await self._end_lease()

    async def _replay(self) -> None:
        """The backlog, with its original spacing: never faster than the client sent it."""
        first_at, start = self.backlog[0][0], time.monotonic()
        self.replay_lag = start - first_at
        replayed = self.relay._metrics.child(self.relay._metrics.session_frames, "replayed")
        while self.backlog:
            at, kind, f = self.backlog[0]
            delay = start + (at - first_at) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.backlog.popleft()
            cost = f.size + FRAME_COST
            self.backlog_bytes -= cost
            self.relay._budget.give(cost)
            self._send_upstream(kind, f)
            if kind == AUDIO:
                self.last_audio = time.monotonic()  # replayed audio is audio: not idle
            replayed.inc()
        self.state = RELAYING


# At the end: streaming_relay imports this module. Frames are classified through
# ``streaming_relay._kind``, where tests replace it.
from . import streaming_relay  # noqa: E402
