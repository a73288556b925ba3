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

With Redis and ``redis.on_outage: fail_open``, ``OutageLedger`` wraps the Redis one: usage
that cannot reach Redis waits in a local file (``usage-pending.db``) and is added once it
answers, each entry exactly once (a marker set in the same script as the increments).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .admission.keys import Keys
from .errors import StoreUnavailable
from .localdb import open_db

log = logging.getLogger(__name__)

RETENTION_DAYS = 400
MOVED_MARKER_S = 7 * 86400  # how long a moved pending entry is remembered (replays are sooner)

# One pending entry, exactly once: its marker is set, or it was already (nothing added).
ADD_ONCE_LUA = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


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

    async def add_once(
        self, marker: str, day: str, owner: str, product: str, amounts: Mapping[str, float]
    ) -> bool:
        """Add ``amounts`` to ``day``'s totals unless an add with ``marker`` already did."""
        _check(owner, product, amounts)
        args: list[str | float] = [MOVED_MARKER_S, RETENTION_DAYS * 86400]
        for metric, value in amounts.items():
            args += [f"{owner}|{product}|{metric}", float(value)]
        keys = [self._k.usage(day), self._k.usage_moved(marker)]
        try:
            return bool(await self._r.eval(ADD_ONCE_LUA, 2, *keys, *args))
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


class OutageLedger:
    """The Redis ledger, and a local file for what cannot reach it while Redis is away.

    ``add`` never fails because Redis did: the entry waits in ``usage-pending.db`` (with the
    day it was for) and ``flush`` (called every half second by the app) adds it to Redis once
    it answers, exactly once: each entry carries a marker (this file's random id and the
    entry's number) that the same script sets, so a flush replayed after a crash between the
    script and the entry's deletion adds nothing twice. ``day`` counts what still waits.
    """

    kind = "redis"

    def __init__(
        self, shared: RedisLedger, path: str | Path, *, wall: Callable[[], float] = time.time
    ) -> None:
        self._shared = shared
        self._wall = wall
        self._db = open_db(path)
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (n INTEGER PRIMARY KEY AUTOINCREMENT, day TEXT NOT NULL, "
            "owner TEXT NOT NULL, product TEXT NOT NULL, amounts TEXT NOT NULL)"
        )
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (secrets.token_hex(8),))
        self._id = str(self._db.execute("SELECT value FROM meta WHERE name = 'id'").fetchone()[0])
        self._lock = asyncio.Lock()

    async def add(self, owner: str, product: str, amounts: Mapping[str, float]) -> None:
        try:
            await self._shared.add(owner, product, amounts)
        except StoreUnavailable as exc:
            _check(owner, product, amounts)
            self._db.execute(
                "INSERT INTO pending (day, owner, product, amounts) VALUES (?, ?, ?, ?)",
                (utc_day(self._wall()), owner, product, json.dumps(dict(amounts))),
            )
            log.warning("usage: Redis unavailable (%s); kept locally until it answers", exc.detail)

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    async def flush(self) -> int:
        """Add what waits to Redis, oldest first; stop at the first failure. How many moved."""
        moved = 0
        async with self._lock:  # one flush at a time: an entry is never sent by two
            rows = self._db.execute(
                "SELECT n, day, owner, product, amounts FROM pending ORDER BY n LIMIT 500"
            ).fetchall()
            for n, day, owner, product, amounts in rows:
                try:
                    await self._shared.add_once(f"{self._id}:{n}", day, owner, product, json.loads(amounts))
                except StoreUnavailable:
                    break
                self._db.execute("DELETE FROM pending WHERE n = ?", (n,))
                moved += 1
        if moved:
            log.warning("usage: %d entries kept while Redis was away are recorded in it now", moved)
        return moved

    async def day(self, day: str, *, owner: str | None = None) -> list[UsageRow]:
        totals = {(r.owner, r.product, r.metric): r.value for r in await self._shared.day(day, owner=owner)}
        sql, args = "SELECT owner, product, amounts FROM pending WHERE day = ?", (day,)
        for who, product, amounts in self._db.execute(sql, args).fetchall():
            if owner is None or who == owner:
                for metric, value in json.loads(amounts).items():
                    totals[(who, product, metric)] = totals.get((who, product, metric), 0.0) + float(value)
        return sorted(UsageRow(day, *k, v) for k, v in totals.items())

    async def close(self) -> None:
        self._db.close()
