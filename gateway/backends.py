"""Where the gateway keeps its state, chosen from the config: the limits' store, and beside it
the jobs, the ledger and streaming tokens, runtime projects and keys, uploads' owners — in
Redis when it is shared (``redis.url``), else in memory or a local sqlite file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .admission.fallback import FallbackStore
from .admission.fence import FENCE_MS, gap_ms, heartbeat
from .admission.keys import Keys
from .admission.memory import MemoryStore
from .admission.redis_store import RedisStore
from .admission.store import Store
from .admission.topology import connect
from .clock import Clock
from .config import Config
from .directory import Directory, RedisDirectory, SqliteDirectory
from .ledger import Ledger, OutageLedger, RedisLedger, SqliteLedger
from .products.streaming_tokens import MemoryTokenBook, OutageTokenBook, RedisTokenBook, TokenBook
from .products.transcripts.jobs import JobStore
from .products.transcripts.redis_jobs import RedisJobStore
from .products.transcripts.sqlite_jobs import SqliteJobStore
from .products.uploads import MemoryUploadBook, RedisUploadBook, UploadBook


def make_store(config: Config, clock: Clock, on_call: Callable[[str], None] | None = None) -> Store:
    if config.redis.url is None:
        return MemoryStore(clock)
    keys = Keys(prefix=config.redis.key_prefix, account=config.account)
    conns = connect(config.redis, keys)  # one server, a Cluster or Sentinel's primary
    client = conns.client
    # fail_open: the outage fence (fallback.py) keeps an instance from admitting from Redis
    # while another admits locally; fail_closed admits nowhere else, so it needs none.
    fence_ms = 0 if config.redis.on_outage == "fail_closed" else FENCE_MS
    gap = gap_ms(config.redis.timeout_ms)
    shared = RedisStore(
        client, keys, sharded_pubsub=config.redis.sharded, pipelined=conns.pipelined, on_call=on_call,
        subscriber=conns.subscriber, fence_ms=fence_ms, gap_ms=gap,
    )  # fmt: skip
    if config.redis.on_outage == "fail_closed":
        return shared
    return FallbackStore(shared, clock, beat=heartbeat(client, keys, gap_ms=gap), fence_ms=fence_ms)


def redis_client(store: Store) -> Any:
    """The shared store's redis-py client (jobs, usage, tokens live beside the limits), or
    None for the embedded store. Through a FallbackStore: its primary's."""
    inner = store.primary if isinstance(store, FallbackStore) else store
    return getattr(inner, "_client", None)


def make_job_store(config: Config, store: Store, on_call: Callable[[str], None] | None = None) -> JobStore:
    """Jobs live beside the limits: in Redis when it is shared, else in a local sqlite file."""
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        keys = Keys(prefix=config.redis.key_prefix, account=config.account)
        return RedisJobStore(client, keys, on_call=on_call)
    return SqliteJobStore(Path(config.transcripts.data_dir) / "jobs.db")


def make_ledger(config: Config, store: Store) -> tuple[Ledger, TokenBook]:
    """Usage and streaming tokens live beside the jobs: Redis when shared, else local.
    With ``on_outage: fail_open``, what cannot reach Redis waits here until it answers."""
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        keys = Keys(prefix=config.redis.key_prefix, account=config.account)
        ledger, tokens = RedisLedger(client, keys), RedisTokenBook(client, keys)
        if isinstance(store, FallbackStore):
            pending = Path(config.transcripts.data_dir) / "usage-pending.db"
            return OutageLedger(ledger, pending), OutageTokenBook(tokens)
        return ledger, tokens
    return SqliteLedger(Path(config.transcripts.data_dir) / "ledger.db"), MemoryTokenBook()


def make_directory(config: Config, store: Store) -> Directory:
    """Projects and keys made at runtime: beside the jobs, Redis when shared, else here."""
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        return RedisDirectory(client, Keys(prefix=config.redis.key_prefix, account=config.account))
    return SqliteDirectory(Path(config.transcripts.data_dir) / "directory.db")


def make_upload_book(config: Config, store: Store) -> UploadBook:
    """Who made each upload (managed mode): beside the jobs, Redis when shared, else here."""
    retention_s = config.transcripts.retention_days * 86400
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        return RedisUploadBook(
            client, Keys(prefix=config.redis.key_prefix, account=config.account), retention_s
        )
    return MemoryUploadBook(retention_s)
