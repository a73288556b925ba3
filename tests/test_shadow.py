"""Shadow mode (issue 10): limits in shadow are decided and recorded but never hold a request
back. The store still counts what was forwarded (upstream will), so the decisions recorded are
those the gateway would have made enforcing the same traffic."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence

import aiohttp
import pytest

from gateway.admission.engine import FORCED, AdmissionEngine
from gateway.admission.limits import RANK_MODEL, RANK_WINDOW, Limit, window_limit
from gateway.admission.memory import MemoryStore
from gateway.admission.store import AcquireRequest, LimitState
from gateway.admission.waking import NullObserver
from gateway.clock import SystemClock
from gateway.config import load_config
from gateway.errors import WaitTimeout
from gateway.products.catalog import Catalog
from gateway.sim.app import SimConfig
from tests.conftest import StoreEnv
from tests.helpers import metric, stack

SHADOW = dataclasses.replace(window_limit("requests", 2, 10.0, 0, rank=RANK_WINDOW), shadow=True)
MODEL = window_limit("llm:m", 1, 10.0, 0, rank=RANK_MODEL)


class Decisions(NullObserver):
    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def shadow(self, limit: Limit, decision: str, group: str) -> None:
        self.seen[(limit.name, decision)] += 1

    def admitted(
        self, limits: Sequence[Limit], states: Sequence[LimitState], waited_s: float, group: str
    ) -> None:
        pass


async def test_a_limit_in_shadow_records_what_would_wait_and_forwards_at_once() -> None:
    clock = SystemClock()
    store = MemoryStore(clock)
    seen = Decisions()
    engine = AdmissionEngine(store, clock, observer=seen)
    grants = [await engine.admit([SHADOW], max_wait_s=0) for _ in range(5)]  # none waits, none refused
    assert all(g.limits == (SHADOW,) for g in grants)
    assert seen.seen == {("requests", "admitted"): 2, ("requests", "would_wait"): 3}
    assert (await store.usage(SHADOW)) == (5, 0)  # every one counted, as upstream counts them
    assert [g.states[0].remaining for g in grants] == [1, 0, 0, 0, 0]


async def test_enforced_limits_still_hold_beside_a_shadow_one() -> None:
    clock = SystemClock()
    store = MemoryStore(clock)
    engine = AdmissionEngine(store, clock, observer=Decisions())
    first = await engine.admit([MODEL, SHADOW], max_wait_s=0)
    assert {limit.name for limit in first.limits} == {"llm:m", "requests"}
    with pytest.raises(WaitTimeout):  # the model limit (1) is enforced
        await engine.admit([MODEL, SHADOW], max_wait_s=0)
    await engine.release(first)
    assert (await store.usage(MODEL))[0] == 0 and (await store.usage(SHADOW))[0] == 0


def test_the_config_puts_limits_in_shadow_all_or_one_by_one() -> None:
    every = Catalog(load_config(environ={}).limits.model_copy(update={"shadow": True}))
    assert all(limit.shadow for limit in (every.requests, every.async_jobs, every.streaming_sessions))
    assert every.model("gpt-5").shadow
    cfg = load_config(environ={})
    one = Catalog(
        cfg.limits.model_copy(update={"requests": cfg.limits.requests.model_copy(update={"shadow": True})})
    )
    assert one.requests.shadow and not one.streaming_sessions.shadow and not one.model("gpt-5").shadow


async def test_through_the_gateway_every_request_is_forwarded_and_the_decisions_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = {"shadow": True, "requests": {"limit": 2, "window_s": 30}}
    caplog.set_level(logging.INFO, logger="gateway")
    async with stack(SimConfig(requests_limit=100), limits=limits) as s, aiohttp.ClientSession() as http:

        async def get(i: int) -> int:
            async with http.get(f"{s.url}/v2/transcript/t{i}", headers={"Authorization": "k"}) as r:
                return r.status

        statuses = await asyncio.gather(*(get(i) for i in range(6)))
        would_wait = metric(
            s.registry, "aai_gateway_shadow_decisions_total", limit="requests", decision="would_wait"
        )
        admitted = metric(
            s.registry, "aai_gateway_shadow_decisions_total", limit="requests", decision="admitted"
        )
    assert statuses == [404] * 6  # every one reached upstream at once
    assert len(s.sim.seen) == 6
    assert (admitted, would_wait) == (2, 4)
    assert sum("shadow: would wait on the 'requests' limit" in r.getMessage() for r in caplog.records) == 4


async def test_every_store_takes_a_decided_shadow_request_whatever_the_capacity(store_env: StoreEnv) -> None:
    """The engine takes a shadow limit with a capacity nothing reaches (FORCED): the Lua and
    the embedded store both admit it under the limit's own keys, ahead of nobody's turn."""
    store = store_env.store()
    limit = window_limit("requests", 1, 10.0, 0, rank=RANK_WINDOW)
    assert (await store.acquire(AcquireRequest("a", (limit,)))).admitted
    blocked = await store.acquire(AcquireRequest("b", (limit,)))
    assert not blocked.admitted
    forced = dataclasses.replace(limit, capacity=FORCED)
    taken = await store.acquire(AcquireRequest("b", (forced,), seq=blocked.seq))
    assert taken.admitted
    assert await store.usage(limit) == (2, 0)  # both counted, nobody left waiting
