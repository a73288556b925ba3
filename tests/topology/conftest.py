"""The store contract suite on the two other topologies: a real 3-master Redis Cluster and a
primary + replica + 3 sentinels (tests/topologies.py starts them on ports of their own).

``store_env`` is overridden here, so test_store_contract.py in this folder (the contract
suite, imported) runs once on a RedisCluster-backed and once on a Sentinel-backed
RedisStore, both built by the production factory (gateway/admission/topology.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import RedisStore
from gateway.admission.store import Store
from gateway.admission.topology import Connections, connect
from gateway.clock import SystemClock
from gateway.config import RedisSettings, Sentinel
from tests.conftest import StoreEnv
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
    if request.param == "cluster":
        settings = cluster_settings(request.getfixturevalue("redis_cluster"), timeout_ms=2000)
    else:
        settings = sentinel_settings(request.getfixturevalue("redis_sentinels"), timeout_ms=2000)
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
