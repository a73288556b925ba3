"""A streaming session's wait: admission (a token from ``streaming_sessions``, with the
upstream connection opened within the admission's guard), the client's messages kept
meanwhile within the session's and the instance's byte caps, and a Terminate sent before
Begin (answered within the SDK's 5 s). Part of ``_Session`` (streaming_relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import WSCloseCode

from ..admission.engine import format_seconds
from ..errors import GatewayError, RateLimited, StoreUnavailable
from ..proxy import ws_wire
from ..proxy.forward import guard_s
from .streaming_session import (
    AUDIO,
    ENDED,
    FRAME_COST,
    MAX_FRAME,
    RELAYING,
    REPLAYING,
    SHUTDOWN_REASON,
    SHUTTING_DOWN,
    TERMINATE_KIND,
    TERMINATE_WITHIN_S,
    TOO_MANY,
    WAITING,
    _SessionState,
)

# The relay's logger, as before the split: its lines keep their logger name.
log = logging.getLogger("gateway.products.streaming_relay")


class _Waiting(_SessionState):
    """Waiting for admission, keeping the client's messages."""

    async def run(self) -> None:
        relay = self.relay
        cap = relay._s.max_waiting_sessions
        if relay._waiting >= cap:  # checked and counted in one step: no await between
            self.end_reason = "refused"
            self._send_error(TOO_MANY, f"aai-gateway: {cap} sessions already wait on this instance "
                             "(streaming.max_waiting_sessions)")  # fmt: skip
            return
        relay._waiting += 1
        self.queued = True
        admit = asyncio.create_task(self._admit())
        watch = asyncio.create_task(self.left.wait())
        try:
            try:
                done, _ = await asyncio.wait({admit, watch}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                relay._waiting -= 1
                self.queued = False
                if self.give_up is not None:
                    self.give_up.cancel()
            if admit not in done:  # the client left, or ended, while waiting: no session opens
                admit.cancel()
                with contextlib.suppress(asyncio.CancelledError, GatewayError):
                    await admit
                if self.end_reason == "client":
                    self.end_reason = "client_left_waiting"
                if not self.client_gone and self.client_ended:  # a session that never began, ended
                    self._tell({"type": "Termination", "audio_duration_seconds": 0,
                                "session_duration_seconds": 0})  # fmt: skip
                    self._close_client(WSCloseCode.OK)
                return
            try:
                admit.result()
            except ws_wire.NotReached as exc:  # never reached upstream: the token went back
                self.end_reason = "upstream_error"
                self._send_error(1011, f"aai-gateway: could not reach the streaming service ({exc})")
                return
            except RateLimited as exc:
                self.end_reason = "refused"
                waited = format_seconds(self.max_wait_s)
                self._send_error(TOO_MANY, f"aai-gateway: waited {waited}s for the '{exc.limit}' limit")
                return
            except (StoreUnavailable, GatewayError) as exc:
                if relay._handler.draining:  # the engine handed its waiters back
                    self.end_reason = "shutdown"
                    self._send_error(SHUTTING_DOWN, SHUTDOWN_REASON)
                    return
                self.end_reason = "error"
                self._send_error(1011, f"aai-gateway: {exc.message}")
                return
            if self.relay._s.backlog == "drop":
                self._drop_backlog()
            if self.client_gone or (self.client_ended and not any(k == AUDIO for _, k, _ in self.backlog)):
                # Gone, or ended with no audio to send, by the time it was admitted: no
                # session opens, and the admission is handed back.
                self.end_reason = "client_left_waiting"
                assert self.grant is not None
                with contextlib.suppress(GatewayError):
                    await self.relay._engine.release(self.grant)
                if not self.client_gone:
                    self._tell({"type": "Termination", "audio_duration_seconds": 0,
                                "session_duration_seconds": 0})  # fmt: skip
                    self._close_client(WSCloseCode.OK)
                return
            await self._open_and_relay()
        finally:
            self.state = ENDED
            for task in (admit, watch, *self.tasks):
                task.cancel()
            if self.connected is not None and self.upstream is None:  # admitted, never used
                self.connected.close()

    async def _admit(self) -> None:
        """Admitted, with the upstream connection open (TCP and TLS) within the guard of the
        admission (ADMISSION.md I1: upstream counts a session when its upgrade arrives). If
        connecting outlasted the guard, the admission goes back unused and the session is
        admitted again, in its place, with the connection in hand. ``ws_wire.NotReached``:
        no connection (the admission went back)."""
        relay = self.relay
        limits = relay._catalog.session_limits()
        started = time.monotonic()
        relay._metrics.sessions_waiting.inc()
        held: ws_wire.Upstream | None = None
        try:
            while True:
                grant = await relay._engine.admit(
                    limits,
                    max_wait_s=max(0.0, self.max_wait_s - (time.monotonic() - started)),
                    max_depth=relay._cfg.queue.max_depth,
                    group="streaming",
                    owner=self.owner,
                    max_owner_depth=relay._cfg.queue.depth_per_key,
                )
                admitted_at = time.perf_counter()
                conn, held = (held if held is not None and not held.closed else None), None
                try:
                    conn = conn or await ws_wire.open_connection(
                        relay._upstream_url(self.request),
                        timeout_s=relay._cfg.upstream.connect_timeout_s,
                        max_frame=MAX_FRAME,
                    )
                except BaseException:  # nothing was sent upstream: the admission goes back
                    with contextlib.suppress(GatewayError):
                        await relay._engine.release(grant)
                    raise
                if time.perf_counter() - admitted_at <= guard_s(grant):
                    self.grant, self.connected = grant, conn
                    break
                held = conn
                with contextlib.suppress(GatewayError):
                    await relay._engine.release(grant)
                log.info("streaming: connecting outlasted the guard; the session is admitted again")
        finally:
            if held is not None:
                held.close()
            relay._metrics.sessions_waiting.inc(-1)
        relay._metrics.session_wait.observe(time.monotonic() - started)

    def _client_data(self, now: float, kind: int, f: ws_wire.Frame) -> None:
        state = self.state
        if state == RELAYING:
            self._send_upstream(kind, f)
        elif state == WAITING and not self.client_ended:
            self._keep(now, kind, f)
            if kind == TERMINATE_KIND and self.queued:  # (opening upstream: replayed with the rest)
                # Before Begin. The SDK waits 5 s for Termination: the kept audio is
                # transcribed only if admission comes soon enough for its replay (at its
                # pace) to end within TERMINATE_WITHIN_S; else the session ends when that
                # becomes impossible, with no upstream session opened.
                self.client_ended = True
                span = now - self.backlog[0][0]  # how long the replay would take
                nothing = self.relay._s.backlog == "drop" or not any(k == AUDIO for _, k, _ in self.backlog)
                if nothing or span >= TERMINATE_WITHIN_S:
                    self._give_up()
                else:
                    loop = asyncio.get_running_loop()
                    self.give_up = loop.call_later(TERMINATE_WITHIN_S - span, self._give_up)
        elif state == REPLAYING:
            if kind == TERMINATE_KIND and self.replay_lag > TERMINATE_WITHIN_S:
                # Replayed at its pace, this Terminate would reach upstream after the SDK
                # stopped waiting: the rest of the backlog is dropped, Terminate goes now.
                if self.replaying is not None:
                    self.replaying.cancel()
                self._drop_backlog()
                self.state = RELAYING
                self._send_upstream(kind, f)
                return
            self._keep(now, kind, f)  # after the backlog, at the same pace

    def _keep(self, now: float, kind: int, f: ws_wire.Frame) -> None:
        """Keep a frame for the replay, within ``streaming.buffer_bytes`` for the session and
        ``streaming.max_buffered_bytes`` for the instance; over either, audio and messages
        are dropped (the oldest audio is what matters most), a Terminate never is."""
        cost = f.size + FRAME_COST
        budget = self.relay._budget
        if kind == TERMINATE_KIND:
            budget.force(cost)
        elif self.backlog_bytes + cost > self.relay._s.buffer_bytes or not budget.take(cost):
            m = self.relay._metrics
            m.child(m.session_frames, "dropped").inc()
            return
        self.backlog.append((now, kind, f))
        self.backlog_bytes += cost

    def _give_up(self) -> None:
        """A session that ended before Begin ends now: nothing is replayed (nobody would read
        the transcript), no upstream session opens, the client gets Termination."""
        if self.queued:
            self._drop_backlog()
            self.left.set()

    def _drop_backlog(self) -> None:
        if self.backlog:
            m = self.relay._metrics
            m.child(m.session_frames, "dropped").inc(sum(1 for _, k, _ in self.backlog if k == AUDIO))
        self.backlog.clear()
        self.relay._budget.give(self.backlog_bytes)
        self.backlog_bytes = 0

    def release(self) -> None:
        """The session is over: what it held leaves the instance's byte budget."""
        self._drop_backlog()
        self.leg.reader.close()
