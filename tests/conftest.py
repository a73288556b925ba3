"""Shared fixtures: one store environment per backend, a real Redis that must answer.

``store_env`` runs a test against every store: the embedded store and fakeredis on a moved
clock (freezegun drives fakeredis's Lua TIME), and real Redis in short real-time runs. The
real Redis on 127.0.0.1:6379 is required: its tests FAIL when it does not answer (CI starts
one), they are never skipped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from freezegun import freeze_time

from gateway.admission.keys import Keys
from gateway.admission.limits import Limit
from gateway.admission.memory import MemoryStore
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.redis_store import RedisStore, make_client
from gateway.admission.store import AcquireRequest, AcquireResult, Store, WakeCallback
from gateway.clock import Clock, ManualClock, SystemClock, settle

REDIS_URL = os.environ.get("AAI_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class CountingStore:
    """Wraps a store and counts round trips per verb (Redis calls per admission)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.calls: dict[str, int] = {}

    def _hit(self, verb: str) -> None:
        self.calls[verb] = self.calls.get(verb, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        self._hit("acquire")
        return await self.inner.acquire(request)

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        self._hit("release")
        return await self.inner.release(ticket, limits, tombstone=tombstone)

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        self._hit("refresh")
        return await self.inner.refresh(limits, tickets, ttl_ms)

    async def subscribe(self, callback: WakeCallback) -> None:
        await self.inner.subscribe(callback)

    async def renew(self, ticket: str, limit: Limit, ttl_ms: int, *, create: bool = False) -> bool:
        self._hit("renew")
        return await self.inner.renew(ticket, limit, ttl_ms, create=create)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        return await self.inner.usage(limit)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class StoreEnv:
    """A backend under test. ``new_store()`` is another instance on the same backend."""

    kind: str
    clock: Clock
    new_store: Callable[[], Store]
    moved: bool  # True when time only moves on advance()
    stores: list[Store] = field(default_factory=list)

    def store(self) -> Store:
        s = self.new_store()
        self.stores.append(s)
        return s

    async def advance(self, seconds: float) -> None:
        if isinstance(self.clock, ManualClock):
            await self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)
            await settle()


@contextmanager
def frozen_manual_clock() -> Iterator[ManualClock]:
    """A ManualClock that also moves freezegun's time, which fakeredis's Lua TIME follows."""
    with freeze_time(dt.datetime(2026, 1, 1, tzinfo=dt.UTC), real_asyncio=True) as frozen:
        clock = ManualClock()
        last = [clock.now()]

        def follow(now: float) -> None:
            frozen.tick(dt.timedelta(seconds=now - last[0]))
            last[0] = now

        clock.listeners.append(follow)
        yield clock


async def redis_client() -> aioredis.Redis:
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception as exc:  # a real failure, never a skip
        await client.aclose()
        pytest.fail(
            f"the real Redis at {REDIS_URL} does not answer ({exc!r}); start redis-server (.ci/run does)"
        )
    return client


@pytest.fixture
def keys() -> Keys:
    return Keys(prefix="t" + uuid.uuid4().hex[:10], account="acct")


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def store_env(request: pytest.FixtureRequest, keys: Keys) -> AsyncIterator[StoreEnv]:
    kind = request.param
    if kind == "memory":
        clock = ManualClock()
        shared = MemoryStore(clock)
        env = StoreEnv(kind, clock, lambda: shared, moved=True)
        yield env
    elif kind == "fakeredis":
        with frozen_manual_clock() as clock:
            server = fakeredis.FakeServer()
            clients: list[Any] = []

            def make() -> Store:
                client = fakeredis.FakeAsyncRedis(server=server, max_connections=4096)
                clients.append(client)
                return RedisStore(client, keys, shebang=False)

            env = StoreEnv(kind, clock, make, moved=True)
            yield env
            for s in env.stores:
                await s.close()
            for c in clients:
                await c.aclose()
    else:
        clients = []

        def make_real() -> Store:
            client = make_client(REDIS_URL, timeout_ms=2000, connect_timeout_ms=2000)
            clients.append(client)
            # The production path: scripts over the pipelined connection.
            return RedisStore(client, keys, pipelined=PipelinedRedis(REDIS_URL, timeout_ms=2000))

        probe = await redis_client()
        env = StoreEnv(kind, SystemClock(), make_real, moved=False)
        yield env
        for s in env.stores:
            await s.close()
        async for key in probe.scan_iter(match=f"{keys.prefix}:*"):
            await probe.delete(key)
        await probe.aclose()
        for c in clients:
            await c.aclose()
