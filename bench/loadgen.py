"""The load generator: a closed loop (C workers, each sending its next request when the last
one answered) and an open loop (requests started on schedule, whatever the others do), the
requests they send (``GET /v2/transcript/<id>``, or a chat completion body), and the slice
of figures each run yields. The client runs in the orchestrating process, on uvloop, its
garbage collector paused while measuring (``no_gc``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from processes import Proc

AUTH = {"Authorization": "bench-key"}
IDS = [f"{i:08x}-4a7d-4a53-9d3e-2f0c1b7e8a90" for i in range(1000)]
CHAT_MODEL = "gpt-4.1"


@dataclass
class Slice:
    """One variant under one load for one slice of time."""

    requests: int
    errors: int
    seconds: float
    cpu_s: float = 0.0  # the proxy process
    redis_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # open loop only
    max_lag_ms: float = 0.0  # open loop: how late the latest request started

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / max(1, self.requests + self.errors) * 1e6


def pct(latencies: list[float], q: float) -> float:
    """Nearest-rank percentile, in ms."""
    xs = sorted(latencies)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))] * 1000


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


async def send(session: aiohttp.ClientSession, base: str, i: int, chat: bytes | None) -> int:
    if chat is None:
        async with session.get(f"{base}/v2/transcript/{IDS[i % len(IDS)]}", headers=AUTH) as resp:
            await resp.read()
            return resp.status
    headers = {**AUTH, "Content-Type": "application/json"}
    async with session.post(f"{base}/v1/chat/completions", data=chat, headers=headers) as resp:
        await resp.read()
        return resp.status


async def closed_loop(
    session: aiohttp.ClientSession,
    base: str,
    concurrency: int,
    seconds: float,
    chat: bytes | None = None,
    *,
    count_client_errors: bool = False,
) -> Slice:
    """``concurrency`` workers, each sending its next request when the last one answered.
    ``count_client_errors``: a request the client library fails (a refused or dropped
    connection) counts as an error instead of ending the run (tls_overhead.py's handshakes)."""
    done = errors = 0
    start = time.perf_counter()
    deadline = start + seconds
    tolerated: tuple[type[BaseException], ...] = (aiohttp.ClientError,) if count_client_errors else ()

    async def worker(w: int) -> None:
        nonlocal done, errors
        i = w
        while time.perf_counter() < deadline:
            try:
                status = await send(session, base, i, chat)
            except tolerated:
                status = 0
            i += concurrency
            if status == 200:
                done += 1
            else:
                errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Slice(done, errors, time.perf_counter() - start)


async def open_loop(session: aiohttp.ClientSession, base: str, rate: float, seconds: float) -> Slice:
    """Start request i at t0 + i/rate whatever the others are doing; latency from its start."""
    latencies: list[float] = []
    errors = 0
    max_lag = 0.0

    async def one(i: int) -> None:
        nonlocal errors
        t = time.perf_counter()
        status = await send(session, base, i, None)
        if status == 200:
            latencies.append(time.perf_counter() - t)
        else:
            errors += 1

    n = round(rate * seconds)
    tasks = []
    t0 = time.perf_counter() + 0.002
    for i in range(n):
        when = t0 + i / rate
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - when)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    out = Slice(len(latencies), errors, time.perf_counter() - t0, latencies=latencies)
    out.max_lag_ms = max_lag * 1000
    return out


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=AUTH) as resp:
        return resp.status, await resp.text()


async def wait_ready(proc: Proc, url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        proc.check()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            status, _ = await get_text(url)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready at {url} after {within_s:g}s")
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The load generator's own garbage collection stays out of the measured latencies."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def chat_body(size: int) -> bytes:
    """A chat completion request of about ``size`` bytes: a system prompt and a transcript."""
    words = "the quarterly review covered revenue churn hiring and the roadmap for next year".split()
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You summarise meeting transcripts in three bullet points."}
    ]
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": messages, "max_tokens": 512, "temperature": 0.2}
    turn = 0
    while len(json.dumps(body)) < size:
        text = " ".join(words[(turn + k) % len(words)] for k in range(40))
        messages.append(
            {"role": "user" if turn % 2 == 0 else "assistant", "content": f"Speaker {turn}: {text}"}
        )
        turn += 1
    return json.dumps(body).encode()
