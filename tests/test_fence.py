"""The outage fence (gateway/admission/fallback.py, acquire.lua): while one instance admits
locally through a Redis outage, no other admits from Redis.

An instance that loses Redis reuses its own tokens as they end; Redis sees them end too, and
an instance still on Redis would hand the same room out again (a soak run saw 31 of 30 on a
3 s window: one gateway's replies came back 0.15 s after Redis resumed, the others had gone
local 0.3 s before). So an acquire admits nothing while the fence is up, and the fence goes
up two ways: the instance that lost Redis raises it (sent at once; a stalled Redis runs it as
it resumes), and Redis raises it itself when it finds it was silent for longer than the gap
(no acquire and no heartbeat ran: the heartbeats come every 50 ms), whatever ran first.
A fenced instance goes local too, and every one writes back before any switches back.

The scripts run on fakeredis (its Lua TIME follows the test's clock) and the real Redis; the
last test freezes a private redis-server with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import fakeredis
import pytest

from gateway.admission.engine import AdmissionEngine
from gateway.admission.fallback import FallbackStore
from gateway.admission.fence import gap_ms, heartbeat
from gateway.admission.keys import Keys
from gateway.admission.limits import RANK_WINDOW, Limit, window_limit
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.redis_store import RedisStore, make_client
from gateway.admission.store import AcquireRequest, AcquireResult, Status
from gateway.clock import ManualClock, SystemClock
from gateway.errors import Fenced, StoreUnavailable
from tests.conftest import REDIS_URL, frozen_manual_clock
from tests.soak_support import PausableRedis

WINDOW = window_limit("requests", 6, 5.0, 0, rank=RANK_WINDOW)
FENCE_MS, GAP_MS = 600, 200


class Env:
    """Two gateway instances' stores on one Redis (fakeredis or the real one), with the
    fence on, and a way to make Redis look silent for a while."""

    def __init__(self, kind: str, keys: Keys, client: Any, clock: ManualClock | None) -> None:
        self.kind, self.keys, self.client, self.clock = kind, keys, client, clock
        self.stores: list[RedisStore] = []

    def store(self, *, fence_ms: int = FENCE_MS) -> RedisStore:
        if self.kind == "fakeredis":
            store = RedisStore(self.client, self.keys, shebang=False, fence_ms=fence_ms, gap_ms=GAP_MS)
        else:
            pipe = PipelinedRedis(REDIS_URL, timeout_ms=2000)
            store = RedisStore(self.client, self.keys, pipelined=pipe, fence_ms=fence_ms, gap_ms=GAP_MS)
        self.stores.append(store)
        return store

    async def instances(self, n: int) -> None:
        for i in range(n):
            await heartbeat(self.client, self.keys, f"i{i}", gap_ms=GAP_MS)()

    async def silence(self, ms: int) -> None:
        """Nothing ran on Redis for ``ms``: the clock moves (fakeredis), or the tick is set back."""
        if self.clock is not None:
            await self.clock.advance(ms / 1000)
        else:
            seconds, micros = await self.client.time()
            await self.client.set(self.keys.tick, seconds * 1000 + micros // 1000 - ms)

    async def fence_left(self) -> int:
        return int(await self.client.pttl(self.keys.fence))


@pytest.fixture(params=["fakeredis", "redis"])
async def env(request: pytest.FixtureRequest, keys: Keys) -> AsyncIterator[Env]:
    if request.param == "fakeredis":
        with frozen_manual_clock() as clock:
            client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
            yield Env("fakeredis", keys, client, clock)
            await client.aclose()
        return
    client = make_client(REDIS_URL, timeout_ms=2000, connect_timeout_ms=2000)
    environment = Env("redis", keys, client, None)
    yield environment
    for store in environment.stores:
        await store.close()
    async for key in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(key)
    await client.aclose()


def request(ticket: str) -> AcquireRequest:
    return AcquireRequest(ticket, (WINDOW,))


async def test_a_silence_longer_than_the_gap_raises_the_fence_and_nothing_is_taken(env: Env) -> None:
    a, b = env.store(), env.store()
    await env.instances(2)
    assert (await a.acquire(request("t1"))).status is Status.ADMITTED  # the tick starts
    await env.silence(GAP_MS + 100)
    with pytest.raises(Fenced):
        await b.acquire(request("t2"))
    assert 0 < await env.fence_left() <= FENCE_MS
    with pytest.raises(Fenced):  # every acquire after it, from any instance
        await a.acquire(request("t3"))
    assert await b.usage(WINDOW) == (1, 0)  # t1 only: nothing taken, nothing queued
    assert not await env.client.exists(env.keys.tomb("t2"))
    await env.client.delete(env.keys.fence)  # it lapses
    assert (await b.acquire(request("t2"))).status is Status.ADMITTED


async def test_a_heartbeat_after_the_silence_raises_it_too(env: Env) -> None:
    a = env.store()
    await env.instances(2)
    await env.silence(GAP_MS + 100)
    await heartbeat(env.client, env.keys, "i0", gap_ms=GAP_MS)()
    assert await env.fence_left() > 0
    with pytest.raises(Fenced):
        await a.acquire(request("t1"))


async def test_a_silence_shorter_than_the_gap_raises_nothing(env: Env) -> None:
    a = env.store()
    await env.instances(2)
    assert (await a.acquire(request("t1"))).status is Status.ADMITTED
    await env.silence(GAP_MS - 50)
    assert (await a.acquire(request("t2"))).status is Status.ADMITTED
    assert await env.fence_left() < 0


async def test_alone_an_instance_is_never_fenced_by_a_silence(env: Env) -> None:
    a = env.store()
    await env.instances(1)  # nobody else could be admitting locally
    assert (await a.acquire(request("t1"))).status is Status.ADMITTED
    await env.silence(5000)
    assert (await a.acquire(request("t2"))).status is Status.ADMITTED


async def test_fail_closed_has_no_fence(env: Env) -> None:
    a = env.store(fence_ms=0)
    await env.instances(2)
    await env.client.set(env.keys.fence, "1", px=5000)
    await env.silence(5000)
    assert (await a.acquire(request("t1"))).status is Status.ADMITTED


async def test_a_raised_fence_is_never_shortened(env: Env) -> None:
    a, b = env.store(), env.store()
    assert await a.fence(FENCE_MS, 1.0)
    assert await b.fence(100, 1.0)
    assert await env.fence_left() > 100
    with pytest.raises(Fenced):
        await b.acquire(request("t1"))


# -- through the FallbackStore ----------------------------------------------------------------
class Flaky:
    """A RedisStore whose next ``fail`` acquires time out (this instance alone lost Redis for
    a moment: its own event loop stalled past the timeout, say), all else passing through."""

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner
        self.fail = 0
        self.kind = "redis"

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        if self.fail:
            self.fail -= 1
            raise StoreUnavailable("redis unavailable during acquire: TimeoutError (test)")
        return await self.inner.acquire(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def admitted(engine: AdmissionEngine, limits: Sequence[Limit], tries: int) -> int:
    got = 0
    for _ in range(tries):
        with contextlib.suppress(Exception):
            await engine.admit(list(limits), max_wait_s=0)
            got += 1
    return got


async def until(check: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "not in time"
        await asyncio.sleep(0.02)


async def test_an_instance_that_loses_redis_alone_sends_the_others_local_too(keys: Keys) -> None:
    clock = SystemClock()
    client = make_client(REDIS_URL, timeout_ms=2000, connect_timeout_ms=2000)
    flaky = Flaky(RedisStore(client, keys, fence_ms=FENCE_MS, gap_ms=GAP_MS))
    steady = RedisStore(client, keys, fence_ms=FENCE_MS, gap_ms=GAP_MS)
    stores = [  # settle_s as in production: the fence (0.6 s) is gone before anyone switches back
        FallbackStore(flaky, clock, beat=heartbeat(client, keys, "a", gap_ms=GAP_MS), settle_s=1.0),  # type: ignore[arg-type]
        FallbackStore(steady, clock, beat=heartbeat(client, keys, "b", gap_ms=GAP_MS), settle_s=1.0),
    ]
    engines = [AdmissionEngine(store, clock, recheck_s=0.1) for store in stores]
    try:
        for engine in engines:
            await engine.start()
        await until(lambda: all(s.instances == 2 for s in stores))
        a, b = engines
        assert await admitted(a, [WINDOW], 2) == 2  # through Redis: 2 of 6
        flaky.fail = 1
        await admitted(a, [WINDOW], 1)  # a loses Redis: it goes local, and raises the fence
        assert stores[0].degraded
        assert await client.pttl(keys.fence) > 0
        # b is fenced: it goes local too rather than hand out the room a's tokens leave as
        # they end (4 are left in Redis); its share (3) holds placeholders for a lease life.
        # What b admits, it admits from Redis once a admits locally no more.
        safe: list[bool] = []

        async def b_admits() -> None:
            await b.admit([WINDOW], max_wait_s=4.0)
            safe.append(not stores[0].degraded or stores[0].settling)

        results = await asyncio.gather(*(b_admits() for _ in range(5)), return_exceptions=True)
        assert stores[1].outage.count == 1 and stores[0].outage.count == 1
        assert safe == [True] * 4, (safe, results)
        await until(lambda: not any(s.degraded for s in stores))
        assert await steady.usage(WINDOW) == (6, 0)  # a's 2 written back, b's 4: never over
    finally:
        for engine in engines:
            await engine.close()
        for store in stores:
            await store.close()
        async for key in client.scan_iter(match=f"{keys.prefix}:*"):
            await client.delete(key)
        await client.aclose()


async def test_a_stalled_redis_fences_the_instance_that_never_noticed(keys: Keys) -> None:
    """SIGSTOP: a's calls time out mid-stall and a goes local; b sends nothing during it. The
    first thing b asks after the resume is fenced by Redis's own check of the silence: a
    raises no fence itself here, and b has no heartbeat of its own to notice the stall with
    (it is counted alive by one beat at the start)."""
    redis = PausableRedis()
    await redis.start()
    clock = SystemClock()
    clients: list[Any] = []
    stores: list[FallbackStore] = []
    gap = gap_ms(250)
    try:
        for name in ("a", "b"):
            client = make_client(redis.url, timeout_ms=250, connect_timeout_ms=500)
            clients.append(client)
            pipe = PipelinedRedis(redis.url, timeout_ms=250)
            shared = RedisStore(client, keys, pipelined=pipe, fence_ms=FENCE_MS, gap_ms=gap)
            if name == "a":
                beat = heartbeat(client, keys, name, gap_ms=gap)
                stores.append(FallbackStore(shared, clock, beat=beat, settle_s=0.5, fence_ms=0))
            else:
                await heartbeat(client, keys, name, gap_ms=gap)()
                stores.append(FallbackStore(shared, clock, settle_s=0.5))
        engines = [AdmissionEngine(store, clock, recheck_s=0.1) for store in stores]
        for engine in engines:
            await engine.start()
        await until(lambda: stores[0].instances == 2)
        a, b = engines
        assert await admitted(a, [WINDOW], 1) == 1
        redis.pause()
        try:
            await admitted(a, [WINDOW], 1)  # times out after 250 ms: a goes local
            assert stores[0].degraded and not stores[1].degraded
            await asyncio.sleep(0.2)
        finally:
            redis.resume()
        await admitted(b, [WINDOW], 1)
        assert stores[1].degraded, "b admitted from Redis while a admitted locally"
        await until(lambda: not any(s.degraded for s in stores))
        for engine in engines:
            await engine.close()
    finally:
        redis.resume()
        for store in stores:
            await store.close()
        for client in clients:
            await client.aclose()
        redis.kill()


async def test_a_fence_sent_during_a_stall_lands_as_redis_resumes(keys: Keys) -> None:
    """The instance's own fence, with Redis's check of the silence out of the way: sent while
    Redis is stopped, it times out here, and Redis runs it when it resumes."""
    redis = PausableRedis()
    await redis.start()
    client = make_client(redis.url, timeout_ms=250, connect_timeout_ms=500)
    store = RedisStore(client, keys, fence_ms=FENCE_MS, gap_ms=10**9)
    probe = make_client(redis.url, timeout_ms=2000, connect_timeout_ms=2000)
    try:
        await store.ping()
        redis.pause()
        try:
            assert not await store.fence(FENCE_MS, 0.3)  # no answer from a stopped Redis
        finally:
            redis.resume()
        await until(lambda: True)
        assert 0 < await probe.pttl(keys.fence) <= FENCE_MS
    finally:
        redis.resume()
        await store.close()
        await probe.aclose()
        redis.kill()
