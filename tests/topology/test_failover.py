"""The store follows a topology change by itself: the hot path's socket locates the account's
server again after MOVED/READONLY or a failover, and the wake-up subscription is remade on
the new master (a RESYNC, then wake-ups flow again)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from redis import exceptions as redis_errors

from gateway.admission.keys import Keys
from gateway.admission.limits import RANK_WINDOW, window_limit
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.store import RESYNC, AcquireRequest
from gateway.admission.topology import connect
from gateway.errors import StoreUnavailable
from tests.topologies import Cluster, SentinelSet, cluster, sentinel_set
from tests.topology.conftest import cluster_settings, sentinel_settings, store_on

LIMIT = window_limit("requests", 1000, 1.0, 50, rank=RANK_WINDOW)
RECOVERY_BOUND_S = 5.0  # from the promotion to the first admission (measured: see the notes)


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def located(*places: tuple[str, int]) -> tuple[Callable[[], Any], list[int]]:
    """A locate naming ``places`` in turn (the last one from then on), counting its calls."""
    calls: list[int] = []

    async def locate() -> tuple[str, int]:
        calls.append(1)
        return places[min(len(calls), len(places)) - 1]

    return locate, calls


async def test_a_moved_reply_drops_the_socket_and_the_next_call_locates_the_slot_again(
    redis_cluster: Cluster,
) -> None:
    key = Keys("mv" + uuid.uuid4().hex[:6], "acct").seq
    owner = redis_cluster.master_of(key)
    other = next(p for p in redis_cluster.masters if p != owner)
    locate, calls = located(("127.0.0.1", other), ("127.0.0.1", owner))
    conn = PipelinedRedis(redis_cluster.url, timeout_ms=2000, locate=locate)
    try:
        with pytest.raises(redis_errors.ConnectionError, match="MOVED"):
            await conn.call("INCR", key)
        assert await conn.call("INCR", key) == 1
        assert await conn.call("INCR", key) == 2 and len(calls) == 2  # one locate per connect
        await conn.call("DEL", key)
    finally:
        await conn.close()


async def test_a_demoted_primary_readonly_reply_makes_the_next_call_find_the_primary(
    redis_sentinels: SentinelSet,
) -> None:
    primary = redis_sentinels.current_primary()
    replica = redis_sentinels.replica if primary == redis_sentinels.primary else redis_sentinels.primary
    locate, calls = located(("127.0.0.1", replica), ("127.0.0.1", primary))
    conn = PipelinedRedis("redis://ignored:1/0", timeout_ms=2000, locate=locate)
    key = "ro" + uuid.uuid4().hex[:6]
    try:
        with pytest.raises(redis_errors.ConnectionError, match="READONLY"):
            await conn.call("SET", key, "1")
        assert await conn.call("SET", key, "1") == b"OK" and len(calls) == 2
        await conn.call("DEL", key)
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
async def test_the_store_follows_a_failover_without_a_restart(kind: str) -> None:
    """Its own servers: the failover kills one."""
    with cluster() if kind == "cluster" else sentinel_set() as topology:
        if isinstance(topology, Cluster):
            settings = cluster_settings(topology, timeout_ms=500)
        else:
            settings = sentinel_settings(topology, timeout_ms=500)
        keys = Keys("fo" + uuid.uuid4().hex[:6], "acct")
        conns = connect(settings, keys)
        store = store_on(conns, keys, settings)
        heard: list[str] = []

        async def publish(message: str) -> None:
            for _ in range(50):  # the publisher's own client may meet the failover first
                try:
                    if settings.sharded:
                        await conns.client.spublish(keys.channel, message)
                    else:
                        await conns.client.publish(keys.channel, message)
                    return
                except redis_errors.RedisError:
                    await asyncio.sleep(0.1)

        try:
            await store.subscribe(heard.append)
            assert heard == [RESYNC]
            assert (await store.acquire(AcquireRequest("a", (LIMIT,)))).admitted
            await store.ping()
            await publish("before")
            await until(lambda: "before" in heard)
            await asyncio.sleep(1.6)  # three heartbeats: the PINGs on the subscription are answered
            assert heard == [RESYNC, "before"] and store.heartbeat_failures == 0, heard
            heard.clear()

            if isinstance(topology, Cluster):
                await asyncio.to_thread(topology.fail_over, topology.master_of(keys.base))
            else:
                await asyncio.to_thread(topology.fail_over)
            promoted = time.monotonic()
            for n in range(1000):
                try:
                    result = await store.acquire(AcquireRequest(f"b{n}", (LIMIT,)))
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.05)
            recovered = time.monotonic() - promoted
            print(f"{kind}: first admission {recovered:.2f}s after the promotion")
            assert result.admitted and recovered < RECOVERY_BOUND_S
            await store.ping()
            await until(lambda: RESYNC in heard)  # resubscribed on the new master
            await publish("after")
            await until(lambda: "after" in heard)
        finally:
            await store.close()
            await conns.client.aclose()
