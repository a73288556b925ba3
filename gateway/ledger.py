"""The usage ledger's store: what was used, per UTC day, project, key, product, model and
customer, each event counted exactly once.

Every product path records an ``Event`` when upstream has said what the work used (a
transcript's ``completed`` document, a session's ``Termination``, an LLM answer's ``usage``):

    record(Event("transcript:<job id>", at, Line(project, key, "transcription", model, customer),
                 {"audio_seconds": 312.0, "transcripts": 1}))

Exactness, with any number of instances:

- amounts only ever add up (increments, never a read-modify-write);
- an event is counted once: its id is claimed *in the same atomic write* as its increments
  (a Lua script on Redis, a transaction on SQLite), never before, so a webhook and a poll
  that both see a transcript end, a retried Termination, or a crash between recording and
  acknowledging, add nothing twice. The claim is kept ``Event.dedupe_s`` (longer than any
  way the event could be seen again);
- customers are bounded: at most ``max_customers`` distinct per project (or key) and day;
  beyond them the line's customer is ``other`` (``record`` says so).

Two backends, one contract (tests/contract/test_ledger.py):

- Redis, shared: one hash per account and day, ``<base>:ledger:<YYYY-MM-DD>``, field
  ``project|key|product|model|customer|metric``; kept ``RETENTION_DAYS``.
- SQLite, embedded: a row per line and metric beside the job queue's file.

With Redis and ``redis.on_outage: fail_open``, ``OutageLedger`` wraps the Redis one: an
event that cannot reach Redis waits in a local file (``usage-pending.db``) and is recorded
once it answers, exactly once (by its id, like any other).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .admission.keys import Keys
from .errors import StoreUnavailable
from .localdb import open_db

log = logging.getLogger(__name__)

RETENTION_DAYS = 400
DEDUPE_S = 8 * 86400  # how long an event's id is remembered, unless the event says otherwise
MAX_CUSTOMERS = 1000  # distinct customers per project (or key) and day; beyond: "other"
OTHER = "other"

# Outcomes of ``record``.
DUPLICATE, RECORDED, FOLDED = 0, 1, 2  # FOLDED: recorded, its customer counted as "other"


class Line(NamedTuple):
    """The dimensions of one ledger line (the UTC day comes from the event's time)."""

    project: str  # the project's name; "" in pass-through mode
    key: str  # "<project>/<key name>", or a client key's fingerprint (pass-through)
    product: str  # transcription | streaming | llm
    model: str = ""
    customer: str = ""


class Event(NamedTuple):
    id: str  # what the event is ("transcript:<job id>", "session:<id>"): counted once
    at: float  # Unix time: its UTC day
    line: Line
    amounts: Mapping[str, float]
    dedupe_s: int = DEDUPE_S
    spend: float = 0.0  # USD it adds to its month's spend (the line's project, or key, and "*")
    hold: float = 0.0  # USD it holds for work admitted and not billed yet (negative: releases)
    releases: str = ""  # a negative hold applies only if this event (the hold) was counted


ACCOUNT = "*"  # the spend and holds of the whole account


class Row(NamedTuple):
    day: str
    project: str
    key: str
    product: str
    model: str
    customer: str
    metric: str
    value: float


class Ledger(Protocol):
    kind: str

    async def record(self, event: Event) -> int:
        """DUPLICATE (already counted: nothing added), RECORDED, or FOLDED."""
        ...

    async def rows(self, first: str, last: str) -> list[Row]:
        """Every total from day ``first`` to ``last`` (YYYY-MM-DD, UTC, both included); sorted."""
        ...

    async def spend(self, month: str) -> tuple[dict[str, float], dict[str, float]]:
        """(spend in ``month`` (YYYY-MM), holds now), each by project or key, and ``ACCOUNT``."""
        ...

    async def close(self) -> None: ...


def utc_day(wall_s: float) -> str:
    return dt.datetime.fromtimestamp(wall_s, dt.UTC).strftime("%Y-%m-%d")


def utc_month(wall_s: float) -> str:
    return utc_day(wall_s)[:7]


def days(first: str, last: str) -> list[str]:
    """Each day from ``first`` to ``last``, both included (at most RETENTION_DAYS)."""
    start, end = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    count = min((end - start).days + 1, RETENTION_DAYS + 1)
    return [(start + dt.timedelta(days=n)).isoformat() for n in range(max(0, count))]


def clean(part: str, limit: int = 100) -> str:
    """A dimension's value as the ledger keeps it: printable, no '|', at most ``limit``."""
    text = "".join(c if c.isprintable() and c != "|" else "_" for c in str(part))
    return text[:limit]


def _checked(event: Event) -> Event:
    line = Line(*(clean(p) for p in event.line))
    if not line.product or not line.key:
        raise ValueError(f"a ledger line needs a product and a key: {event.line}")
    for metric, value in event.amounts.items():
        if not metric or "|" in metric or not isinstance(value, int | float):
            raise ValueError(f"bad ledger amount: {metric!r}={value!r}")
    return event._replace(line=line)


def _row(parts: tuple[str, ...], value: float) -> Row:
    day, project, key, product, model, customer, metric = parts
    return Row(day, project, key, product, model, customer, metric, value)


def _who(line: Line) -> str:
    return line.project or line.key  # whose customers are counted


def _digest(event_id: str) -> str:
    return hashlib.sha256(event_id.encode("utf-8", "surrogateescape")).hexdigest()[:32]


# KEYS: the day's hash, the event's claim, the (day, who) customer set, the month's spend,
# the holds, the claim of the hold a negative hold releases.
# ARGV: dedupe_s, retention_s, max customers, customer, field prefix, spend, hold, who,
# whether the release needs its hold (1/0), then metric, value, ...
RECORD_LUA = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
local spend, hold, who = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
if hold < 0 and ARGV[9] == '1' and redis.call('EXISTS', KEYS[6]) == 0 then hold = 0 end
if spend ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[4], who, spend)
  redis.call('HINCRBYFLOAT', KEYS[4], '*', spend)
  redis.call('EXPIRE', KEYS[4], 3456000)
end
if hold ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[5], who, hold)
  redis.call('HINCRBYFLOAT', KEYS[5], '*', hold)
end
local customer, outcome = ARGV[4], 1
if customer ~= '' and redis.call('SISMEMBER', KEYS[3], customer) == 0 then
  if redis.call('SCARD', KEYS[3]) >= tonumber(ARGV[3]) then
    customer, outcome = 'other', 2
  else
    redis.call('SADD', KEYS[3], customer)
    redis.call('EXPIRE', KEYS[3], 172800)
  end
end
for i = 10, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[5] .. customer .. '|' .. ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return outcome
"""


class RedisLedger:
    kind = "redis"

    def __init__(self, client: aioredis.Redis, keys: Keys, *, max_customers: int = MAX_CUSTOMERS) -> None:
        self._r = client
        self._k = keys
        self._max_customers = max_customers
        self._record = client.register_script(RECORD_LUA)
        self._loaded = False
        self._loading = asyncio.Lock()

    async def _load(self) -> None:
        """The script loaded once before the first records: many of them at once each
        answered NOSCRIPT and each loaded it, and redis-py's Cluster client then lost
        connections under that herd (``'NoneType' object has no attribute 'writelines'``)."""
        async with self._loading:
            if not self._loaded:
                await self._r.script_load(RECORD_LUA)
                self._loaded = True

    async def record(self, event: Event) -> int:
        event = _checked(event)
        line, day = event.line, utc_day(event.at)
        prefix = f"{line.project}|{line.key}|{line.product}|{line.model}|"
        args: list[str | float] = [max(1, event.dedupe_s), RETENTION_DAYS * 86400, self._max_customers,
                                   line.customer, prefix, float(event.spend), float(event.hold), _who(line),
                                   "1" if event.releases else "0"]  # fmt: skip
        for metric, value in event.amounts.items():
            args += [metric, float(value)]
        claim = self._k.ledger_seen(_digest(event.id))
        held = self._k.ledger_seen(_digest(event.releases)) if event.releases else claim
        keys = [self._k.ledger(day), claim, self._k.ledger_customers(day, _who(line)),
                self._k.spend(utc_month(event.at)), self._k.holds, held]  # fmt: skip
        try:
            if not self._loaded:
                await self._load()
            return int(await self._record(keys=keys, args=args))
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed recording usage: {type(exc).__name__}: {exc}") from exc

    async def rows(self, first: str, last: str) -> list[Row]:
        out = []
        for day in days(first, last):
            try:
                raw = await self._r.hgetall(self._k.ledger(day))
            except (TimeoutError, OSError, redis_errors.RedisError) as exc:
                raise StoreUnavailable(f"redis failed reading usage: {type(exc).__name__}: {exc}") from exc
            for field, value in raw.items():
                parts = (field.decode() if isinstance(field, bytes) else field).split("|")
                if len(parts) == 6:
                    out.append(_row((day, *parts), float(value)))
        return sorted(out)

    async def spend(self, month: str) -> tuple[dict[str, float], dict[str, float]]:
        try:
            spent, held = await self._r.hgetall(self._k.spend(month)), await self._r.hgetall(self._k.holds)
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed reading spend: {type(exc).__name__}: {exc}") from exc
        return _floats(spent), _floats(held)

    async def close(self) -> None:
        return None


def _floats(raw: Mapping[bytes | str, bytes | str]) -> dict[str, float]:
    return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}


class SqliteLedger:
    kind = "sqlite"

    def __init__(self, path: str | Path, *, max_customers: int = MAX_CUSTOMERS) -> None:
        self._db = open_db(path)
        self._max_customers = max_customers
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS ledger (day TEXT, project TEXT, key TEXT, product TEXT,
                model TEXT, customer TEXT, metric TEXT, value REAL NOT NULL,
                PRIMARY KEY (day, project, key, product, model, customer, metric));
            CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, until REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS customers (day TEXT, who TEXT, customer TEXT,
                PRIMARY KEY (day, who, customer));
            CREATE TABLE IF NOT EXISTS spend (month TEXT, who TEXT, usd REAL NOT NULL,
                PRIMARY KEY (month, who));
            CREATE TABLE IF NOT EXISTS holds (who TEXT PRIMARY KEY, usd REAL NOT NULL);
            """
        )
        self._purge()

    def _purge(self) -> None:
        oldest = utc_day(time.time() - RETENTION_DAYS * 86400)
        self._db.execute("DELETE FROM ledger WHERE day < ?", (oldest,))
        self._db.execute("DELETE FROM customers WHERE day < ?", (utc_day(time.time() - 2 * 86400),))
        self._db.execute("DELETE FROM seen WHERE until < ?", (time.time(),))

    async def record(self, event: Event) -> int:
        event = _checked(event)
        line, day = event.line, utc_day(event.at)
        with self._db:  # the claim, the customer and the increments: one transaction
            self._db.execute("BEGIN IMMEDIATE")
            claimed = self._db.execute(
                "INSERT INTO seen VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                (_digest(event.id), time.time() + max(1, event.dedupe_s)),
            ).rowcount
            if not claimed:
                return DUPLICATE
            self._spend_and_hold(event)
            customer, outcome = line.customer, RECORDED
            if (
                customer
                and not self._db.execute(
                    "SELECT 1 FROM customers WHERE day = ? AND who = ? AND customer = ?",
                    (day, _who(line), customer),
                ).fetchone()
            ):
                counted = self._db.execute(
                    "SELECT COUNT(*) FROM customers WHERE day = ? AND who = ?", (day, _who(line))
                ).fetchone()[0]
                if counted >= self._max_customers:
                    customer, outcome = OTHER, FOLDED
                else:
                    self._db.execute("INSERT INTO customers VALUES (?, ?, ?)", (day, _who(line), customer))
            self._db.executemany(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, project, key, "
                "product, model, customer, metric) DO UPDATE SET value = value + excluded.value",
                [
                    (day, line.project, line.key, line.product, line.model, customer, metric, float(value))
                    for metric, value in event.amounts.items()
                ],  # fmt: skip
            )
        return outcome

    def _spend_and_hold(self, event: Event) -> None:
        hold = event.hold
        released = "SELECT 1 FROM seen WHERE id = ?"
        if (
            hold < 0
            and event.releases
            and not self._db.execute(released, (_digest(event.releases),)).fetchone()
        ):
            hold = 0.0  # its hold was never counted: nothing to release
        for who in (_who(event.line), ACCOUNT):
            if event.spend:
                self._db.execute(
                    "INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT (month, who) "
                    "DO UPDATE SET usd = usd + excluded.usd",
                    (utc_month(event.at), who, float(event.spend)),
                )  # fmt: skip
            if hold:
                self._db.execute(
                    "INSERT INTO holds VALUES (?, ?) ON CONFLICT (who) "
                    "DO UPDATE SET usd = usd + excluded.usd",
                    (who, float(hold)),
                )

    async def rows(self, first: str, last: str) -> list[Row]:
        found = self._db.execute("SELECT * FROM ledger WHERE day >= ? AND day <= ?", (first, last)).fetchall()
        return sorted(Row(*row) for row in found)

    async def spend(self, month: str) -> tuple[dict[str, float], dict[str, float]]:
        spent = self._db.execute("SELECT who, usd FROM spend WHERE month = ?", (month,)).fetchall()
        held = self._db.execute("SELECT who, usd FROM holds").fetchall()
        return dict(spent), dict(held)

    async def close(self) -> None:
        self._db.close()


class OutageLedger:
    """The Redis ledger, and a local file for what cannot reach it while Redis is away.

    ``record`` never fails because Redis did: the event waits in ``usage-pending.db`` and
    ``flush`` (called every half second by the app) records it in Redis once it answers,
    exactly once: by the event's id, so a flush replayed after a crash between the script
    and the entry's deletion adds nothing twice. ``rows`` counts what still waits.
    """

    kind = "redis"

    def __init__(self, shared: RedisLedger, path: str | Path) -> None:
        self._shared = shared
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS pending (n INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL)"
        )
        self._lock = asyncio.Lock()

    async def record(self, event: Event) -> int:
        try:
            return await self._shared.record(event)
        except StoreUnavailable as exc:
            event = _checked(event)
            doc = {"id": event.id, "at": event.at, "line": list(event.line), "amounts": dict(event.amounts),
                   "dedupe_s": event.dedupe_s, "spend": event.spend, "hold": event.hold,
                   "releases": event.releases}  # fmt: skip
            self._db.execute("INSERT INTO pending (event) VALUES (?)", (json.dumps(doc),))
            log.warning("usage: Redis unavailable (%s); kept locally until it answers", exc.detail)
            return RECORDED

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    def _pending(self, limit: int = 500) -> list[tuple[int, Event]]:
        out = []
        for n, raw in self._db.execute(
            "SELECT n, event FROM pending ORDER BY n LIMIT ?", (limit,)
        ).fetchall():
            doc = json.loads(raw)
            line, amounts = Line(*doc["line"]), doc["amounts"]
            out.append((n, Event(doc["id"], doc["at"], line, amounts, doc["dedupe_s"], doc.get("spend", 0.0),
                                 doc.get("hold", 0.0), doc.get("releases", ""))))  # fmt: skip
        return out

    async def flush(self) -> int:
        """Record what waits in Redis, oldest first; stop at the first failure. How many moved."""
        moved = 0
        async with self._lock:  # one flush at a time: an entry is never sent by two
            for n, event in self._pending():
                try:
                    await self._shared.record(event)
                except StoreUnavailable:
                    break
                self._db.execute("DELETE FROM pending WHERE n = ?", (n,))
                moved += 1
        if moved:
            log.warning("usage: %d events kept while Redis was away are recorded in it now", moved)
        return moved

    async def rows(self, first: str, last: str) -> list[Row]:
        totals: dict[tuple[str, ...], float] = {}
        for row in await self._shared.rows(first, last):
            totals[row[:-1]] = row.value
        for _, event in self._pending(limit=1_000_000):
            day = utc_day(event.at)
            if first <= day <= last:
                for metric, value in event.amounts.items():
                    k = (day, *event.line, metric)
                    totals[k] = totals.get(k, 0.0) + float(value)
        return sorted(_row(k, v) for k, v in totals.items())

    async def spend(self, month: str) -> tuple[dict[str, float], dict[str, float]]:
        spent, held = await self._shared.spend(month)
        for _, event in self._pending(limit=1_000_000):  # what waits counts as spent already
            if utc_month(event.at) == month:
                for who in (_who(event.line), ACCOUNT):
                    spent[who] = spent.get(who, 0.0) + event.spend
        return spent, held

    async def close(self) -> None:
        self._db.close()
