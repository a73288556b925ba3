"""The fault suite's load: a mixed, open-loop load through the rig's gateways, and its hostile clients.

``Load`` offers REST GETs, LLM chat over two models, uploads, transcript jobs (submitted with an
Idempotency-Key, retried on the next live instance until created, then polled to their end)
and streaming sessions, round-robin over the instances the scenario has not taken down. It
records every call (``Call``), job (``Job``) and session (``Session``) for ``judge()``. With
``hostile=True`` it also plays the vanishing client: uploads cut mid-body, waiters that hang
up, sessions dropped without Terminate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.faults.rig import MODELS, Rig

KEYS = ("faults-key-a", "faults-key-b")
UPLOAD_BYTES = 256 * 1024
# After the load: jobs still running get this long to end (polled), then a lease life passes.
DRAIN_S = 45.0


@dataclass
class Call:
    kind: str  # rest | chat | upload | create | poll | session
    gateway: int
    start: float
    end: float = 0.0
    status: int = 0  # 0: no answer
    body: bytes = b""
    ctype: str = ""
    outcome: str = ""  # answered | truncated | no answer: ... | dropped (the client left on purpose)


@dataclass
class Job:
    n: int
    audio_url: str
    expect: str  # completed | error
    job_id: str = ""
    status: str = ""
    creates: list[int] = field(default_factory=list)
    asked_at: float = 0.0  # when the create that succeeded was sent
    not_found: int = 0  # polls answered 404 (final only where Redis came back empty)


@dataclass
class Session:
    n: int
    gateway: int
    tag: str
    fate: str  # terminate | vanish (TCP shut after Begin: no Terminate, no close frame) | leave (see session)
    begun: bool = False
    terminated: bool = False
    outcome: str = ""


@dataclass
class Rates:
    """Per second, all instances together. The requests window (40 per 3.3 s, ~12/s) is
    offered about twice that once polls are counted, so waiters queue and some get 429."""

    rest: float = 9.0
    chat: float = 5.0
    upload: float = 0.4
    job: float = 0.7
    session: float = 0.4


class Load:
    def __init__(
        self, the_rig: Rig, *, rates: Rates | None = None, hostile: bool = False, seed: int = 0
    ) -> None:
        self.rig = the_rig
        self.rates = rates or Rates()
        self.hostile = hostile  # clients that vanish mid-upload, mid-queue, mid-stream
        self.rng = random.Random(seed)
        self.calls: list[Call] = []
        self.jobs: list[Job] = []
        self.sessions: list[Session] = []
        self.tasks: set[asyncio.Future[None]] = set()
        self.stop_at = 0.0
        self.polls_until = 0.0
        self.turn = 0
        self.http: aiohttp.ClientSession | None = None

    def pick(self) -> int:
        live = self.rig.live()
        self.turn += 1
        return live[self.turn % len(live)] if live else 0

    def url(self, i: int) -> str:
        return self.rig.gateways[i].url

    async def run(self, seconds: float, fault: Callable[[], Awaitable[None]] | None = None) -> None:
        """The load for ``seconds``, ``fault()`` running beside it; then every job is polled to
        its end (within ``DRAIN_S``) and every session finished."""
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            self.http = http
            self.stop_at = loop.time() + seconds
            self.polls_until = self.stop_at + DRAIN_S
            makers: list[tuple[float, Callable[[int], Awaitable[None]]]] = [
                (self.rates.rest, self.rest),
                (self.rates.chat, self.chat),
                (self.rates.upload, self.upload),
                (self.rates.job, self.job),
                (self.rates.session, self.session),
            ]
            streams = [asyncio.ensure_future(self._stream(rate, make)) for rate, make in makers if rate > 0]
            faulting = asyncio.ensure_future(fault()) if fault is not None else None
            await asyncio.gather(*streams)
            if faulting is not None:
                await faulting
            while self.tasks:
                await asyncio.wait(set(self.tasks))

    async def _stream(self, rate: float, make: Callable[[int], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        start, i = loop.time(), 0
        while loop.time() < self.stop_at:
            task = asyncio.ensure_future(make(i))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))

    def _headers(self, n: int) -> dict[str, str]:
        return {"Authorization": KEYS[n % len(KEYS)]}

    async def send(self, call: Call, method: str, path: str, **kwargs: Any) -> None:
        assert self.http is not None
        self.calls.append(call)
        try:
            async with self.http.request(method, self.url(call.gateway) + path, **kwargs) as r:
                call.status, call.ctype = r.status, r.headers.get("Content-Type", "")
                try:
                    call.body = await r.read()
                    call.outcome = "answered"
                except aiohttp.ClientPayloadError as exc:
                    call.outcome = f"truncated: {exc!r}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.outcome = f"no answer: {exc!r}"
        call.end = time.monotonic()

    async def rest(self, n: int) -> None:
        call = Call("rest", self.pick(), time.monotonic())
        await self.send(call, "GET", f"/v2/transcript/{uuid.uuid4().hex}", headers=self._headers(n))

    async def chat(self, n: int) -> None:
        g = self.pick()
        body = {"model": MODELS[n % 2], "messages": [{"role": "user", "content": f"faults {n}"}]}
        if self.hostile and n % 5 == 4:  # hangs up while it waits for admission (or mid-answer)
            await self.drop(g, "POST", "/v1/chat/completions", self._headers(n), json.dumps(body).encode(),
                            after=self.rng.uniform(0.2, 2.0), sent=1.0)  # fmt: skip
            return
        await self.send(Call("chat", g, time.monotonic()), "POST", "/v1/chat/completions", json=body,
                        headers=self._headers(n))  # fmt: skip

    async def upload(self, n: int) -> None:
        g = self.pick()
        data = bytes(UPLOAD_BYTES)
        if self.hostile and n % 2 == 1:  # vanishes half-way through the body
            await self.drop(g, "POST", "/v2/upload", self._headers(n), data, after=0.3, sent=0.5)
            return
        await self.send(Call("upload", g, time.monotonic()), "POST", "/v2/upload", data=data,
                        headers=self._headers(n))  # fmt: skip

    async def drop(
        self,
        g: int,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        *,
        after: float,
        sent: float,
    ) -> None:
        """A raw socket that sends the head and ``sent`` of the body (its Content-Length says
        all of it), then, ``after`` seconds on, is gone (RST): the client vanished."""
        call = Call("dropped", g, time.monotonic(), outcome="dropped")
        self.calls.append(call)
        port = self.rig.gateways[g].port
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body[: int(len(body) * sent)])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await asyncio.sleep(after)
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        call.end = time.monotonic()

    async def job(self, n: int) -> None:
        assert self.http is not None
        fail = n % 7 == 6
        audio = f"https://example.com/faults/{uuid.uuid4().hex}.mp3?sim_seconds=1" + (
            "&sim_fail=1" if fail else ""
        )
        job = Job(n, audio, "error" if fail else "completed")
        self.jobs.append(job)
        headers = {**self._headers(n), "Idempotency-Key": f"job-{n}-{uuid.uuid4().hex[:6]}"}
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        while not job.job_id and loop.time() < give_up:  # a client retrying on another instance
            call = Call("create", self.pick(), time.monotonic())
            await self.send(call, "POST", "/v2/transcript", json={"audio_url": audio}, headers=headers)
            job.creates.append(call.status)
            if call.status == 200:
                job.job_id, job.asked_at = str(json.loads(call.body)["id"]), call.start
            else:
                await asyncio.sleep(0.3)
        while job.job_id and loop.time() < self.polls_until:
            await asyncio.sleep(0.5)
            call = Call("poll", self.pick(), time.monotonic())
            await self.send(call, "GET", f"/v2/transcript/{job.job_id}", headers=self._headers(n))
            if call.status == 200:
                job.status = str(json.loads(call.body).get("status"))
                if job.status in ("completed", "error"):
                    return
            elif call.status == 404:  # final after 8 s of them (a record Redis lost)
                job.status, job.not_found = "404", job.not_found + 1
                if job.not_found >= 16:
                    return

    async def session(self, n: int) -> None:
        """Audio at real time, then Terminate; or, hostile, every third vanishes after Begin
        (its TCP connection shut, no Terminate, no close frame) and every fourth leaves within
        half a second (a close frame, no Terminate: while it waits for admission, or just after
        its Begin)."""
        assert self.http is not None
        g = self.pick()
        fate = "terminate"
        if self.hostile:
            fate = "vanish" if n % 3 == 1 else "leave" if n % 4 == 3 else "terminate"
        s = Session(n, g, f"g{g}-s{n}", fate)
        self.sessions.append(s)
        call = Call("session", g, time.monotonic())
        self.calls.append(call)
        url = "ws" + self.url(g).removeprefix("http") + f"/v3/ws?sample_rate=16000&faults_tag={s.tag}"
        begun = asyncio.Event()

        async def audio(ws: aiohttp.ClientWebSocketResponse) -> None:
            if fate == "leave":  # a close frame, no Terminate: waiting still, or just begun
                await asyncio.sleep(self.rng.uniform(0.05, 0.5))
                await ws.close()
                return
            for _ in range(10):
                await ws.send_bytes(bytes(3200))  # 100 ms of 16 kHz pcm_s16le
                await asyncio.sleep(0.1)
            if fate == "vanish":
                await begun.wait()
                sock = ws.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # gone: no Terminate, no close frame
                return
            await ws.send_str(json.dumps({"type": "Terminate"}))

        try:
            async with self.http.ws_connect(url, headers=self._headers(n), autoping=True) as ws:
                call.status = 101
                sending = asyncio.ensure_future(audio(ws))
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        kind = json.loads(msg.data).get("type")
                        if kind == "Begin":
                            s.begun = True
                            begun.set()
                        elif kind == "Termination":
                            s.terminated = True
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                s.outcome = f"closed {ws.close_code}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            s.outcome = f"error: {exc!r}"
            if not call.status:
                call.outcome = f"no answer: {exc!r}"
        call.outcome = call.outcome or "answered"
        call.end = time.monotonic()
