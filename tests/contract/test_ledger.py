"""One contract, every ledger: sqlite (embedded), fakeredis, real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import make_client
from gateway.errors import StoreUnavailable
from gateway.ledger import Ledger, OutageLedger, RedisLedger, SqliteLedger, UsageRow, utc_day
from tests.conftest import REDIS_URL, redis_client

DAY1 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


class Wall:
    def __init__(self) -> None:
        self.t = DAY1

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "fakeredis", "redis", "redis+outage"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Ledger, Wall]]:
    wall = Wall()
    if request.param == "sqlite":
        store = SqliteLedger(tmp_path / "usage.db", wall=wall)
        yield store, wall
        await store.close()
    elif request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        yield RedisLedger(client, Keys(prefix="u"), wall=wall), wall
        await client.aclose()
    else:
        await (await redis_client()).aclose()
        client = make_client(REDIS_URL, timeout_ms=2000)
        keys = Keys(prefix="usage" + uuid.uuid4().hex[:8])
        shared = RedisLedger(client, keys, wall=wall)
        if request.param == "redis":
            yield shared, wall
        else:  # fail_open's ledger, Redis up: the same contract
            outage = OutageLedger(shared, tmp_path / "pending.db", wall=wall)
            yield outage, wall
            await outage.close()
        async for key in client.scan_iter(match=f"{keys.prefix}:*"):
            await client.delete(key)
        await client.aclose()


async def test_amounts_add_up_per_owner_product_and_metric(ledger: tuple[Ledger, Wall]) -> None:
    store, _ = ledger
    await store.add("key-a", "streaming", {"session_seconds": 10.5, "sessions": 1})
    await store.add("key-a", "streaming", {"session_seconds": 2.25, "sessions": 1})
    await store.add("key-b", "streaming", {"sessions": 1})
    day = utc_day(DAY1)
    assert await store.day(day) == [
        UsageRow(day, "key-a", "streaming", "session_seconds", 12.75),
        UsageRow(day, "key-a", "streaming", "sessions", 2.0),
        UsageRow(day, "key-b", "streaming", "sessions", 1.0),
    ]
    assert [r.owner for r in await store.day(day, owner="key-b")] == ["key-b"]


async def test_each_utc_day_is_its_own_total(ledger: tuple[Ledger, Wall]) -> None:
    store, wall = ledger
    await store.add("k", "streaming", {"sessions": 1})
    wall.t += 86400
    await store.add("k", "streaming", {"sessions": 3})
    assert [r.value for r in await store.day(utc_day(DAY1))] == [1.0]
    assert [r.value for r in await store.day(utc_day(DAY1 + 86400))] == [3.0]
    assert await store.day("1999-01-01") == []


async def test_concurrent_adds_lose_nothing(ledger: tuple[Ledger, Wall]) -> None:
    store, _ = ledger
    await asyncio.gather(*(store.add("k", "streaming", {"sessions": 1}) for _ in range(50)))
    assert [r.value for r in await store.day(utc_day(DAY1))] == [50.0]


@pytest.mark.parametrize("bad", ["", "a|b"])
async def test_names_that_would_break_a_field_are_refused(ledger: tuple[Ledger, Wall], bad: str) -> None:
    store, _ = ledger
    with pytest.raises(ValueError):
        await store.add(bad, "streaming", {"sessions": 1})
    with pytest.raises(ValueError):
        await store.add("k", "streaming", {bad: 1})


class FlakyLedger(RedisLedger):
    """A Redis ledger that fails while ``down``."""

    down = False

    async def add(self, *args: Any, **kwargs: Any) -> None:
        if self.down:
            raise StoreUnavailable("down")
        await super().add(*args, **kwargs)

    async def add_once(self, *args: Any, **kwargs: Any) -> bool:
        if self.down:
            raise StoreUnavailable("down")
        return await super().add_once(*args, **kwargs)


@pytest.fixture(params=["fakeredis", "redis"])
async def flaky(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[FlakyLedger, Wall, Path]]:
    wall = Wall()
    if request.param == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        keys = Keys(prefix="u")
    else:
        client = make_client(REDIS_URL, timeout_ms=2000)
        keys = Keys(prefix="usage" + uuid.uuid4().hex[:8])
    yield FlakyLedger(client, keys, wall=wall), wall, tmp_path / "pending.db"
    async for key in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(key)
    await client.aclose()


async def test_usage_while_redis_is_away_waits_and_is_added_once(
    flaky: tuple[FlakyLedger, Wall, Path],
) -> None:
    shared, wall, path = flaky
    ledger = OutageLedger(shared, path, wall=wall)
    shared.down = True
    await ledger.add("o", "streaming", {"sessions": 1, "session_seconds": 2.5})
    wall.t += 86400  # the next day: the entry stays on the day it was for
    await ledger.add("o", "streaming", {"sessions": 1})
    assert len(ledger) == 2
    assert await ledger.flush() == 0  # still down: nothing moved, nothing lost
    shared.down = False
    # Read before the flush: what waits is counted.
    assert await ledger.day(utc_day(DAY1)) == [
        UsageRow(utc_day(DAY1), "o", "streaming", "session_seconds", 2.5),
        UsageRow(utc_day(DAY1), "o", "streaming", "sessions", 1.0),
    ]
    assert await ledger.flush() == 2 and len(ledger) == 0
    assert await shared.day(utc_day(DAY1)) == [
        UsageRow(utc_day(DAY1), "o", "streaming", "session_seconds", 2.5),
        UsageRow(utc_day(DAY1), "o", "streaming", "sessions", 1.0),
    ]
    assert await shared.day(utc_day(DAY1 + 86400)) == [
        UsageRow(utc_day(DAY1 + 86400), "o", "streaming", "sessions", 1.0)
    ]
    await ledger.close()


async def test_a_flush_replayed_after_a_crash_adds_nothing_twice(
    flaky: tuple[FlakyLedger, Wall, Path],
) -> None:
    shared, wall, path = flaky
    ledger = OutageLedger(shared, path, wall=wall)
    shared.down = True
    await ledger.add("o", "llm", {"requests": 1})
    shared.down = False
    await ledger.flush()
    await ledger.close()
    # The crash: the entry was added to Redis but its deletion here was lost.
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("INSERT INTO pending (n, day, owner, product, amounts) VALUES (1, ?, 'o', 'llm', ?)",
               (utc_day(DAY1), '{"requests": 1}'))  # fmt: skip
    db.close()
    again = OutageLedger(shared, path, wall=wall)  # the same file: the same markers
    assert len(again) == 1
    assert await again.flush() == 1 and len(again) == 0
    assert await shared.day(utc_day(DAY1)) == [UsageRow(utc_day(DAY1), "o", "llm", "requests", 1.0)]
    await again.close()
