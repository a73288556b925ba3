"""One contract, every ledger: sqlite (embedded), fakeredis, real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import make_client
from gateway.ledger import Ledger, RedisLedger, SqliteLedger, UsageRow, utc_day
from tests.conftest import REDIS_URL, redis_client

DAY1 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


class Wall:
    def __init__(self) -> None:
        self.t = DAY1

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "fakeredis", "redis"])
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
        yield RedisLedger(client, keys, wall=wall), wall
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
