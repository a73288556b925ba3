"""Simulated streaming v3: sessions per window, Begin/Turn/Termination, close codes.

Over the new-sessions window the upgrade succeeds and the socket is closed with 3009
"Too many concurrent sessions" (recorded as a violation). Audio frames must carry 50-1000 ms
each and never run ahead of real time by more than one frame's worth (else 3007, recorded).
A session that ends without ``Terminate`` is recorded as left open (it would bill until the
3-hour cap upstream).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from .recorder import Recorder, RollingWindow

BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_mulaw": 1}


@dataclass
class Session:
    id: str
    key: str
    opened: float
    sample_rate: int
    encoding: str
    audio_s: float = 0.0
    first_frame: float | None = None
    last_audio: float | None = None
    terminated: bool = False
    closed: float | None = None
    close_code: int | None = None
    turns: int = 0
    messages: list[str] = field(default_factory=list)
    query: dict[str, str] = field(default_factory=dict)  # as the session was opened with


class StreamingService:
    def __init__(
        self,
        recorder: Recorder,
        window: RollingWindow,
        *,
        max_session_s: float = 10_800,
        rate_tolerance_s: float = 1.0,
    ) -> None:
        self.recorder = recorder
        self.window = window
        self.billed: list[dict[str, Any]] = []  # each Termination's figures and the session's query
        self.max_session_s = max_session_s
        self.rate_tolerance_s = rate_tolerance_s
        self.sessions: dict[str, Session] = {}
        self.tokens: dict[str, float] = {}  # temporary token -> expiry (monotonic)

    def issue_token(self, expires_in: int) -> str:
        token = uuid.uuid4().hex
        self.tokens[token] = time.monotonic() + expires_in
        return token

    def take_token(self, token: str) -> bool:
        expiry = self.tokens.pop(token, None)  # one token = one session
        return expiry is not None and expiry > time.monotonic()

    @property
    def open_sessions(self) -> int:
        return sum(1 for s in self.sessions.values() if s.closed is None)

    @property
    def left_open(self) -> list[Session]:
        """Sessions that ended without Terminate (upstream would bill them to the cap)."""
        return [s for s in self.sessions.values() if s.closed is not None and not s.terminated]

    async def handle(self, request: web.Request, key: str) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, heartbeat=None)
        await ws.prepare(request)
        now = time.monotonic()
        if not self.window.arrive(now):
            self.recorder.violate("streaming_sessions", "streaming_sessions", now)
            await ws.send_str(
                json.dumps({"type": "Error", "error_code": 3009, "error": "Too many concurrent sessions"})
            )
            await ws.close(code=3009, message=b"Too many concurrent sessions")
            return ws
        q = request.query
        encoding = q.get("encoding", "pcm_s16le")
        session = Session(
            uuid.uuid4().hex, key, now, int(q.get("sample_rate", "16000")), encoding, query=dict(q)
        )
        self.sessions[session.id] = session
        inactivity = float(q["inactivity_timeout"]) if "inactivity_timeout" in q else None
        await ws.send_str(
            json.dumps(
                {"type": "Begin", "id": session.id, "expires_at": int(time.time() + self.max_session_s)}
            )
        )
        try:
            await self._loop(ws, session, inactivity)
        finally:
            session.closed = time.monotonic()
            session.close_code = ws.close_code
            if not ws.closed:
                await ws.close()
        return ws

    async def _loop(self, ws: web.WebSocketResponse, s: Session, inactivity: float | None) -> None:
        while True:
            timeout = self.max_session_s - (time.monotonic() - s.opened)
            if inactivity is not None:
                timeout = min(timeout, inactivity)
            try:
                msg = await ws.receive(timeout=max(0.01, timeout))
            except TimeoutError:
                if time.monotonic() - s.opened >= self.max_session_s:
                    await self._error_close(ws, 3008, "Session exceeded the maximum duration")
                else:
                    await self._terminate(ws, s)  # upstream's inactivity timeout ends the session
                return
            if msg.type == WSMsgType.BINARY:
                if not await self._audio(ws, s, msg.data):
                    return
            elif msg.type == WSMsgType.TEXT:
                s.messages.append(msg.data)
                try:
                    kind = json.loads(msg.data).get("type")
                except (ValueError, AttributeError):
                    await self._error_close(ws, 3006, "Invalid message")
                    return
                if kind == "Terminate":
                    await self._terminate(ws, s)
                    return
                if kind == "ForceEndpoint":
                    await self._turn(ws, s)
            else:  # close, error: the client went away
                return

    async def _audio(self, ws: web.WebSocketResponse, s: Session, data: bytes) -> bool:
        now = time.monotonic()
        width = BYTES_PER_SAMPLE.get(s.encoding)
        if width is None:  # compressed audio: no duration check
            s.last_audio = now
            return True
        seconds = len(data) / (width * s.sample_rate)
        if not 0.05 - 1e-9 <= seconds <= 1.0 + 1e-9:
            self.recorder.violate("audio_chunk", "streaming", now, f"{seconds * 1000:.0f} ms")
            await self._error_close(ws, 3007, "Input duration violation: chunks must be 50-1000 ms")
            return False
        if s.first_frame is None:
            s.first_frame = now
        s.audio_s += seconds
        s.last_audio = now
        if s.audio_s > (now - s.first_frame) + self.rate_tolerance_s:
            self.recorder.violate(
                "audio_rate", "streaming", now, f"{s.audio_s:.2f}s audio in {now - s.first_frame:.2f}s"
            )
            await self._error_close(ws, 3007, "Audio sent faster than real time")
            return False
        if int(s.audio_s) > s.turns:
            await self._turn(ws, s)
        return True

    async def _turn(self, ws: web.WebSocketResponse, s: Session) -> None:
        s.turns += 1
        await ws.send_str(
            json.dumps(
                {
                    "type": "Turn",
                    "turn_order": s.turns,
                    "turn_is_formatted": False,
                    "end_of_turn": True,
                    "transcript": f"simulated words {s.turns}",
                    "end_of_turn_confidence": 0.9,
                    "words": [],
                }
            )
        )

    async def _terminate(self, ws: web.WebSocketResponse, s: Session) -> None:
        s.terminated = True
        billed = {
            "audio_duration_seconds": round(s.audio_s),
            "session_duration_seconds": round(time.monotonic() - s.opened),
        }
        self.billed.append({**billed, "query": s.query})  # what upstream bills (tests compare)
        await ws.send_str(json.dumps({"type": "Termination", **billed}))
        await ws.close(code=1000)

    async def _error_close(self, ws: web.WebSocketResponse, code: int, reason: str) -> None:
        await ws.send_str(json.dumps({"type": "Error", "error_code": code, "error": reason}))
        await ws.close(code=code, message=reason.encode())

    def report(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "open": self.open_sessions,
            "left_open": len(self.left_open),
            "terminated": sum(1 for s in self.sessions.values() if s.terminated),
        }
