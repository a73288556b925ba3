"""Limits are proven, not hoped: several gateway processes on one real Redis, five times the
limit offered, and the simulator (a process of its own) as the judge.

Asserts zero violations and no waste: the busiest rolling window of each limit used at
least 95% of its capacity (the guard costs guard / W of it).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable

import aiohttp
import pytest

from tests.conftest import REDIS_URL, redis_client
from tests.helpers import (
    Limits,
    Process,
    assert_exact,
    at_rate,
    delete_prefix,
    sim_report,
    start_gateways,
    start_sim_process,
)

pytestmark = pytest.mark.slow

WINDOW_S = 4.0
REQUESTS = 60  # per window, the whole account
MODEL = 12  # per window, per model
MODELS = ("gpt-5", "claude-sonnet-4-6")
LIMITS = Limits(REQUESTS, MODEL, WINDOW_S, MODELS)
RUN_S = 10.0
OVERLOAD = 5


async def test_five_times_overload_on_two_instances_holds_every_limit_exactly() -> None:
    probe = await redis_client()  # fails (never skips) without the real Redis
    await probe.aclose()
    sim = start_sim_process(LIMITS.sim_config())
    prefix = "exact" + uuid.uuid4().hex[:8]
    raw = LIMITS.gateway_config(sim.url, {"url": REDIS_URL, "key_prefix": prefix})
    gateways: list[Process] = []
    try:
        await sim.ready("/_sim/report")
        gateways = await start_gateways(raw, 2)
        statuses = await offer_load(gateways)
        report = await sim_report(sim)
    finally:
        for p in [*gateways, sim]:
            p.kill()
        await delete_prefix(prefix)

    assert_exact(report, statuses, LIMITS)


async def offer_load(gateways: list[Process]) -> list[int]:
    """OVERLOAD x every limit, spread evenly over the gateways, for RUN_S seconds."""
    per_s_total = OVERLOAD * REQUESTS / WINDOW_S
    per_s_model = OVERLOAD * MODEL / WINDOW_S
    per_s_get = max(0.0, per_s_total - per_s_model * len(MODELS))
    targets = itertools.cycle(gateways)
    statuses: list[int] = []
    headers = {"Authorization": "load-key"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def one(kind: str) -> None:
            base = next(targets).url
            if kind == "get":
                ctx = http.get(base + "/v2/transcript/some-id", headers=headers)
            else:
                ctx = http.post(
                    base + "/v1/chat/completions", json={"model": kind, "messages": []}, headers=headers
                )
            async with ctx as resp:
                await resp.read()
                statuses.append(resp.status)

        def stream(kind: str, rate: float) -> Awaitable[None]:
            return at_rate(rate, RUN_S, lambda _: one(kind))

        await asyncio.gather(stream("get", per_s_get), *(stream(m, per_s_model) for m in MODELS))
    return statuses
