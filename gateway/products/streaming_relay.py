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
  never opens an upstream session;
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
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from yarl import URL

from ..admission.engine import AdmissionEngine, Grant
from ..clock import Clock
from ..config import Config
from ..errors import GatewayError, RateLimited, StoreUnavailable, Unauthorized
from ..ledger import Ledger
from ..metrics import Metrics
from ..proxy.forward import Upstream, request_headers
from ..proxy.handler import GROUP, ProxyHandler
from ..vault import Vault
from . import streaming
from .catalog import SESSION_LEASE_S, Catalog
from .streaming_tokens import TokenBook, jwt_expiry

log = logging.getLogger(__name__)

PASS_HEADERS = (hdrs.AUTHORIZATION, "AssemblyAI-Version")
TOO_MANY = 3009
TERMINATE = json.dumps({"type": "Terminate"})


class StreamingRelay:
    def __init__(
        self,
        cfg: Config,
        *,
        engine: AdmissionEngine,
        catalog: Catalog,
        upstream: Upstream,
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
        self._upstream = upstream
        self._handler = handler
        self._vault = vault
        self._ledger = ledger
        self._tokens = tokens
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._sessions: set[_Session] = set()

    async def token(self, request: web.Request) -> web.StreamResponse:
        """``GET /v3/token``, forwarded; the token it issues is noted (streaming_tokens.py)."""
        if hdrs.AUTHORIZATION not in request.headers:
            raise Unauthorized()
        plan = await streaming.plan(request, self._cfg, self._catalog)
        request[GROUP] = plan.group
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
        owner = self._vault.fingerprint(request.headers[hdrs.AUTHORIZATION])
        try:
            await self._tokens.issued(self._vault.fingerprint(token), expires_in, owner)
        except StoreUnavailable as exc:  # the token works regardless; only its bounds are lost
            log.warning("streaming: could not note a temporary token: %s", exc.detail)

    async def _who(self, request: web.Request) -> tuple[str, float]:
        """(owner, longest wait): the key's fingerprint, or the token's issuer; a token waits
        no longer than it stays valid (less a second to open the session)."""
        max_wait = self._s.max_wait_s
        key = request.headers.get(hdrs.AUTHORIZATION)
        if key:
            return self._vault.fingerprint(key), max_wait
        token = request.query["token"]
        try:
            note = await self._tokens.lookup(self._vault.fingerprint(token))
        except StoreUnavailable:
            note = None
        until = note.valid_until if note is not None else jwt_expiry(token)
        if until is not None:
            max_wait = max(0.0, min(max_wait, until - self._wall() - 1.0))
        return (note.owner if note is not None and note.owner else "token"), max_wait

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if hdrs.AUTHORIZATION not in request.headers and "token" not in request.query:
            return web.json_response({"error": "Authentication error, API token missing/invalid"}, status=401)
        request[GROUP] = "streaming"
        owner, max_wait = await self._who(request)
        ws = web.WebSocketResponse(heartbeat=self._s.ping_interval_s, max_msg_size=8 * 1024 * 1024)
        await ws.prepare(request)  # at once: the SDK gives the handshake one second
        session = _Session(self, request, ws, owner=owner, max_wait_s=max_wait)
        self._sessions.add(session)
        m = self._metrics
        m.sessions_open.inc()
        running = asyncio.create_task(session.run())
        try:
            # Shielded: aiohttp cancels a handler whose client disconnects, and the session
            # must still end cleanly (its wait aborted, its upstream session terminated). The
            # lost connection ends the client's reader, which is what run() acts on.
            await asyncio.shield(running)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(running), self._s.terminate_wait_s + 2)
            raise
        finally:
            self._sessions.discard(session)
            m.sessions_open.inc(-1)
            m.child(m.sessions_ended, session.end_reason).inc()
            if session.opened_at:
                await self._record(session)
        return ws

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

    async def shutdown(self) -> None:
        """Graceful shutdown: every session is terminated cleanly, then closed."""
        await asyncio.gather(*(s.stop("shutdown") for s in list(self._sessions)), return_exceptions=True)

    def _upstream_url(self, request: web.Request) -> URL:
        """The client's query string unchanged, plus an inactivity_timeout unless it chose one."""
        query = request.query_string
        if "inactivity_timeout" not in request.query:
            extra = f"inactivity_timeout={self._s.inactivity_timeout_s}"
            query = f"{query}&{extra}" if query else extra
        return URL(f"{self._cfg.upstream.streaming_url}/v3/ws?{query}", encoded=True)


class _Session:
    """One client's session: admission, the upstream socket, the two pumps, the guard."""

    def __init__(
        self,
        relay: StreamingRelay,
        request: web.Request,
        client: web.WebSocketResponse,
        *,
        owner: str,
        max_wait_s: float,
    ) -> None:
        self.relay = relay
        self.request = request
        self.client = client
        self.owner = owner
        self.max_wait_s = max_wait_s
        self.grant: Grant | None = None
        self.usage: dict[str, float] | None = None  # from upstream's Termination
        self.closed_at = 0.0
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.backlog: deque[tuple[float, WSMsgType, Any]] = deque()
        self.backlog_bytes = 0
        self.client_gone = False
        self.terminated = False  # a Terminate went upstream
        self.end_reason = "client"  # it sent Terminate, unless set otherwise
        self.last_audio = time.monotonic()
        self.opened_at = 0.0
        self.pumping = False  # the upstream pump is the one reader of the upstream socket
        self.termination = asyncio.Event()  # upstream's Termination (or close) was seen

    # -- waiting for admission, keeping the client's messages --------------------------
    async def run(self) -> None:
        s = self.relay._s
        reader = asyncio.create_task(self._buffer_client())
        admit = asyncio.create_task(self._admit())
        try:
            done, _ = await asyncio.wait({reader, admit}, return_when=asyncio.FIRST_COMPLETED)
            if admit not in done:  # the client left, or ended, while waiting: no session opens
                admit.cancel()
                with contextlib.suppress(asyncio.CancelledError, GatewayError):
                    await admit
                self.end_reason = "client_left_waiting"
                if not self.client_gone:  # it sent Terminate: a session that never began, ended
                    await self._tell({"type": "Termination", "audio_duration_seconds": 0,
                                      "session_duration_seconds": 0})  # fmt: skip
                    await self.client.close(code=WSCloseCode.OK)
                return
            try:
                admit.result()
            except RateLimited as exc:
                reader.cancel()
                self.end_reason = "refused"
                await self._refuse(exc)
                return
            except (StoreUnavailable, GatewayError) as exc:
                reader.cancel()
                self.end_reason = "error"
                await self._send_error(1011, f"aai-gateway: {exc.message}")
                return
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if s.backlog == "drop":
                self.backlog.clear()
            await self._open_and_relay()
        finally:
            for task in (reader, admit):
                task.cancel()

    async def _admit(self) -> None:
        relay = self.relay
        limits = relay._catalog.session_limits()
        started = time.monotonic()
        relay._metrics.sessions_waiting.inc()
        try:
            self.grant = await relay._engine.admit(
                limits,
                max_wait_s=self.max_wait_s,
                max_depth=relay._cfg.queue.max_depth,
                group="streaming",
            )
        finally:
            relay._metrics.sessions_waiting.inc(-1)
        relay._metrics.session_wait.observe(time.monotonic() - started)

    async def _buffer_client(self) -> None:
        """Keep what the client sends while its session waits (bounded); return when it leaves."""
        limit = self.relay._s.buffer_bytes
        ended = False
        async for msg in self.client:
            if ended:
                continue  # after its Terminate: only its leaving matters
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                size = len(msg.data)
                if self.backlog_bytes + size > limit:
                    self.relay._metrics.child(self.relay._metrics.session_frames, "dropped").inc()
                    continue  # over the buffer: dropped (the oldest audio is what matters most)
                self.backlog.append((time.monotonic(), msg.type, msg.data))
                self.backlog_bytes += size
                if msg.type is WSMsgType.TEXT and _kind(msg.data) == "Terminate":
                    if not any(kind is WSMsgType.BINARY for _, kind, _ in self.backlog):
                        return  # it ended before it sent audio: nothing to open
                    ended = True  # its audio is still transcribed: the session opens, replays it all
        self.client_gone = True

    async def _refuse(self, exc: RateLimited) -> None:
        reason = f"aai-gateway: waited {self.max_wait_s:g}s for the '{exc.limit}' limit"
        await self._send_error(TOO_MANY, reason)

    async def _send_error(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.client.send_str(json.dumps({"type": "Error", "error_code": code, "error": reason}))
        await self.client.close(code=code, message=reason.encode()[:120])

    # -- relaying ----------------------------------------------------------------------
    async def _open_and_relay(self) -> None:
        relay = self.relay
        headers = {k: self.request.headers[k] for k in PASS_HEADERS if k in self.request.headers}
        try:
            self.upstream = await relay._upstream.session.ws_connect(
                relay._upstream_url(self.request),
                headers=headers,
                autoping=True,
                heartbeat=relay._s.ping_interval_s,
            )
        except aiohttp.WSServerHandshakeError as exc:
            self.end_reason = "upstream_error"
            await self._end_lease()  # upstream answered (the request counted); no session open
            await self._send_error(
                1008 if exc.status in (401, 403) else 1011, f"upstream refused: {exc.status}"
            )
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.end_reason = "upstream_error"
            if isinstance(exc, aiohttp.ClientConnectorError):  # never reached upstream: refund
                assert self.grant is not None
                await self.relay._engine.release(self.grant)
            else:
                await self._end_lease()
            await self._send_error(
                1011, f"aai-gateway: could not reach the streaming service ({type(exc).__name__})"
            )
            return
        self.opened_at = self.last_audio = time.monotonic()
        relay._metrics.sessions_admitted.inc()
        pumps = [
            asyncio.create_task(self._client_to_upstream()),
            asyncio.create_task(self._upstream_to_client()),
            asyncio.create_task(self._guard()),
        ]
        self.pumping = True
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.pumping = False
            self.closed_at = time.monotonic()
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if not self.upstream.closed:
                await self._terminate_upstream()
            if not self.client.closed:
                code = self.upstream.close_code or WSCloseCode.OK
                await self.client.close(code=code)
            await self._end_lease()

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
                await self.relay._engine.store.renew(self.grant.ticket, limit, limit.lease_ms)

    async def _client_to_upstream(self) -> None:
        """The backlog first, with its original spacing; then live messages as they come."""
        assert self.upstream is not None
        m = self.relay._metrics
        if self.backlog:
            first_at, replay_start = self.backlog[0][0], time.monotonic()
            while self.backlog:
                at, kind, data = self.backlog.popleft()
                delay = replay_start + (at - first_at) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # never faster than the client sent it
                await self._forward(kind, data)
                m.child(m.session_frames, "replayed").inc()
        async for msg in self.client:  # ends when the client closes, or its connection dies
            if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                await self._forward(msg.type, msg.data)
        # The client is gone. If it did not end the session, the gateway does (billing).
        self.client_gone = True
        if not self.terminated:
            self.end_reason = "client_gone"
            await self._terminate_upstream()

    async def _forward(self, kind: WSMsgType, data: Any) -> None:
        assert self.upstream is not None
        m = self.relay._metrics
        if kind is WSMsgType.BINARY:
            self.last_audio = time.monotonic()
            await self.upstream.send_bytes(data)
            m.child(m.session_frames, "audio").inc()
            m.session_bytes.inc(len(data))
        else:
            if _kind(data) == "Terminate":
                self.terminated = True
            await self.upstream.send_str(data)
            m.child(m.session_frames, "message").inc()

    async def _upstream_to_client(self) -> None:
        assert self.upstream is not None
        reason = ""
        while True:
            msg = await self.upstream.receive()
            if msg.type is WSMsgType.TEXT:
                ended = _kind(msg.data) == "Termination"
                if ended:
                    self.relay._metrics.child(self.relay._metrics.session_frames, "termination").inc()
                    self.usage = _usage(msg.data)
                if not self.client.closed:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await self.client.send_str(msg.data)
                if ended:
                    self.termination.set()
            elif msg.type is WSMsgType.BINARY:
                if not self.client.closed:
                    await self.client.send_bytes(msg.data)
            else:  # close, or the connection failed
                if msg.type is WSMsgType.CLOSE:
                    reason = str(msg.extra or "")
                self.termination.set()
                break
        # Upstream closed: relay its code and reason.
        code = self.upstream.close_code or WSCloseCode.OK
        if code not in (WSCloseCode.OK, 1005) and self.end_reason == "client":
            self.end_reason = "upstream_error"
        if not self.client.closed:
            await self.client.close(code=code, message=reason.encode()[:120])

    async def _guard(self) -> None:
        """Idle audio and the maximum duration end the session; the client is told why."""
        s = self.relay._s
        warned = False
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, s.idle_timeout_s / 4))
            now = time.monotonic()
            if now - renewed >= SESSION_LEASE_S / 4:
                renewed = now
                await self._renew_lease()
            if now - self.last_audio >= s.idle_timeout_s:
                self.end_reason = "idle"
                await self.stop(
                    "idle", f"aai-gateway: no audio for {s.idle_timeout_s:g}s; session terminated"
                )
                return
            age = now - self.opened_at
            if not warned and age >= s.max_duration_s - s.warn_before_s:
                warned = True
                await self._tell({"type": "Warning", "warning": f"aai-gateway: the session ends in "
                                  f"{max(0.0, s.max_duration_s - age):.0f}s (maximum duration)"})  # fmt: skip
            if age >= s.max_duration_s:
                self.end_reason = "max_duration"
                await self.stop(
                    "max_duration", "aai-gateway: maximum session duration reached; session terminated"
                )
                return

    async def _tell(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            if not self.client.closed:
                await self.client.send_str(json.dumps(message))

    async def stop(self, reason: str, why: str = "") -> None:
        """End the session from the gateway's side: Terminate upstream, relay the final
        messages, then close the client with a reason."""
        if self.end_reason == "client":
            self.end_reason = reason
        if why:
            await self._tell({"type": "Warning", "warning": why})
        if self.upstream is not None and not self.upstream.closed:
            await self._terminate_upstream(relay_to_client=True)
        if not self.client.closed:
            code = WSCloseCode.GOING_AWAY if reason == "shutdown" else WSCloseCode.OK
            await self.client.close(code=code, message=(why or reason).encode()[:120])

    async def _terminate_upstream(self, *, relay_to_client: bool = False) -> None:
        """Send Terminate (once), wait briefly for Termination, then close upstream. While
        the upstream pump runs it reads (and relays) the answer; otherwise this reads it."""
        up = self.upstream
        if up is None or up.closed:
            return
        wait_s = self.relay._s.terminate_wait_s
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            if not self.terminated:
                self.terminated = True
                await up.send_str(TERMINATE)
            if self.pumping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.termination.wait(), wait_s)
                with contextlib.suppress(Exception):
                    await up.close()
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    msg = await up.receive(timeout=max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
                if msg.type is WSMsgType.TEXT:
                    if relay_to_client and not self.client.closed:
                        await self.client.send_str(msg.data)
                    if _kind(msg.data) == "Termination":
                        self.usage = _usage(msg.data)
                        break
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
        with contextlib.suppress(Exception):
            await up.close()


def _usage(termination: str) -> dict[str, float] | None:
    doc = json.loads(termination)
    try:
        return {
            "session_seconds": float(doc["session_duration_seconds"]),
            "audio_seconds": float(doc["audio_duration_seconds"]),
        }
    except (KeyError, TypeError, ValueError):
        return None


def _kind(data: Any) -> str:
    if not isinstance(data, str) or not data.startswith("{"):
        return ""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    return str(doc.get("type", "")) if isinstance(doc, dict) else ""
