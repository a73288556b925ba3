"""Streaming v3 through the gateway: new sessions admitted per window, queued instead of
refused, and no session billed for time nobody used.

Upstream bills a session from the socket opening until ``Terminate`` (or its 3-hour cap),
and over the new-sessions limit it opens the socket and closes it with 3009, which the SDK
never retries. So the gateway:

- accepts the client's WebSocket at once (the SDK waits only 1 s for the handshake), then
  waits for a token from ``streaming_sessions`` (the same engine, order across instances),
  keeping the client's messages meanwhile (up to ``streaming.buffer_bytes``); once admitted
  it opens the upstream session and replays them with their original spacing, never faster
  than real time (upstream closes 3007 on faster audio), or drops them
  (``streaming.backlog: drop``). Past ``streaming.max_wait_s`` the client gets an ``Error``
  message and a 3009 close naming the gateway's limit. A client that leaves while waiting
  never opens an upstream session; one that sends ``Terminate`` before ``Begin`` gets its
  ``Termination`` within the SDK's 5 s wait (its audio transcribed only if that fits);
- holds bounded memory: at most ``streaming.max_waiting_sessions`` wait on an instance (more
  get 3009 at once) and ``streaming.max_buffered_bytes`` are held across its sessions (kept
  backlogs and unfinished frames); only small text frames are read (``READ_MAX``);
- speaks strict RFC 6455 on both legs (ws_wire.FrameReader): a client's bad frame closes it
  with 1002, a bad frame from upstream is never forwarded (the client gets 1011);
- relays both ways: binary audio, JSON messages, close codes and reasons, the query string
  and ``Authorization`` / ``AssemblyAI-Version`` headers unchanged (``?token=`` works too);
- ends every upstream session it opened with ``Terminate``: when the client goes away
  without one (the SDK's default ``disconnect()``, a crash, a dead TCP connection found by
  ping), after ``idle_timeout_s`` without audio, and at ``max_duration_s`` (the client is
  warned first); and asks upstream for an ``inactivity_timeout`` unless the client chose
  one, so even a session the gateway loses (it died) stops billing soon after.

This module is the instance's side (the upgrade, the sessions' sweep, their usage records,
shutdown); one session (``_Session``) is put together from streaming_session.py (its state,
the client's leg), streaming_wait.py (waiting and admission), streaming_frames.py (the relay,
frames both ways) and streaming_guards.py (pings, idle, maximum duration, spend caps, ending).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from aiohttp import hdrs, web
from yarl import URL

from ..admission.engine import AdmissionEngine
from ..clock import Clock
from ..config import Config
from ..errors import ShuttingDown, StoreUnavailable, Unauthorized
from ..identity import identity_of, owner_of
from ..ledger import Line, clean
from ..logs import note_access
from ..metrics import Metrics
from ..proxy import ws_wire
from ..proxy.forward import request_headers
from ..proxy.handler import ProxyHandler
from ..spend import SpendGuard
from ..usage import Usage, customer_of, line_of
from ..vault import Vault
from . import streaming
from .catalog import Catalog
from .streaming_frames import _Relaying
from .streaming_guards import _Guarding
from .streaming_session import (  # the names this module held before the split: see __all__
    AUDIO,
    CLIENT_BUFFER,
    ENDED,
    FINAL_CONT,
    FINAL_CONT_MASKED,
    FRAME_COST,
    LINGER_S,
    MAX_FRAME,
    MESSAGE,
    PASS_HEADERS,
    PING_FRAME,
    READ_MAX,
    RELAYING,
    REPLAYING,
    SHUTDOWN_REASON,
    SHUTTING_DOWN,
    TERMINATE,
    TERMINATE_KIND,
    TERMINATE_WITHIN_S,
    TOO_MANY,
    UPSTREAM_READ_MAX,
    WAITING,
    _ClientLeg,
    _kind,
    _SessionState,
    _usage,
)
from .streaming_tokens import TokenBook, jwt_expiry
from .streaming_wait import _Waiting

# Kept here since the split (streaming_session.py and its siblings hold them): tests read and
# replace them on this module, and streaming_frames.py reads ``_kind`` through it.
__all__ = [
    "StreamingRelay",
    "AUDIO",
    "CLIENT_BUFFER",
    "ENDED",
    "FINAL_CONT",
    "FINAL_CONT_MASKED",
    "FRAME_COST",
    "LINGER_S",
    "MAX_FRAME",
    "MESSAGE",
    "PASS_HEADERS",
    "PING_FRAME",
    "READ_MAX",
    "RELAYING",
    "REPLAYING",
    "SHUTDOWN_REASON",
    "SHUTTING_DOWN",
    "TERMINATE",
    "TERMINATE_KIND",
    "TERMINATE_WITHIN_S",
    "TOO_MANY",
    "UPSTREAM_READ_MAX",
    "WAITING",
    "_ClientLeg",
    "_kind",
    "_SessionState",
    "_usage",
]

log = logging.getLogger(__name__)


class StreamingRelay:
    def __init__(
        self,
        cfg: Config,
        *,
        engine: AdmissionEngine,
        catalog: Catalog,
        handler: ProxyHandler,
        vault: Vault,
        usage: Usage,
        tokens: TokenBook,
        metrics: Metrics,
        clock: Clock,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._cfg = cfg
        self._s = cfg.streaming
        self._engine = engine
        self._catalog = catalog
        self._handler = handler
        self._vault = vault
        self._usage = usage
        self.spend: SpendGuard | None = None  # the spend caps (spend.py), when any is set
        self._tokens = tokens
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._sessions: set[_Session] = set()
        # Across all sessions of this instance: bytes held (kept backlogs, unfinished frames)
        # and sessions waiting for admission, each under its cap.
        self._budget = ws_wire.Budget(self._s.max_buffered_bytes)
        self._waiting = 0
        self._sweep: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # every session's task
        self._frames_audio = metrics.child(metrics.session_frames, "audio")
        self._frames_message = metrics.child(metrics.session_frames, "message")
        self._frames_termination = metrics.child(metrics.session_frames, "termination")

    def use_config(self, cfg: Config) -> None:
        """A reloaded config (gateway/reload.py): queue and streaming settings apply to sessions
        from now on (``streaming.max_buffered_bytes`` only at a restart: the budget is shared)."""
        self._cfg = cfg
        self._s = cfg.streaming

    async def token(self, request: web.Request) -> web.StreamResponse:
        """``GET /v3/token``, forwarded; the token it issues is noted (streaming_tokens.py)."""
        if hdrs.AUTHORIZATION not in request.headers:
            raise Unauthorized()
        plan = await streaming.plan(request, self._cfg, self._catalog)
        note_access(request, group=plan.group)
        headers = request_headers(request.headers, keep_length=False)
        status, answer, body = await self._handler.fetch(plan, request.method, request.raw_path, headers)
        if status == 200:
            await self._note_token(request, body)
        kept = {k: v for k, v in answer.items() if k.lower() in ("content-type", "retry-after")}
        return web.Response(body=body, status=status, headers=kept)

    async def _note_token(self, request: web.Request, body: bytes) -> None:
        try:
            doc = json.loads(body)
            token = str(doc["token"])
            expires_in = float(doc.get("expires_in_seconds") or request.query["expires_in_seconds"])
        except (ValueError, KeyError, TypeError):
            log.warning("streaming: a /v3/token answer without a token or its lifetime; not noted")
            return
        owner = owner_of(request)  # the key's fingerprint, or its project (identity.py)
        try:
            await self._tokens.issued(self._vault.fingerprint(token), expires_in, owner)
        except StoreUnavailable as exc:  # the token works regardless; only its bounds are lost
            log.warning("streaming: could not note a temporary token: %s", exc.detail)

    async def _who(self, request: web.Request) -> tuple[str, float]:
        """(owner, longest wait): the caller's owner (identity.py), or the token's issuer; a
        token waits no longer than it stays valid (less a second to open the session)."""
        max_wait = self._s.max_wait_s
        identity = identity_of(request)
        if identity is not None and identity.token is None:
            return identity.owner, max_wait
        token = identity.token if identity is not None and identity.token else request.query["token"]
        try:
            note = await self._tokens.lookup(self._vault.fingerprint(token))
        except StoreUnavailable:
            note = None
        until = note.valid_until if note is not None else jwt_expiry(token)
        if until is not None:
            max_wait = max(0.0, min(max_wait, until - self._wall() - 1.0))
        if identity is not None:
            return identity.owner, max_wait
        return (note.owner if note is not None and note.owner else "token"), max_wait

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if hdrs.AUTHORIZATION not in request.headers and "token" not in request.query:
            return web.json_response({"error": "Authentication error, API token missing/invalid"}, status=401)
        note_access(request, group="streaming")
        if self._handler.draining:  # before the upgrade: a 429 with Retry-After, like HTTP
            raise ShuttingDown()
        key = request.headers.get("Sec-WebSocket-Key", "")
        upgrade = "upgrade" in request.headers.get(hdrs.CONNECTION, "").lower()
        if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket" or not key or not upgrade:
            return web.json_response({"error": "/v3/ws is a WebSocket: send an Upgrade request"}, status=400)
        if request.headers.get("Sec-WebSocket-Version") != "13":
            return web.json_response(
                {"error": "unsupported WebSocket version (13 is)"}, status=426,
                headers={"Sec-WebSocket-Version": "13"},
            )  # fmt: skip
        owner, max_wait = await self._who(request)
        # The handshake at once (the SDK gives it one second), with no extension: frames are
        # forwarded as they are (ws_wire.py), so both legs must carry plain frames.
        ws = web.StreamResponse(
            status=101,
            headers={
                hdrs.UPGRADE: "websocket",
                hdrs.CONNECTION: "Upgrade",
                "Sec-WebSocket-Accept": ws_wire.accept_key(key),
            },
        )
        ws.force_close()
        await ws.prepare(request)
        session = _Session(self, request, owner=owner, max_wait_s=max_wait)
        request.protocol.set_parser(session.leg)  # type: ignore[arg-type]
        request.protocol.keep_alive(False)
        self._sessions.add(session)
        self._start_sweep()
        running = asyncio.create_task(self._lifecycle(session))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        # Shielded: aiohttp cancels a handler whose client disconnects, and the session must
        # still end cleanly (its wait aborted, its upstream session terminated): the lost
        # connection reaches the session through its parser (feed_eof), and the session's
        # own task keeps its books whether or not this handler is still waiting.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(running)
        return ws

    async def _lifecycle(self, session: _Session) -> None:
        """One session from the 101 to its usage record, in a task of its own."""
        m = self._metrics
        m.sessions_open.inc()
        try:
            await session.run()
        except Exception:
            log.exception("streaming: a session failed; terminating it")
            session.end_reason = "error"
            with contextlib.suppress(Exception):
                await session.abort()
        finally:
            session.release()
            self._sessions.discard(session)
            m.sessions_open.inc(-1)
            m.child(m.sessions_ended, session.end_reason).inc()
            if session.opened_at:
                if not session.closed_at:
                    session.closed_at = time.monotonic()
                await self._record(session)
            await session.linger()

    def open_spend(self) -> dict[str, float]:
        """USD the sessions open on this instance have used so far (billed when they end), by
        project or key, and the account's ("*"): what the spend caps count for them."""
        out: dict[str, float] = {}
        now = time.monotonic()
        for session in self._sessions:
            if session.opened_at and not session.closed_at:
                line = self._line(session)
                usd = self._usage.cost(line, {"session_seconds": now - session.opened_at})
                for who in (line.project or line.key, "*"):
                    out[who] = out.get(who, 0.0) + usd
        return out

    def _line(self, session: _Session) -> Line:
        request = session.request
        model = clean(request.query.get("speech_model", ""))
        return line_of(identity_of(request), "streaming", model, customer_of(request), owner=session.owner)

    async def _record(self, session: _Session) -> None:
        """The session's usage, from upstream's Termination (or, when none came, the gateway's
        own measure of the time it was open, marked as such): usage.py."""
        await self._usage.session(
            session.id, self._line(session), session.usage, session.closed_at - session.opened_at
        )

    def _start_sweep(self) -> None:
        if self._sweep is None or self._sweep.done():
            self._sweep = asyncio.create_task(self._sweeping())

    async def _sweeping(self) -> None:
        """One timer for every session's guard (_Session.check), not one per session: a
        thousand guards waking in step would stall the frames queued behind them."""
        interval = min(1.0, self._s.idle_timeout_s / 4, self._s.ping_interval_s / 4)
        while self._sessions:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self._sessions):
                try:
                    session.check(now)
                except Exception:  # one session's fault must not end every session's guard
                    log.exception("streaming: the guard of one session failed; ending that session")
                    session.end_reason = "error"
                    session._spawn(session.abort())

    async def shutdown(self) -> None:
        """Graceful shutdown: every session is terminated cleanly, then closed."""
        if self._sweep is not None:
            self._sweep.cancel()
        await asyncio.gather(*(s.stop("shutdown") for s in list(self._sessions)), return_exceptions=True)
        if self._running:
            await asyncio.wait(list(self._running), timeout=self._s.terminate_wait_s + 2)

    def _upstream_url(self, request: web.Request) -> URL:
        """The client's query string unchanged, plus an inactivity_timeout unless it chose one."""
        query = request.rel_url.raw_query_string  # as the client encoded it
        if "inactivity_timeout" not in request.query:
            extra = f"inactivity_timeout={self._s.inactivity_timeout_s}"
            query = f"{query}&{extra}" if query else extra
        return URL(f"{self._cfg.upstream.streaming_url}/v3/ws?{query}", encoded=True)


class _Session(_Waiting, _Relaying, _Guarding):
    """One client's session: admission (streaming_wait.py), the upstream socket and frames
    forwarded both ways (streaming_frames.py), the guard (streaming_guards.py); its state
    and its writes to the client are in streaming_session.py. Frames are forwarded whole
    and unchanged (ws_wire.py); only text and control frames are read."""
