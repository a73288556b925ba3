"""The usage ledger's store: what each owner used, per product, per UTC day.

An owner is a client key's fingerprint (vault.py: a keyed hash, never the key) and, once
projects exist, a project. Every product path adds amounts here when the work is done
(streaming: a session's seconds from its ``Termination``); the usage ledger reads it.

    add(owner, product, {"session_seconds": 12.5, "sessions": 1})

Amounts only ever add up (an increment, never a read-modify-write), so any number of
instances record into one ledger without coordinating. Two backends, one contract
(tests/contract/test_ledger.py):

- Redis, shared: one hash per account and day, ``<base>:usage:<YYYY-MM-DD>``, field
  ``owner|product|metric``; kept ``RETENTION_DAYS``.
- sqlite, embedded: a row per (day, owner, product, metric) beside the job queue's file.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .admission.keys import Keys
from .errors import StoreUnavailable
from .localdb import open_db

RETENTION_DAYS = 400


class UsageRow(NamedTuple):
    day: str
    owner: str
    product: str
    metric: str
    value: float


class Ledger(Protocol):
    kind: str

    async def add(self, owner: str, product: str, amounts: Mapping[str, float]) -> None:
        """Add ``amounts`` to today's totals for ``owner`` and ``product``."""
        ...

    async def day(self, day: str, *, owner: str | None = None) -> list[UsageRow]:
        """Every total of ``day`` (YYYY-MM-DD, UTC), or only ``owner``'s; sorted."""
        ...

    async def close(self) -> None: ...


def utc_day(wall_s: float) -> str:
    return dt.datetime.fromtimestamp(wall_s, dt.UTC).strftime("%Y-%m-%d")


def _check(owner: str, product: str, amounts: Mapping[str, float]) -> None:
    for part in (owner, product, *amounts):
        if not part or "|" in part:
            raise ValueError(f"ledger names must be non-empty and free of '|': {part!r}")


class RedisLedger:
    kind = "redis"

    def __init__(self, client: aioredis.Redis, keys: Keys, *, wall: Callable[[], float] = time.time) -> None:
        self._r = client
        self._k = keys
        self._wall = wall

    async def add(self, owner: str, product: str, amounts: Mapping[str, float]) -> None:
        _check(owner, product, amounts)
        key = self._k.usage(utc_day(self._wall()))
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                for metric, value in amounts.items():
                    pipe.hincrbyfloat(key, f"{owner}|{product}|{metric}", value)
                pipe.expire(key, RETENTION_DAYS * 86400)
                await pipe.execute()
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed recording usage: {type(exc).__name__}: {exc}") from exc

    async def day(self, day: str, *, owner: str | None = None) -> list[UsageRow]:
        try:
            raw = await self._r.hgetall(self._k.usage(day))
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed reading usage: {type(exc).__name__}: {exc}") from exc
        rows = []
        for field, value in raw.items():
            who, product, metric = (field.decode() if isinstance(field, bytes) else field).split("|")
            if owner is None or who == owner:
                rows.append(UsageRow(day, who, product, metric, float(value)))
        return sorted(rows)

    async def close(self) -> None:
        return None


class SqliteLedger:
    kind = "sqlite"

    def __init__(self, path: str | Path, *, wall: Callable[[], float] = time.time) -> None:
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS usage (day TEXT, owner TEXT, product TEXT, metric TEXT, "
            "value REAL NOT NULL, PRIMARY KEY (day, owner, product, metric))"
        )
        self._wall = wall

    async def add(self, owner: str, product: str, amounts: Mapping[str, float]) -> None:
        _check(owner, product, amounts)
        day = utc_day(self._wall())
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, owner, product, metric) "
                "DO UPDATE SET value = value + excluded.value",
                [(day, owner, product, metric, float(v)) for metric, v in amounts.items()],
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    async def day(self, day: str, *, owner: str | None = None) -> list[UsageRow]:
        sql = "SELECT day, owner, product, metric, value FROM usage WHERE day = ?"
        args: tuple[str, ...] = (day,)
        if owner is not None:
            sql, args = sql + " AND owner = ?", (day, owner)
        return sorted(UsageRow(*row) for row in self._db.execute(sql, args).fetchall())

    async def close(self) -> None:
        self._db.close()
