"""Housekeeping survives cancellation and half-open sockets (issue 9; ADMISSION.md I4, I7).

- The shared Redis (re)connect is shielded: cancelling the first caller awaiting it (a
  client leaving) neither fails the others nor kills a background task awaiting it.
- Background tasks run supervised: one that dies is restarted, and its liveness exported.
- The wake-up subscription notices a half-open socket (a PING unanswered) and resubscribes,
  so release-to-admission lag stays in milliseconds.

A TCP proxy written here sits between the gateway and the real Redis (127.0.0.1:6379, a
fresh key prefix per test): it can hold new connections before they reach Redis, drop the
connections it carries, or black-hole them (stop forwarding without closing: half-open).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, generate_latest

from gateway.admission import health
from gateway.admission.engine import AdmissionEngine, Grant
from gateway.admission.keys import Keys
from gateway.admission.limits import RANK_CONCURRENCY, RANK_MODEL, Limit, concurrency_limit
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.redis_store import RedisStore, make_client
from gateway.clock import SystemClock
from gateway.metrics import Metrics
from tests.conftest import REDIS_URL, redis_client

JOBS = concurrency_limit("async", 1, 30.0, rank=RANK_CONCURRENCY)


class Proxy:
    """A TCP proxy to Redis that can hold, drop or black-hole connections."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.open_new = asyncio.Event()
        self.open_new.set()
        self.conns: list[_Conn] = []  # carried now (drop/black-hole act on these)
        self.every: list[_Conn] = []  # ever carried (closed at the end)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, db: str) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self.conns.append(conn)
        self.every.append(conn)
        await self.open_new.wait()  # held: the client's handshake is in flight
        if conn.dropped:
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        conn.up = up_writer
        conn.pumps = [
            asyncio.create_task(_pump(reader, up_writer, conn)),
            asyncio.create_task(_pump(up_reader, writer, conn)),
        ]

    def hold_new(self) -> None:
        self.open_new.clear()

    def release_new(self) -> None:
        self.open_new.set()

    def drop_all(self) -> None:
        """Close every connection carried now (the client sees a reset)."""
        for conn in self.conns:
            conn.close()
        self.conns.clear()

    def blackhole_all(self) -> None:
        """Stop forwarding on every connection carried now, closing nothing: half-open."""
        for conn in self.conns:
            conn.muted = True
        self.conns.clear()

    async def close(self) -> None:
        for conn in self.every:
            conn.close()
        for conn in self.every:
            await asyncio.gather(*conn.pumps, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _Conn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.up: asyncio.StreamWriter | None = None
        self.pumps: list[asyncio.Task[None]] = []
        self.muted = False
        self.dropped = False

    def close(self) -> None:
        self.dropped = True
        for task in self.pumps:
            task.cancel()
        for w in (self.writer, self.up):
            if w is not None:
                w.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            if not conn.muted:
                writer.write(data)


@asynccontextmanager
async def proxy() -> AsyncIterator[Proxy]:
    target = urlparse(REDIS_URL)
    p = Proxy(target.hostname or "127.0.0.1", target.port or 6379)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


def db() -> str:
    return urlparse(REDIS_URL).path.lstrip("/") or "0"


@asynccontextmanager
async def cleanup(keys: Keys) -> AsyncIterator[None]:
    try:
        yield
    finally:
        probe = await redis_client()
        async for key in probe.scan_iter(match=f"{keys.prefix}:*"):
            await probe.delete(key)
        await probe.aclose()


def fresh_keys() -> Keys:
    return Keys(prefix="hk" + uuid.uuid4().hex[:10], account="acct")


async def until(check: Callable[[], bool], within: float) -> float:
    """Real time until ``check()`` holds (end-to-end tests only); fails after ``within``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > within:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.002)
    return time.monotonic() - t0


# -- the shared connect ------------------------------------------------------------------------
async def test_cancelling_the_first_caller_never_cancels_the_shared_connect() -> None:
    async with proxy() as p:
        # A database other than 0 makes the connect include a SELECT: the connect stays in
        # flight while the proxy holds the new connection.
        conn = PipelinedRedis(p.url(db() if db() != "0" else "1"), timeout_ms=2000, connect_timeout_ms=2000)
        try:
            assert await conn.call("PING") == b"PONG"
            p.hold_new()
            p.drop_all()
            await asyncio.sleep(0)  # the loss reaches the client
            await until(lambda: conn._proto is None or conn._proto.lost is not None, 1.0)
            first = asyncio.ensure_future(conn.call("PING"))  # starts the reconnect
            await until(lambda: conn._connecting is not None, 1.0)
            second = asyncio.ensure_future(conn.call("PING"))  # joins it
            await asyncio.sleep(0.01)
            first.cancel()  # the first caller leaves while the connect is in flight
            await asyncio.sleep(0.01)
            p.release_new()
            assert await asyncio.wait_for(second, 2.0) == b"PONG"  # it was cancelled before the fix
            assert first.cancelled()
            assert await conn.call("PING") == b"PONG"
        finally:
            await conn.close()


async def test_a_client_leaving_mid_reconnect_kills_no_housekeeping_and_order_holds() -> None:
    """The reproduction: the first caller awaiting a reconnect is a waiter that leaves. The
    housekeeping task awaiting the same connect must survive and keep refreshing the older
    waiters' reservations (the second one has no timer: only housekeeping refreshes it), so
    a newer request never takes the limit the older ones passed."""
    keys = fresh_keys()
    clock = SystemClock()
    model = concurrency_limit("llm:m", 2, 30.0, rank=RANK_MODEL)
    async with proxy() as p, cleanup(keys):
        near = make_client(REDIS_URL, timeout_ms=2000, connect_timeout_ms=2000)
        pipe = PipelinedRedis(p.url(db()), timeout_ms=2000, connect_timeout_ms=2000)
        store = RedisStore(near, keys, pipelined=pipe)
        other = RedisStore(near, keys, pipelined=PipelinedRedis(REDIS_URL, timeout_ms=2000))
        engine = AdmissionEngine(store, clock, ticket_ttl_ms=1000, recheck_s=0.1, instance="a")
        rival = AdmissionEngine(other, clock, ticket_ttl_ms=4000, recheck_s=0.1, instance="b")
        await engine.start()
        await rival.start()
        order: list[str] = []

        async def admit(e: AdmissionEngine, name: str, *limits: Limit) -> Grant:
            grant = await e.admit(limits, max_wait_s=10)
            order.append(name)
            return grant

        try:
            holder = await rival.admit([JOBS], max_wait_s=1)
            # old1 and old2 pass the model limit (a reservation each: it is full) and wait on JOBS.
            old1 = asyncio.ensure_future(admit(engine, "old1", model, JOBS))
            await asyncio.sleep(0.02)
            old2 = asyncio.ensure_future(admit(engine, "old2", model, JOBS))
            await asyncio.sleep(0.05)
            p.hold_new()
            p.drop_all()  # the engine's connection is lost; its reconnect hangs a while
            await until(lambda: pipe._proto is None or pipe._proto.lost is not None, 1.0)
            leaving = asyncio.ensure_future(admit(engine, "leaving", JOBS))  # first caller of the reconnect
            await asyncio.sleep(0.6)  # housekeeping's refresh (due after ttl/2) now awaits it too
            leaving.cancel()
            await asyncio.sleep(0.05)
            p.release_new()
            await asyncio.sleep(1.3)  # old2's reservation (1 s) lives only if housekeeping refreshes it
            new = asyncio.ensure_future(admit(rival, "new", model))  # newer, needs only the model limit
            await asyncio.sleep(0.1)
            assert order == [], order  # the model limit is the old waiters': new waits behind them
            await rival.release(holder)
            await engine.release(await asyncio.wait_for(old1, 3.0))
            await engine.release(await asyncio.wait_for(old2, 3.0))
            await rival.release(await asyncio.wait_for(new, 3.0))
            assert order.index("old1") < order.index("old2"), order
            assert health.ALIVE.get("engine-housekeeping", 0) >= 2  # both engines' loops alive
        finally:
            await engine.close()
            await rival.close()
            for s in (store, other):
                await s.close()
            await near.aclose()


# -- supervision --------------------------------------------------------------------------------
async def test_a_background_task_that_dies_is_restarted_and_its_liveness_exported() -> None:
    name = "test-" + uuid.uuid4().hex[:6]
    runs: list[str] = []
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    forever: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def no_wait(_: float) -> None:
        return None

    async def work() -> None:
        runs.append("run")
        if len(runs) == 1:
            raise RuntimeError("boom")  # an exception
        if len(runs) == 2:
            await shared  # someone else cancels what it awaits: CancelledError, not its own
        if len(runs) == 3:
            return  # a loop that returns is dead too
        await forever

    task = health.supervise(name, work, sleep=no_wait)
    for _ in range(5):
        await asyncio.sleep(0)
    shared.cancel()
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(runs) == 4 and health.RESTARTS[name] == 3 and health.ALIVE[name] == 1

    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    assert f'aai_gateway_background_alive{{task="{name}"}} 1.0' in text
    assert f'aai_gateway_background_restarts_total{{task="{name}"}} 3.0' in text

    task.cancel()  # shutdown is not a death
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled() and health.RESTARTS[name] == 3 and health.ALIVE[name] == 0


async def test_a_loop_that_swallows_a_cancellation_still_stops_and_the_store_closes() -> None:
    """Python 3.11's wait_for can swallow a cancellation that races its result (the store's
    heartbeat, every 50 ms, makes that race likely): shutdown cancels again until the task
    ends; a single cancel left FallbackStore.close to its 5 s bound (CI saw an 8 s exit)."""
    from gateway.admission.fallback import FallbackStore
    from gateway.admission.memory import MemoryStore

    swallowed: list[int] = []

    async def beat() -> int:  # most of the loop's time is spent here: that is where a cancel lands
        try:
            await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(1)  # once, as the 3.11 race does: the reply came, the cancel is lost
        return 2

    name = "test-" + uuid.uuid4().hex[:6]

    async def loop() -> None:
        while True:
            await beat()

    task = health.supervise(name, loop)
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await health.stop_tasks(task, every_s=0.05)
    assert task.done() and swallowed == [1] and time.monotonic() - started < 1.0

    clock = SystemClock()
    store = FallbackStore(MemoryStore(clock), clock, beat=beat, heartbeat_s=0.0001)
    await store.subscribe(lambda _: None)
    await asyncio.sleep(0.02)
    swallowed.clear()
    started = time.monotonic()
    await store.close()
    assert time.monotonic() - started < 1.0, "close waited on a heartbeat loop that went on"


# -- the wake-up subscription -------------------------------------------------------------------
async def test_a_half_open_subscription_is_noticed_and_wakeups_stay_prompt() -> None:
    keys = fresh_keys()
    clock = SystemClock()
    async with proxy() as p, cleanup(keys):
        # The subscription goes through the proxy; the scripts go straight to Redis.
        far = make_client(p.url(db()), timeout_ms=2000, connect_timeout_ms=2000)
        near = make_client(REDIS_URL, timeout_ms=2000, connect_timeout_ms=2000)
        store = RedisStore(far, keys, pipelined=PipelinedRedis(REDIS_URL, timeout_ms=2000), heartbeat_s=0.1)
        other = RedisStore(near, keys, pipelined=PipelinedRedis(REDIS_URL, timeout_ms=2000))
        # No periodic re-check worth the name: only a wake-up message admits the waiter.
        engine = AdmissionEngine(store, clock, ticket_ttl_ms=20_000, recheck_s=60)
        await engine.start()
        try:
            lags = []
            for round_ in range(2):
                ticket = f"holder{round_}"
                assert (await other.acquire(_req(ticket))).admitted
                waiter = asyncio.ensure_future(engine.admit([JOBS], max_wait_s=10))
                await asyncio.sleep(0.05)
                if round_ == 1:
                    p.blackhole_all()  # the subscription's socket goes half-open
                    await asyncio.sleep(0.5)  # a few heartbeats
                t0 = time.monotonic()
                await other.release(ticket, [JOBS])
                grant = await asyncio.wait_for(waiter, 5.0)
                lags.append(time.monotonic() - t0)
                await engine.release(grant)
            assert store.heartbeat_failures >= 1
            assert max(lags) < 0.1, lags  # milliseconds, as before the socket went half-open
        finally:
            await engine.close()
            for s in (store, other):
                await s.close()
            await far.aclose()
            await near.aclose()


def _req(ticket: str):  # type: ignore[no-untyped-def]
    from gateway.admission.store import AcquireRequest

    return AcquireRequest(ticket, (JOBS,))


async def test_a_release_the_store_could_not_take_is_sent_again_when_it_answers() -> None:
    """A job's concurrency lease outlives its job by a Redis blip at most, not by its TTL
    (hours): the release that follows the job's end failed once, and housekeeping sends it
    again. Found by the soak: a leaked lease per blip until no job was dispatched at all."""
    from gateway.app import ENGINE
    from gateway.errors import StoreUnavailable
    from gateway.sim.app import SimConfig
    from tests.helpers import sim_and_gateway

    key = {"Authorization": "k"}
    async with sim_and_gateway(
        SimConfig(async_concurrency=1, job_seconds=0.3),
        store="redis",
        limits={"async_concurrency": 1},
        transcripts={"poll_refresh_s": 0.1},
    ) as (sim, url, app):
        store = app[ENGINE].store
        real = store.release
        failed: list[str] = []

        async def once_unavailable(ticket: str, limits: list[Limit], *, tombstone: bool = False) -> int:
            if not failed and any(limit.name == "async" for limit in limits):
                failed.append(ticket)
                raise StoreUnavailable("injected: one Redis blip on the release")
            return await real(ticket, limits, tombstone=tombstone)

        store.release = once_unavailable  # type: ignore[method-assign]
        import aiohttp

        async with aiohttp.ClientSession() as http:

            async def submit(name: str) -> str:
                body = {"audio_url": f"https://x/{name}.mp3"}
                async with http.post(url + "/v2/transcript", json=body, headers=key) as r:
                    return str((await r.json())["id"])

            async def status(job_id: str) -> str:
                async with http.get(f"{url}/v2/transcript/{job_id}", headers=key) as r:
                    return str((await r.json()).get("status"))

            first = await submit("a")
            deadline = time.monotonic() + 10
            while await status(first) != "completed":
                assert time.monotonic() < deadline, "the first job never completed"
                await asyncio.sleep(0.05)
            assert failed, "the release after the job's end was not made to fail"
            second = await submit("b")  # dispatched once the owed release lands
            while await status(second) != "completed":
                assert time.monotonic() < deadline, "the second job was never dispatched: a lease leaked"
                await asyncio.sleep(0.05)
        assert app[ENGINE].owed_releases == 0
    assert sim.report()["violations"] == []


async def test_an_abort_the_store_could_not_take_is_owed_and_lands_later() -> None:
    """A waiter that gives up while the store is away: its abort is owed, not forgotten, so
    an acquire that sat in Redis's socket and ran on its return gives its place back."""
    from gateway.admission.memory import MemoryStore
    from gateway.clock import ManualClock
    from gateway.errors import StoreUnavailable

    clock = ManualClock()
    store = MemoryStore(clock)
    engine = AdmissionEngine(store, clock)
    holder = await engine.admit([JOBS], max_wait_s=1)
    real = store.release
    down = True

    async def flaky(ticket: str, limits: list[Limit], *, tombstone: bool = False) -> int:
        if down:
            raise StoreUnavailable("injected: the store is away")
        return await real(ticket, limits, tombstone=tombstone)

    store.release = flaky  # type: ignore[method-assign]
    waiting = asyncio.ensure_future(engine.admit([JOBS], max_wait_s=60, ticket="w"))
    for _ in range(5):
        await asyncio.sleep(0)
    waiting.cancel()  # the client leaves while the store is away
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert engine.owed_releases == 1
    assert await engine.settle_owed() == 0  # still away: kept
    down = False
    assert await engine.settle_owed() == 1
    assert engine.owed_releases == 0
    await engine.release(holder)
    assert await store.usage(JOBS) == (0, 0)  # nothing of the waiter is left
