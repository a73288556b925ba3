"""The store contract suite on the two other topologies: a real 3-master Redis Cluster and a
primary + replica + 3 sentinels (tests/topologies.py starts them on ports of their own).

``store_env``, ``jobs`` and ``ledger`` are overridden here, so the contract suites imported
by this folder's modules (the store, the job store, the usage ledger) run once on a
RedisCluster client and once on Sentinel's primary client, both built by the production
factory (gateway/admission/topology.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import RedisStore
from gateway.admission.store import Store
from gateway.admission.topology import Connections, connect
from gateway.clock import SystemClock
from gateway.config import RedisSettings, Sentinel
from gateway.ledger import Ledger, RedisLedger
from gateway.products.transcripts.jobs import JobStore
from gateway.products.transcripts.redis_jobs import RedisJobStore
from tests.conftest import StoreEnv
from tests.contract.test_job_store import Wall as JobWall
from tests.topologies import SERVICE, Cluster, SentinelSet, cluster, sentinel_set


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    with cluster() as c:
        yield c


@pytest.fixture(scope="session")
def redis_sentinels() -> Iterator[SentinelSet]:
    with sentinel_set() as s:
        yield s


def cluster_settings(c: Cluster, **kw: Any) -> RedisSettings:
    return RedisSettings(url=c.url, cluster=True, **kw)


def sentinel_settings(s: SentinelSet, **kw: Any) -> RedisSettings:
    return RedisSettings(
        url="redis://ignored:1/0", sentinel=Sentinel(hosts=tuple(s.hosts), service_name=SERVICE), **kw
    )


def store_on(conns: Connections, keys: Keys, settings: RedisSettings) -> RedisStore:
    return RedisStore(
        conns.client,
        keys,
        sharded_pubsub=settings.sharded,
        pipelined=conns.pipelined,
        subscriber=conns.subscriber,
    )


@pytest.fixture(params=["cluster", "sentinel"])
async def store_env(request: pytest.FixtureRequest, keys: Keys) -> AsyncIterator[StoreEnv]:
    settings = topology_settings(request, timeout_ms=2000)
    made: list[Connections] = []

    def make() -> Store:
        conns = connect(settings, keys)
        made.append(conns)
        return store_on(conns, keys, settings)

    env = StoreEnv(request.param, SystemClock(), make, moved=False)
    yield env
    for s in env.stores:
        await s.close()
    if made:
        client = made[0].client
        async for key in client.scan_iter(match=f"{keys.prefix}:*"):
            await client.delete(key)
    for conns in made:
        await conns.client.aclose()


def topology_settings(request: pytest.FixtureRequest, **kw: Any) -> RedisSettings:
    if request.param == "cluster":
        return cluster_settings(request.getfixturevalue("redis_cluster"), **kw)
    return sentinel_settings(request.getfixturevalue("redis_sentinels"), **kw)


@asynccontextmanager
async def topology_client(request: pytest.FixtureRequest, keys: Keys) -> AsyncIterator[Any]:
    """The shared redis-py client of the requested topology; the keys under ``keys.prefix``
    are deleted afterwards."""
    conns = connect(topology_settings(request, timeout_ms=2000), keys)
    try:
        yield conns.client
        async for key in conns.client.scan_iter(match=f"{keys.prefix}:*"):
            await conns.client.delete(key)
    finally:
        await conns.client.aclose()


@pytest.fixture(params=["cluster", "sentinel"])
async def jobs(request: pytest.FixtureRequest) -> AsyncIterator[tuple[JobStore, Any]]:
    keys = Keys(prefix="jobs" + uuid.uuid4().hex[:8])
    async with topology_client(request, keys) as client:
        wall = JobWall()
        yield RedisJobStore(client, keys, wall=wall), wall


@pytest.fixture(params=["cluster", "sentinel"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    keys = Keys(prefix="usage" + uuid.uuid4().hex[:8])
    async with topology_client(request, keys) as client:
        yield RedisLedger(client, keys, max_customers=3)  # the contract's cap on customers
