"""Which Redis the gateway talks to: one server, a Redis Cluster, or the primary Sentinel names.

``connect(settings, keys)`` builds, for the configured topology, the three things the store
needs (``Connections``):

- ``client``: the redis-py client every other user shares (jobs, ledger, tokens, readiness,
  the non-hot scripts): ``Redis`` on one server, ``RedisCluster`` (``url`` is any node; the
  client discovers the rest and follows MOVED/ASK), or Sentinel's ``master_for`` client (the
  primary is rediscovered whenever a connection fails or meets a demoted, READONLY server).
- ``pipelined``: the hot path's single socket, pointed at the server that holds the account:
  the master owning the slot of its hash tag (asked of the cluster on each connect), or the
  primary the sentinels name now. A MOVED/ASK/READONLY reply or a lost connection drops the
  socket and the next call locates the server again (pipelined.py's failure model).
- ``subscriber``: with Cluster, a plain client to the slot owner for the wake-up
  subscription (sharded pub/sub lives on the shard that owns the channel's slot), made anew
  at each resubscription so a failover of that shard is followed. None: use ``client``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ClusterDownError

from ..config import RedisSettings
from .keys import Keys
from .pipelined import Locate, PipelinedRedis
from .redis_store import make_client


@dataclass
class Connections:
    client: Any  # aioredis.Redis, or a RedisCluster (the same commands, routed by key)
    pipelined: PipelinedRedis
    subscriber: Callable[[], Awaitable[aioredis.Redis]] | None = None


def connect(settings: RedisSettings, keys: Keys) -> Connections:
    """Nothing is connected yet: every connection opens on first use (or ``subscribe``)."""
    url = settings.url
    if url is None:
        raise ValueError("redis.url is not set")
    timeouts: dict[str, Any] = {
        "socket_timeout": settings.timeout_ms / 1000,
        "socket_connect_timeout": settings.connect_timeout_ms / 1000,
    }
    if settings.cluster:
        cluster = RedisCluster.from_url(url, max_connections=settings.pool_size, **timeouts)
        locate = _slot_owner(cluster, keys)
        return Connections(cluster, _pipelined(settings, url, locate), _node_client(url, locate, timeouts))
    if settings.sentinel is not None:
        opts = parse_url(url)  # type: ignore[no-untyped-call]
        hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in settings.sentinel.hosts]
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts, sentinel_kwargs={"password": settings.sentinel.password, **timeouts}, **timeouts
        )
        name = settings.sentinel.service_name
        client = sentinel.master_for(
            name,
            redis_class=_PrimaryClient,
            db=opts.get("db", 0),
            username=opts.get("username"),
            password=opts.get("password"),
            ssl=url.startswith("rediss://"),  # TLS to the primary too, with the url's ssl_* options
            **{k: v for k, v in opts.items() if k.startswith("ssl_")},
            max_connections=settings.pool_size,
            retry=Retry(NoBackoff(), 1),
            **timeouts,
        )
        client.watched_by = sentinel

        async def primary() -> tuple[str, int]:
            host, port = await sentinel.discover_master(name)
            return str(host), int(port)

        return Connections(client, _pipelined(settings, url, primary))
    client = make_client(
        url,
        timeout_ms=settings.timeout_ms,
        connect_timeout_ms=settings.connect_timeout_ms,
        pool_size=settings.pool_size,
    )
    return Connections(client, _pipelined(settings, url, None))


class _PrimaryClient(aioredis.Redis):
    """Sentinel's primary client; closing it closes the connections to the sentinels too."""

    watched_by: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.watched_by is not None:
            for each in self.watched_by.sentinels:
                await each.aclose()


def _pipelined(settings: RedisSettings, url: str, locate: Locate | None) -> PipelinedRedis:
    return PipelinedRedis(
        url, timeout_ms=settings.timeout_ms, connect_timeout_ms=settings.connect_timeout_ms, locate=locate
    )


def _slot_owner(cluster: RedisCluster, keys: Keys) -> Locate:
    """The master serving the account's slot, read from the cluster itself on every call
    (called on connect only: after a failover or a resharding the map is reread)."""
    fresh = [True]

    async def locate() -> tuple[str, int]:
        if fresh[0]:
            await cluster.initialize()
            fresh[0] = False
        else:
            await cluster.nodes_manager.initialize()
        node = cluster.get_node_from_key(keys.base)
        if node is None:
            raise ClusterDownError(f"no node serves the slot of {keys.base}")
        return node.host, int(node.port)

    return locate


def _node_client(
    url: str, locate: Locate, timeouts: dict[str, Any]
) -> Callable[[], Awaitable[aioredis.Redis]]:
    opts = parse_url(url)  # type: ignore[no-untyped-call]

    async def subscriber() -> aioredis.Redis:
        host, port = await locate()
        return aioredis.Redis(
            host=host, port=port, username=opts.get("username"), password=opts.get("password"),
            ssl=url.startswith("rediss://"), **timeouts,
        )  # fmt: skip

    return subscriber
