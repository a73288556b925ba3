"""Life through a Redis outage (issue 10, ``redis.on_outage: fail_open``; gateway/admission/fallback.py).

Each instance admits locally within its share of every limit (capacity // live instances),
counting what it was granted just before the outage; when Redis returns it writes back what
it holds, settles, and switches back. Here "Redis" is one shared embedded store behind a
switch (so the outage is exact and instant); tests/test_outage_e2e.py does it with a real
redis-server that is SIGSTOPped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest

from gateway.admission.engine import AdmissionEngine
from gateway.admission.fallback import FallbackStore
from gateway.admission.limits import RANK_CONCURRENCY, RANK_WINDOW, Limit, concurrency_limit, window_limit
from gateway.admission.memory import MemoryStore
from gateway.admission.store import AcquireRequest, AcquireResult, WakeCallback
from gateway.clock import SystemClock
from gateway.errors import StoreUnavailable, WaitTimeout

WINDOW = window_limit("requests", 6, 5.0, 0, rank=RANK_WINDOW)
JOBS = concurrency_limit("async", 3, 60.0, rank=RANK_CONCURRENCY)


class Switched:
    """The shared store behind a switch: down, every verb raises StoreUnavailable."""

    kind = "redis"

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("redis unavailable (test switch)")

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        self._check()
        return await self.inner.acquire(request)

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        self._check()
        return await self.inner.release(ticket, limits, tombstone=tombstone)

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        self._check()
        return await self.inner.refresh(limits, tickets, ttl_ms)

    async def renew(self, ticket: str, limit: Limit, ttl_ms: int, *, create: bool = False) -> bool:
        self._check()
        return await self.inner.renew(ticket, limit, ttl_ms, create=create)

    async def subscribe(self, callback: WakeCallback) -> None:
        await self.inner.subscribe(callback)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        self._check()
        return await self.inner.usage(limit)

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        return None


@asynccontextmanager
async def instances(
    n: int, **options: float
) -> AsyncIterator[tuple[Switched, list[FallbackStore], list[AdmissionEngine]]]:
    clock = SystemClock()
    redis = Switched(MemoryStore(clock))

    async def beat() -> int:
        redis._check()
        return n

    options = {"heartbeat_s": 0.02, "settle_s": 0.1, **options}
    stores = [FallbackStore(redis, clock, beat=beat, **options) for _ in range(n)]  # type: ignore[arg-type]
    engines = [AdmissionEngine(store, clock, recheck_s=0.1) for store in stores]
    for engine in engines:
        await engine.start()
    await asyncio.sleep(0.05)  # a heartbeat: every instance counts n
    try:
        yield redis, stores, engines
    finally:
        for engine in engines:
            await engine.close()
        for store in stores:
            await store.close()


async def admitted(engine: AdmissionEngine, limits: list[Limit], tries: int) -> int:
    got = 0
    for _ in range(tries):
        with contextlib.suppress(WaitTimeout):
            await engine.admit(limits, max_wait_s=0)
            got += 1
    return got


async def until(check: object, within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "not in time"
        await asyncio.sleep(0.02)


async def test_each_instance_admits_its_part_of_what_the_account_had_left() -> None:
    async with instances(3) as (redis, stores, (a, b, c)):
        assert all(s.instances == 3 for s in stores)
        for engine in (a, b, c):  # through Redis: each reply says how many tokens are out
            assert await admitted(engine, [WINDOW], 1) == 1
        redis.down = True
        # 3 of 6 out: each instance may take (6 - what it last saw out) // 3 more.
        assert await admitted(a, [WINDOW], 4) == 1  # saw 1 out: 5 // 3
        assert await admitted(b, [WINDOW], 4) == 1  # saw 2 out: 4 // 3
        assert await admitted(c, [WINDOW], 4) == 1  # saw 3 out: 3 // 3
        assert all(s.degraded for s in stores)
        assert sum(s.outage.count for s in stores) == 3
        redis.down = False
        await until(lambda: not any(s.degraded for s in stores))
        # Written back: Redis counts every token taken, before and during the outage.
        assert (await redis.inner.usage(WINDOW))[0] == 6
        assert await admitted(b, [WINDOW], 2) == 0  # the window is full, as upstream sees it
        assert all(s.outage.last_s > 0 for s in stores)


async def test_uneven_use_before_the_outage_never_puts_the_account_over() -> None:
    """One instance took most of the window just before Redis died: the others must not
    each take a full share on top (that would be 4 + 2 + 2 of 6)."""
    async with instances(3) as (redis, stores, (a, b, c)):
        assert await admitted(a, [WINDOW], 4) == 4
        assert await admitted(b, [WINDOW], 1) == 1  # B saw 5 out
        redis.down = True
        got = [await admitted(e, [WINDOW], 4) for e in (a, b, c)]
        assert got == [0, 0, 0], got  # A: 2 // 3, B: 1 // 3, C never saw the limit: full
        assert 5 + sum(got) <= WINDOW.capacity
        redis.down = False
        await until(lambda: not any(s.degraded for s in stores))


async def test_concurrency_leases_held_across_the_outage_stay_counted() -> None:
    async with instances(1) as (redis, (store,), (a,)):
        job = await a.admit([JOBS], max_wait_s=0)  # a job running upstream
        redis.down = True
        assert await admitted(a, [JOBS], 5) == 2  # 3 in all, the running one counted
        await a.release(job)  # it ended during the outage: released locally, owed to Redis
        assert a.owed_releases == 1
        assert await admitted(a, [JOBS], 2) == 1
        redis.down = False
        await until(lambda: not store.degraded and a.owed_releases == 0)
        # Redis holds what runs: the 3 granted during the outage, not the ended job.
        assert (await redis.inner.usage(JOBS))[0] == 3


async def test_a_waiter_keeps_waiting_through_the_outage_and_is_admitted() -> None:
    async with instances(1) as (redis, (store,), (a,)):
        small = window_limit("small", 1, 0.3, 0, rank=RANK_WINDOW)
        await a.admit([small], max_wait_s=0)
        waiting = asyncio.ensure_future(a.admit([small], max_wait_s=5))
        await asyncio.sleep(0.05)
        redis.down = True
        grant = await asyncio.wait_for(waiting, 3)  # admitted locally once the window frees
        assert grant.limits == (small,)
        assert store.degraded
        redis.down = False
        await until(lambda: not store.degraded)


async def test_with_more_instances_than_tokens_requests_wait_for_redis() -> None:
    async with instances(3) as (redis, stores, (a, _, _)):
        two = window_limit("two", 2, 5.0, 0, rank=RANK_WINDOW)
        redis.down = True
        waiting = asyncio.ensure_future(a.admit([two], max_wait_s=5))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # share 2 // 3 = 0: nothing is admitted blind
        redis.down = False
        grant = await asyncio.wait_for(waiting, 3)
        assert grant.limits == (two,)


@pytest.mark.parametrize("down_first", [True])
async def test_fail_closed_is_a_503_at_once(down_first: bool) -> None:
    clock = SystemClock()
    redis = Switched(MemoryStore(clock))
    engine = AdmissionEngine(redis, clock)
    await engine.start()
    try:
        redis.down = down_first
        with pytest.raises(StoreUnavailable):
            await engine.admit([WINDOW], max_wait_s=1)
    finally:
        await engine.close()
