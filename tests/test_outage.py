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


async def test_each_instance_reuses_its_own_tokens_then_admits_its_share() -> None:
    short = window_limit("short", 6, 0.4, 0, rank=RANK_WINDOW)
    async with instances(3) as (redis, stores, (a, b, c)):
        assert all(s.instances == 3 for s in stores)
        assert await admitted(a, [short], 3) == 3  # through Redis: 4 of 6 out
        assert await admitted(b, [short], 1) == 1
        redis.down = True
        # What was left (2) is not handed out: each instance's share (2) holds its own
        # tokens and placeholders for one lease life.
        assert [await admitted(e, [short], 3) for e in (a, b, c)] == [0, 0, 0]
        assert all(s.degraded for s in stores)
        await asyncio.sleep(short.lease_ms / 1000 + 0.05)  # every token from before is back
        got = [await admitted(e, [short], 3) for e in (a, b, c)]
        assert got == [2, 2, 2], got  # a share each: the window, never over it
        assert sum(s.outage.count for s in stores) == 3
        redis.down = False
        await until(lambda: not any(s.degraded for s in stores))
        # Written back: Redis counts every token taken during the outage.
        assert (await redis.inner.usage(short))[0] == 6
        assert await admitted(b, [short], 2) == 0  # the window is full, as upstream sees it
        assert all(s.outage.last_s > 0 for s in stores)


async def test_a_view_older_than_the_others_grants_hands_out_nothing() -> None:
    """A saw 1 of 6 out; then B and C took the rest; then Redis died. A's part of what it
    saw left (5 // 3) was already taken: handing it out put the account over (the soak's
    31 of 30). No instance admits until its own tokens end or a lease life passes."""
    async with instances(3) as (redis, stores, (a, b, c)):
        assert await admitted(a, [WINDOW], 1) == 1
        assert await admitted(b, [WINDOW], 3) == 3
        assert await admitted(c, [WINDOW], 2) == 2  # 6 of 6 out
        redis.down = True
        assert [await admitted(e, [WINDOW], 3) for e in (a, b, c)] == [0, 0, 0]
        redis.down = False
        await until(lambda: not any(s.degraded for s in stores))
        assert (await redis.inner.usage(WINDOW))[0] == 6


async def test_uneven_use_before_the_outage_never_puts_the_account_over() -> None:
    """One instance took most of the window just before Redis died: the others must not
    each take a full share on top (that would be 4 + 2 + 2 of 6)."""
    async with instances(3) as (redis, stores, (a, b, c)):
        assert await admitted(a, [WINDOW], 4) == 4
        assert await admitted(b, [WINDOW], 1) == 1  # B saw 5 out
        redis.down = True
        got = [await admitted(e, [WINDOW], 4) for e in (a, b, c)]
        assert got == [0, 0, 0], got  # A holds more than its share, B its own and 1, C 2
        assert 5 + sum(got) <= WINDOW.capacity
        redis.down = False
        await until(lambda: not any(s.degraded for s in stores))


async def test_alone_an_instance_takes_what_the_account_had_left() -> None:
    async with instances(1) as (redis, (store,), (a,)):
        assert await admitted(a, [WINDOW], 2) == 2
        redis.down = True
        assert await admitted(a, [WINDOW], 6) == 4  # its view is the account's: 6 - 2
        redis.down = False
        await until(lambda: not store.degraded)


async def test_concurrency_with_others_alive_an_instance_reuses_its_own_slots() -> None:
    """Another instance's jobs run on through the outage, unseen: what the account had left
    is not handed out, however long the outage lasts; this instance reuses its own slots."""
    four = concurrency_limit("four", 4, 60.0, rank=RANK_CONCURRENCY)
    async with instances(2) as (redis, (sa, sb), (a, b)):
        mine = await a.admit([four], max_wait_s=0)
        await b.admit([four], max_wait_s=0)  # 2 of 4 run
        redis.down = True
        assert await admitted(a, [four], 3) == 0  # share 2: its job and a placeholder
        assert await admitted(b, [four], 3) == 0
        await a.release(mine)  # its job ended: its slot is its own again
        assert await admitted(a, [four], 3) == 1
        assert sa._local is not None
        held = await sa._local.usage(sa._share(four))
        assert held[0] == 2  # the new job and the placeholder, which outlives the lease TTL
        redis.down = False
        await until(lambda: not sa.degraded and not sb.degraded and a.owed_releases == 0)


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


async def test_a_grant_redis_sends_after_a_stall_takes_from_the_local_share() -> None:
    """A SIGSTOPped Redis runs what it was sent once it resumes. An acquire sent just before
    the stall, answered after this instance began admitting locally, took a token on top of
    what the local store was seeded with: it must fill a local slot too, or the late grant
    and a full local share both go upstream (the soak's rare window violation)."""
    clock = SystemClock()
    gate = asyncio.Event()

    class Stalled(Switched):
        async def acquire(self, request: AcquireRequest) -> AcquireResult:
            if request.ticket == "late":
                await gate.wait()
                return await self.inner.acquire(request)  # run by Redis after the stall
            return await super().acquire(request)

    redis = Stalled(MemoryStore(clock))
    store = FallbackStore(redis, clock)  # one instance: its share is the whole window (6)
    for n in range(2):
        assert (await store.acquire(AcquireRequest(f"before{n}", (WINDOW,)))).admitted
    late = asyncio.create_task(store.acquire(AcquireRequest("late", (WINDOW,))))
    await asyncio.sleep(0)
    redis.down = True
    assert (await store.acquire(AcquireRequest("first-local", (WINDOW,)))).admitted  # 2 out: 4 left
    assert store.degraded
    gate.set()
    assert (await late).admitted  # Redis granted it: a third token out there
    got = [(await store.acquire(AcquireRequest(f"local{n}", (WINDOW,)))).admitted for n in range(4)]
    assert got == [True, True, False, False]  # 2 + late + 3 local = 6, the window
    await store.close()
