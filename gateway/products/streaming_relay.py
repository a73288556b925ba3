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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode, hdrs, web
from yarl import URL

from ..admission.engine import AdmissionEngine, Grant, format_seconds
from ..clock import Clock
from ..config import Config
from ..errors import GatewayError, RateLimited, ShuttingDown, StoreUnavailable, Unauthorized
from ..identity import identity_of, owner_of
from ..ledger import Ledger
from ..logs import note_access
from ..metrics import Metrics
from ..proxy.forward import guard_s, request_headers
from ..proxy.handler import ProxyHandler
from ..vault import Vault
from . import streaming, ws_wire
from .catalog import SESSION_LEASE_S, Catalog
from .streaming_tokens import TokenBook, jwt_expiry

log = logging.getLogger(__name__)

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


class StreamingRelay:
    def __init__(
        self,
        cfg: Config,
        *,
        engine: AdmissionEngine,
        catalog: Catalog,
        handler: ProxyHandler,
        vault: Vault,
        ledger: Ledger,
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
        self._ledger = ledger
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

    async def _record(self, session: _Session) -> None:
        """The session's usage, per key, from upstream's Termination (or, when none came, the
        gateway's own measure of the time it was open, marked as such)."""
        if session.usage is not None:
            amounts = {"sessions": 1.0, **session.usage}
        else:
            measured = max(0.0, session.closed_at - session.opened_at)
            amounts = {"sessions": 1.0, "session_seconds": measured, "unreported_sessions": 1.0}
        try:
            await self._ledger.add(session.owner, "streaming", amounts)
        except (StoreUnavailable, OSError) as exc:
            log.error("streaming: usage of a session was not recorded (%s): %s", amounts, exc)

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


class _ClientLeg:
    """The client's connection after the handshake: aiohttp hands every chunk it reads to
    this parser (``RequestHandler.set_parser``, as its own WebSocket reader gets them).
    Frames are checked as RFC 6455 requires (ws_wire.FrameReader, masked): a bad one closes
    the client with 1002 (1009 over the size cap, 1008 past the instance's byte cap) and
    ends the session, its upstream session terminated."""

    __slots__ = ("session", "reader", "broken")

    def __init__(self, session: _Session, max_frame: int, budget: ws_wire.Budget) -> None:
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


class _Session:
    """One client's session: admission, the upstream socket, frames forwarded both ways, the
    guard. Frames are forwarded whole and unchanged (ws_wire.py); only text and control
    frames are read."""

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

    # -- waiting for admission, keeping the client's messages --------------------------
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

    # -- the client's frames (called by aiohttp's protocol, on the event loop) -------------
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
                    if b"Terminate" in data and _kind(data) == "Terminate":
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

    # -- upstream's frames ---------------------------------------------------------------
    def on_upstream_frames(self, frames: list[ws_wire.Frame]) -> None:
        up = self.upstream
        assert up is not None
        for f in frames:
            op = f.opcode
            if op == ws_wire.TEXT:
                ended = (
                    f.size <= UPSTREAM_READ_MAX
                    and b"Termination" in f.raw
                    and _kind(f.payload()) == "Termination"
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

    # -- relaying ----------------------------------------------------------------------
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


def _usage(termination: bytes) -> dict[str, float] | None:
    doc = json.loads(termination)
    try:
        return {
            "session_seconds": float(doc["session_duration_seconds"]),
            "audio_seconds": float(doc["audio_duration_seconds"]),
        }
    except (KeyError, TypeError, ValueError):
        return None


def _kind(data: bytes) -> str:
    """The ``type`` of a JSON message, or ""."""
    if not data.startswith(b"{"):
        return ""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return ""
    return str(doc.get("type", "")) if isinstance(doc, dict) else ""
