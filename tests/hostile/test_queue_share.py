"""One key floods the queue; every other key still queues (issue 8, queue.max_depth_per_key).

Two gateway instances (two admission engines, each with its own Redis connections, as the
gateway runs them) share one real Redis. Before the per-key share, a key that filled
``queue.max_depth`` turned every other key away with 429 queue_full at once. Now the flooding
key is refused at its share, account-wide, keeping nothing and charging nothing, and the
others queue behind its admitted share and are served in arrival order. A dead instance's
waiters stop counting against their key's share when their tickets lapse.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.admission.engine import AdmissionEngine
from gateway.admission.keys import Keys
from gateway.admission.limits import RANK_WINDOW, window_limit
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.redis_store import RedisStore, make_client
from gateway.admission.store import AcquireRequest, Status
from gateway.clock import SystemClock
from gateway.errors import QueueFull
from tests.conftest import REDIS_URL, redis_client

# One token per window, so every admission has its own turn and their order is definite.
WINDOW = window_limit("requests", 1, 0.2, 0, rank=RANK_WINDOW)
MAX_DEPTH = 8
SHARE = 5
ATTACKER = "a" * 64  # key fingerprints, as the proxy passes them
VICTIM = "b" * 64


@pytest.fixture
async def instances() -> AsyncIterator[tuple[list[AdmissionEngine], Keys]]:
    keys = Keys(prefix="share" + uuid.uuid4().hex[:8], account="acct")
    made: list[AdmissionEngine] = []
    clients = []
    for _ in range(2):
        client = make_client(REDIS_URL, timeout_ms=2000, connect_timeout_ms=2000)
        clients.append(client)
        store = RedisStore(client, keys, pipelined=PipelinedRedis(REDIS_URL, timeout_ms=2000))
        engine = AdmissionEngine(store, SystemClock())
        await engine.start()
        made.append(engine)
    try:
        yield made, keys
    finally:
        for engine in made:
            await engine.close()
            await engine.store.close()
        probe = await redis_client()
        async for key in probe.scan_iter(match=f"{keys.prefix}:*"):
            await probe.delete(key)
        await probe.aclose()
        for client in clients:
            await client.aclose()


async def test_a_flooding_key_is_held_to_its_share_and_another_key_still_queues(
    instances: tuple[list[AdmissionEngine], Keys],
) -> None:
    engines, _ = instances
    order: list[str] = []

    async def ask(i: int, who: str, fp: str) -> str:
        try:
            await engines[i % 2].admit(
                [WINDOW], max_wait_s=10, max_depth=MAX_DEPTH, owner=fp, max_owner_depth=SHARE
            )
        except QueueFull as exc:
            assert "your share of the gateway's queue" in exc.message
            return "refused"
        order.append(f"{who}{i}")
        return "admitted"

    # The attacker's flood, from both instances at once: one admitted, SHARE queued, the
    # rest refused at once (not after a wait: well inside one window).
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    flood = [asyncio.ensure_future(ask(i, "a", ATTACKER)) for i in range(20)]
    for _ in range(200):
        if sum(t.done() for t in flood) >= 20 - SHARE:
            break
        await asyncio.sleep(0.005)
    assert loop.time() - t0 < WINDOW.lease_ms / 1000
    refused = [t.result() for t in flood if t.done()].count("refused")
    assert refused == 20 - 1 - SHARE
    assert await engines[0].store.usage(WINDOW) == (1, SHARE)

    # The victim's requests still queue (before the share: 429 queue_full at once), behind
    # the attacker's share, and are admitted in their arrival order.
    victim = []
    for i in range(3):
        victim.append(asyncio.ensure_future(ask(i, "b", VICTIM)))
        await asyncio.sleep(0.02)  # a definite arrival order
    results = await asyncio.gather(*flood, *victim)
    assert results.count("refused") == 20 - 1 - SHARE
    assert [o[0] for o in order] == ["a"] * (1 + SHARE) + ["b"] * 3
    assert order[-3:] == ["b0", "b1", "b2"]
    assert await engines[0].store.usage(WINDOW) == (1, 0)


async def test_a_dead_instances_waiters_stop_counting_against_their_key(
    instances: tuple[list[AdmissionEngine], Keys],
) -> None:
    engines, keys = instances
    long = window_limit("requests", 1, 10.0, 0, rank=RANK_WINDOW)
    client = make_client(REDIS_URL, timeout_ms=2000)
    dying = RedisStore(client, keys)
    try:
        assert (await dying.acquire(AcquireRequest("fill", (long,)))).admitted
        for i in range(SHARE):  # queued by an instance that then dies: no refresh, no abort
            r = await dying.acquire(
                AcquireRequest(f"dead{i}", (long,), ttl_ms=400, owner=ATTACKER, owner_depth=SHARE)
            )
            assert r.status is Status.BLOCKED
    finally:
        await dying.close()
        await client.aclose()
    with pytest.raises(QueueFull):
        await engines[0].admit([long], max_wait_s=5, owner=ATTACKER, max_owner_depth=SHARE)
    await asyncio.sleep(0.45)  # their deadlines lapse in Redis time
    waiting = asyncio.ensure_future(
        engines[1].admit([long], max_wait_s=5, owner=ATTACKER, max_owner_depth=SHARE)
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()  # queued, not refused
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
