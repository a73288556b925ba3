"""The guards of a streaming session, run by the relay's sweep: pings (a dead client is
found), the idle timeout, the maximum duration (warned first), the spend caps, the
open-sessions lease; and the ways a session ends from the gateway's side (stop, abort,
Terminate upstream, the linger for the client's Close). Part of ``_Session``
(streaming_relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import WSCloseCode

from ..errors import GatewayError
from ..identity import identity_of
from ..proxy import ws_wire
from .catalog import SESSION_LEASE_S
from .streaming_session import (
    ENDED,
    FINAL_CONT_MASKED,
    LINGER_S,
    PING_FRAME,
    SHUTDOWN_REASON,
    SHUTTING_DOWN,
    TERMINATE,
    WAITING,
    _SessionState,
)


class _Guarding(_SessionState):
    """The guard and the gateway's ways of ending a session."""

    async def _end_lease(self) -> None:
        """The session is over: its open-sessions lease (if that limit is on) ends; its
        new-session token stays spent."""
        limit = self.relay._catalog.open_sessions
        if limit is not None and self.grant is not None:
            with contextlib.suppress(GatewayError):
                await self.relay._engine.release(self.grant, [limit])

    async def _renew_lease(self) -> None:
        limit = self.relay._catalog.open_sessions
        if limit is not None and self.grant is not None:
            with contextlib.suppress(GatewayError):
                # The session is open: a lease a Redis failover lost is restored.
                await self.relay._engine.store.renew(self.grant.ticket, limit, limit.lease_ms, create=True)

    def check(self, now: float) -> None:
        """The guard, run by the relay's sweep (one timer for all sessions). A quiet client
        is pinged, and one that answers nothing for two ping intervals (a dead TCP
        connection) is gone; idle audio and the maximum duration end the session, the client
        told why; the open-sessions lease is renewed. A session whose client is gone after
        its Terminate is closed once upstream had ``terminate_wait_s`` to answer."""
        if self.stopping or self.state == ENDED:
            return
        s = self.relay._s
        open_ = self.state != WAITING
        if open_ and now - self.renewed >= SESSION_LEASE_S / 4:
            self.renewed = now
            self._spawn(self._renew_lease())
        if self.client_gone:
            if open_ and self.terminated and now - self.terminated_at >= s.terminate_wait_s:
                self._spawn(self.stop("client_gone"))
            return
        quiet = now - self.last_seen
        if not self.paused:  # a paused reader hears nothing, through no fault of the client
            if quiet >= 2 * s.ping_interval_s:
                self.client_went()
                return
            if quiet >= s.ping_interval_s and now - self.pinged >= s.ping_interval_s:
                self.pinged = now
                self._to_client(PING_FRAME)
        if not open_:
            return
        if now - self.last_audio >= s.idle_timeout_s:
            self._spawn(
                self.stop("idle", f"aai-gateway: no audio for {s.idle_timeout_s:g}s; session terminated")
            )
            return
        age = now - self.opened_at
        if not self.warned and age >= s.max_duration_s - s.warn_before_s:
            self.warned = True
            self._tell({"type": "Warning", "warning": f"aai-gateway: the session ends in "
                        f"{max(0.0, s.max_duration_s - age):.0f}s (maximum duration)"})  # fmt: skip
        if age >= s.max_duration_s:
            self._spawn(
                self.stop("max_duration", "aai-gateway: maximum session duration reached; session terminated")
            )
            return
        guard = self.relay.spend
        hit = guard.over(identity_of(self.request)) if guard is not None else None
        if hit is not None:  # its project (or the account) reached its cap while it was open
            self.relay._metrics.spend_cap_sessions_ended.inc()
            self._spawn(self.stop("spend_cap", f"aai-gateway: {hit.message()}; session terminated"))

    async def stop(self, reason: str, why: str = "") -> None:
        """End the session from the gateway's side: Terminate upstream, relay the final
        messages, then close the client with a reason."""
        self.stopping = True
        if self.end_reason == "client":
            self.end_reason = reason
        if reason == "shutdown":
            why = SHUTDOWN_REASON
        if self.state == WAITING and reason == "shutdown":
            self._send_error(SHUTTING_DOWN, why)  # handed back, like an HTTP waiter: charged nothing
        elif why:
            self._tell({"type": "Warning", "warning": why})
        if self.state == WAITING:
            self.left.set()
        elif self.upstream is not None and not self.upstream.closed:
            await self._terminate_upstream()
        self._close_client(SHUTTING_DOWN if reason == "shutdown" else WSCloseCode.OK, why or reason)

    async def _terminate_upstream(self) -> None:
        """Send Terminate (once), wait briefly for Termination (relayed to the client while
        it is there), then close upstream."""
        up = self.upstream
        if up is None or up.closed:
            return
        if self.replaying is not None:
            self.replaying.cancel()  # nothing goes upstream after the gateway's Terminate
        self._write_terminate(up)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.termination.wait(), self.relay._s.terminate_wait_s)
        if not up.closed:
            up.write(ws_wire.close_frame(WSCloseCode.OK, mask=True))
            up.close()

    def _write_terminate(self, up: ws_wire.Upstream) -> None:
        """The gateway's own Terminate (once), after ending a message the client left open."""
        if self.terminated:
            return
        self.terminated = True
        self.terminated_at = time.monotonic()
        if self.upstream_open:
            up.write(FINAL_CONT_MASKED)
            self.upstream_open = False
        up.write(ws_wire.frame(ws_wire.TEXT, TERMINATE, mask=True))

    async def abort(self) -> None:
        """After an unexpected error: the upstream session still ends with Terminate, and the
        client gets a 1011 close, never an HTTP answer on its WebSocket."""
        self.stopping = True
        await self._terminate_upstream()
        if self.upstream is not None:
            self.upstream.close()
        self._close_client(1011, "aai-gateway: internal error")

    async def linger(self) -> None:
        """After the gateway's Close, give the client a moment to answer with its own before
        the connection is closed (closing first could reset it and lose the last frames)."""
        if self.client_closed and not self.client_gone:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.gone.wait(), LINGER_S)
