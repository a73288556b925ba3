"""Limits are proven, not hoped: several gateway processes on one real Redis, five times the
limit offered, and the simulator (a process of its own) as the judge.

Asserts zero violations and no waste: the busiest rolling window of each limit used at
least 95% of its capacity (the guard costs guard / W of it).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import aiohttp
import pytest

from gateway.sim.app import SimConfig
from tests.conftest import REDIS_URL, redis_client
from tests.helpers import start_gateway_process, start_sim_process

pytestmark = pytest.mark.slow

WINDOW_S = 4.0
REQUESTS = 60  # per window, the whole account
MODEL = 12  # per window, per model
MODELS = ("gpt-5", "claude-sonnet-4-6")
RUN_S = 10.0
OVERLOAD = 5


async def test_five_times_overload_on_two_instances_holds_every_limit_exactly() -> None:
    probe = await redis_client()  # fails (never skips) without the real Redis
    await probe.aclose()
    sim = start_sim_process(
        SimConfig(
            requests_limit=REQUESTS,
            requests_window_s=WINDOW_S,
            llm_limit=MODEL,
            llm_window_s=WINDOW_S,
        )
    )
    prefix = "exact" + uuid.uuid4().hex[:8]
    raw = {
        "upstream": {"api_url": sim.url, "llm_url": sim.url, "streaming_url": "ws" + sim.url[4:]},
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
        "limits": {
            "guard_ms": 100,
            "requests": {"limit": REQUESTS, "window_s": WINDOW_S},
            "llm_requests": {"limit": MODEL, "window_s": WINDOW_S},
        },
        "queue": {"max_wait_s": 3, "llm_max_wait_s": 3},
        "log": {"level": "warning", "access_log": False},
    }
    gateways = [start_gateway_process(raw) for _ in range(2)]
    try:
        await sim.ready("/_sim/report")
        for g in gateways:
            await g.ready("/readyz")
        statuses = await offer_load(gateways)
        async with aiohttp.ClientSession() as http, http.get(sim.url + "/_sim/report") as r:
            report = await r.json()
    finally:
        for p in [*gateways, sim]:
            p.kill()
        client = await redis_client()
        async for key in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(key)
        await client.aclose()

    assert report["violations"] == [], report["violations"][:5]
    assert report["requests"]["busiest"] >= 0.95 * REQUESTS, report["requests"]
    for model in MODELS:
        assert report["llm"][model]["busiest"] >= 0.95 * MODEL, report["llm"]
    # Refused work was refused by the gateway (429 after its max wait), never by upstream.
    assert set(statuses) <= {200, 404, 429}, statuses
    assert statuses.count(200) + statuses.count(404) == report["requests"]["arrivals"]


async def offer_load(gateways: list) -> list[int]:  # type: ignore[type-arg]
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

        async def stream(kind: str, rate: float) -> None:
            tasks = []
            loop = asyncio.get_running_loop()
            start = loop.time()
            i = 0
            while loop.time() - start < RUN_S:
                tasks.append(asyncio.ensure_future(one(kind)))
                i += 1
                await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            await asyncio.gather(*tasks)

        await asyncio.gather(stream("get", per_s_get), *(stream(m, per_s_model) for m in MODELS))
    return statuses
