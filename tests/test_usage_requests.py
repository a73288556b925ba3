"""Request counts in the ledger (issue 12): every product request by project, key and route
group's product, with how many waited for admission and how many the gateway refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.app import LEDGER
from gateway.errors import StoreUnavailable
from gateway.identity import Identity, key_digest, new_key
from gateway.ledger import Event, SqliteLedger, utc_day
from gateway.sim.app import SimConfig
from gateway.usage import Tally
from tests.helpers import stack

A = new_key()


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", "sk-account-key-requests-0000")
    yield


async def test_requests_that_waited_and_were_refused_are_counted_per_project() -> None:
    limits = {"requests": {"limit": 2, "window_s": 1.0}}
    projects = [{"name": "alpha", "keys": [{"name": "a", "sha256": key_digest(A)}]}]
    async with (
        stack(SimConfig(), projects=projects, limits=limits, queue={"max_wait_s": 0.6}) as s,
        aiohttp.ClientSession() as http,
    ):

        async def models() -> int:
            async with http.get(s.url + "/v1/models", headers={"Authorization": A}) as r:
                return r.status

        statuses = await asyncio.gather(*(models() for _ in range(5)))
        admitted, refused = statuses.count(200), statuses.count(429)
        assert admitted + refused == 5 and refused >= 1 and admitted >= 2, statuses
        today = utc_day(time.time())
        deadline = time.monotonic() + 5
        while True:
            rows = {r.metric: r.value for r in await s.app[LEDGER].rows(today, today) if r.product == "llm"}
            if rows.get("requests") == 5:
                break
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.1)
        assert rows["refused"] == refused
        assert rows["waited"] >= admitted - 2  # beyond the first two, each waited for the window
        assert rows["wait_seconds"] > 0


async def test_counts_kept_when_the_store_fails_are_recorded_next_time(tmp_path: Path) -> None:
    class Failing(SqliteLedger):
        fail = True

        async def record(self, event: Event) -> int:
            if self.fail:
                raise StoreUnavailable("down")
            return await super().record(event)

    ledger = Failing(tmp_path / "l.db")
    tally = Tally(ledger, "i1", wall=lambda: 1_800_000_000.0)
    who = Identity("project:alpha", "alpha/a", "alpha")
    tally.note(who, "rest", "ok", 0.0)
    tally.note(who, "rest", "queue_full", None)
    tally.note(None, "rest", "ok", None)  # no caller: not a project's
    tally.note(who, "other", "ok", None)  # not a product route
    await tally.flush()
    ledger.fail = False
    tally.note(who, "rest", "ok", 120.0)
    await tally.flush()
    day = utc_day(1_800_000_000.0)
    rows = {r.metric: r.value for r in await ledger.rows(day, day)}
    assert rows == {"requests": 3.0, "refused": 1.0, "waited": 1.0, "wait_seconds": 0.12}
    assert {(r.project, r.key, r.product) for r in await ledger.rows(day, day)} == {
        ("alpha", "alpha/a", "transcription")
    }
    await ledger.close()
