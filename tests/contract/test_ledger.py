"""One contract, every ledger: SQLite (embedded), fakeredis, real Redis, and the outage
ledger in front of Redis. Events add up per line; each is counted once, whoever records it
twice; customers are bounded; days are kept apart."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import make_client
from gateway.errors import StoreUnavailable
from gateway.ledger import (
    DUPLICATE,
    FOLDED,
    RECORDED,
    Event,
    Ledger,
    Line,
    OutageLedger,
    RedisLedger,
    Row,
    SqliteLedger,
    days,
    utc_day,
)
from tests.conftest import REDIS_URL

DAY1 = 1_800_000_000.0  # 2027-01-15 08:00 UTC
D1, D2 = utc_day(DAY1), utc_day(DAY1 + 86400)
ALPHA = Line("alpha", "alpha/ci", "transcription", "universal-3-pro", "c-1")


def event(n: int | str, amounts: dict[str, float], line: Line = ALPHA, at: float = DAY1) -> Event:
    return Event(f"e{n}", at, line, amounts)


def row(metric: str, value: float, line: Line = ALPHA, day: str = D1) -> Row:
    return Row(day, *line, metric, value)


async def _redis(prefix: str) -> AsyncIterator[tuple[object, Keys]]:
    client = make_client(REDIS_URL, timeout_ms=2000)
    keys = Keys(prefix=prefix + uuid.uuid4().hex[:8])
    yield client, keys
    async for key in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture(params=["sqlite", "fakeredis", "redis", "redis+outage"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        store = SqliteLedger(tmp_path / "ledger.db", max_customers=3)
        yield store
        await store.close()
    elif request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        yield RedisLedger(client, Keys(prefix="u"), max_customers=3)
        await client.aclose()
    else:
        async for client, keys in _redis("ledger"):
            shared = RedisLedger(client, keys, max_customers=3)  # type: ignore[arg-type]
            if request.param == "redis":
                yield shared
            else:  # fail_open's ledger, Redis up: the same contract
                outage = OutageLedger(shared, tmp_path / "pending.db")
                yield outage
                await outage.close()


async def test_amounts_add_up_per_line_and_metric(ledger: Ledger) -> None:
    other = ALPHA._replace(key="alpha/web", customer="")
    assert await ledger.record(event(1, {"audio_seconds": 10.5, "transcripts": 1})) == RECORDED
    assert await ledger.record(event(2, {"audio_seconds": 2.25, "transcripts": 1})) == RECORDED
    assert await ledger.record(event(3, {"transcripts": 1}, other)) == RECORDED
    assert await ledger.rows(D1, D1) == sorted(
        [row("audio_seconds", 12.75), row("transcripts", 2.0), row("transcripts", 1.0, other)]
    )


async def test_an_event_counts_once_however_often_it_is_recorded(ledger: Ledger) -> None:
    first = event("job-1", {"audio_seconds": 60.0})
    assert await ledger.record(first) == RECORDED
    assert await ledger.record(first) == DUPLICATE
    assert await ledger.record(first._replace(amounts={"audio_seconds": 999.0})) == DUPLICATE
    outcomes = await asyncio.gather(
        *(ledger.record(event("job-2", {"audio_seconds": 1.0})) for _ in range(20))
    )
    assert outcomes.count(RECORDED) == 1 and outcomes.count(DUPLICATE) == 19
    assert await ledger.rows(D1, D1) == [row("audio_seconds", 61.0)]


async def test_concurrent_events_lose_nothing(ledger: Ledger) -> None:
    await asyncio.gather(*(ledger.record(event(n, {"sessions": 1})) for n in range(50)))
    assert await ledger.rows(D1, D1) == [row("sessions", 50.0)]


async def test_each_utc_day_is_its_own_total_and_ranges_read_them_all(ledger: Ledger) -> None:
    await ledger.record(event(1, {"sessions": 1}))
    await ledger.record(event(2, {"sessions": 3}, at=DAY1 + 86400))
    assert await ledger.rows(D1, D1) == [row("sessions", 1.0)]
    assert await ledger.rows(D2, D2) == [row("sessions", 3.0, day=D2)]
    assert await ledger.rows(D1, D2) == [row("sessions", 1.0), row("sessions", 3.0, day=D2)]
    assert await ledger.rows("1999-01-01", "1999-01-31") == []


async def test_customers_beyond_the_cap_are_other(ledger: Ledger) -> None:
    outcomes = []
    for n in range(5):
        line = ALPHA._replace(customer=f"c-{n}")
        outcomes.append(await ledger.record(event(n, {"transcripts": 1}, line)))
    outcomes.append(await ledger.record(event("again", {"transcripts": 1}, ALPHA._replace(customer="c-0"))))
    assert outcomes == [RECORDED, RECORDED, RECORDED, FOLDED, FOLDED, RECORDED]  # 3 a day, then "other"
    rows = await ledger.rows(D1, D1)
    assert {r.customer: r.value for r in rows} == {"c-0": 2.0, "c-1": 1.0, "c-2": 1.0, "other": 2.0}
    beta = Line("beta", "beta/k", "llm", "gpt-5", "c-9")  # another project: its own cap
    assert await ledger.record(event("b", {"requests": 1}, beta)) == RECORDED


async def test_names_are_kept_printable_and_whole(ledger: Ledger) -> None:
    odd = Line("alpha", "alpha/ci", "llm", "a|b\nc", "x" * 500)
    await ledger.record(event(1, {"requests": 1}, odd))
    (got,) = await ledger.rows(D1, D1)
    assert got.model == "a_b_c" and len(got.customer) == 100
    with pytest.raises(ValueError):
        await ledger.record(event(2, {"a|b": 1}))
    with pytest.raises(ValueError):
        await ledger.record(event(3, {"requests": 1}, Line("", "", "")))


def test_days_between_two_dates() -> None:
    assert days("2026-02-27", "2026-03-02") == ["2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02"]
    assert days("2026-03-02", "2026-03-01") == []
    assert len(days("2020-01-01", "2030-01-01")) == 401  # never more than the ledger keeps


class FlakyLedger(RedisLedger):
    """A Redis ledger that fails while ``down``."""

    down = False

    async def record(self, event: Event) -> int:
        if self.down:
            raise StoreUnavailable("down")
        return await super().record(event)


@pytest.fixture(params=["fakeredis", "redis"])
async def flaky(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[FlakyLedger, OutageLedger]]:
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        shared = FlakyLedger(client, Keys(prefix="u"))
        ledger = OutageLedger(shared, tmp_path / "pending.db")
        yield shared, ledger
        await ledger.close()
        await client.aclose()
        return
    async for client, keys in _redis("usage"):
        shared = FlakyLedger(client, keys)  # type: ignore[arg-type]
        ledger = OutageLedger(shared, tmp_path / "pending.db")
        yield shared, ledger
        await ledger.close()


async def test_usage_while_redis_is_away_waits_and_is_recorded_once(
    flaky: tuple[FlakyLedger, OutageLedger],
) -> None:
    shared, ledger = flaky
    shared.down = True
    await ledger.record(event(1, {"session_seconds": 2.5, "sessions": 1}))
    await ledger.record(event(2, {"sessions": 1}, at=DAY1 + 86400))  # the next day: kept on its day
    assert len(ledger) == 2
    assert await ledger.flush() == 0  # still down: nothing moved, nothing lost
    shared.down = False
    want = [row("session_seconds", 2.5), row("sessions", 1.0), row("sessions", 1.0, day=D2)]
    assert await ledger.rows(D1, D2) == want  # read before the flush: what waits is counted
    assert await ledger.flush() == 2 and len(ledger) == 0
    assert await shared.rows(D1, D2) == want


async def test_a_flush_replayed_after_a_crash_adds_nothing_twice(
    flaky: tuple[FlakyLedger, OutageLedger], tmp_path: Path
) -> None:
    shared, ledger = flaky
    shared.down = True
    await ledger.record(event("llm-1", {"requests": 1}, ALPHA._replace(product="llm")))
    shared.down = False
    await ledger.flush()
    # The crash: the event was recorded in Redis but its deletion here was lost.
    db = sqlite3.connect(tmp_path / "pending.db", isolation_level=None)
    doc = {"id": "ellm-1", "at": DAY1, "line": list(ALPHA._replace(product="llm")),
           "amounts": {"requests": 1}, "dedupe_s": 691200}  # fmt: skip
    db.execute("INSERT INTO pending (event) VALUES (?)", (json.dumps(doc),))
    db.close()
    assert len(ledger) == 1
    assert await ledger.flush() == 1 and len(ledger) == 0
    assert await shared.rows(D1, D1) == [row("requests", 1.0, ALPHA._replace(product="llm"))]


async def test_spend_adds_up_per_month_and_holds_are_placed_and_released_once(ledger: Ledger) -> None:
    beta = Line("beta", "beta/k", "llm", "gpt-5")
    await ledger.record(Event("t1", DAY1, ALPHA, {"audio_seconds": 60}, spend=0.25))
    await ledger.record(Event("t1", DAY1, ALPHA, {"audio_seconds": 60}, spend=0.25))  # counted once
    await ledger.record(Event("l1", DAY1, beta, {"input_tokens": 10}, spend=0.5))
    await ledger.record(Event("next-month", DAY1 + 40 * 86400, beta, {"input_tokens": 1}, spend=9.0))
    await ledger.record(Event("hold:j1", DAY1, ALPHA, {}, hold=2.0))
    spent, held = await ledger.spend("2027-01")
    assert spent == pytest.approx({"alpha": 0.25, "beta": 0.5, "*": 0.75})
    assert held == pytest.approx({"alpha": 2.0, "*": 2.0})
    # The job ends: its usage and the release of its hold, in one event, once.
    done = Event("transcript:j1", DAY1, ALPHA, {"audio_seconds": 30}, spend=0.1, hold=-2, releases="hold:j1")
    assert await ledger.record(done) == RECORDED
    assert await ledger.record(done) == DUPLICATE
    # A release whose hold was never counted (a crash before it) releases nothing.
    await ledger.record(Event("transcript:j2", DAY1, ALPHA, {}, hold=-5.0, releases="hold:j2"))
    spent, held = await ledger.spend("2027-01")
    assert spent["alpha"] == pytest.approx(0.35) and spent["*"] == pytest.approx(0.85)
    assert held.get("alpha", 0.0) == pytest.approx(0.0) and held.get("*", 0.0) == pytest.approx(0.0)
    assert (await ledger.spend("2027-02"))[0] == pytest.approx({"beta": 9.0, "*": 9.0})
