"""Projects and gateway keys made at runtime (the admin API), kept in the store.

Managed mode has two sources of projects and keys: the config file (always there, changed by
editing the file) and this directory (``POST /admin/v1/projects``, ``.../keys``), which lives
beside the jobs: in Redis when the gateway shares one, else in a local SQLite file. Both
survive restarts. A key is kept as the SHA-256 of its bytes only; the key itself is shown
once, when it is made, and never stored.

Every write bumps a version number. Each instance reads the version every
``REFRESH_EVERY_S`` and the whole directory when it changed (identity.KeyRing), so a key
revoked on one instance is refused by all of them within a second.

Writes are atomic and checked in the store, not in the instance: two admins creating the
last project the cap allows on two instances get one 201 and one 403. A deleted project's
name is never given again: its transcripts and uploads keep their owner
(``project:<name>``), and a new project of that name must not inherit them.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .admission.keys import Keys
from .errors import StoreUnavailable
from .localdb import open_db

REFRESH_EVERY_S = 0.25  # how stale an instance's view of the directory may be (revocation)
TOUCH_EVERY_S = 5.0  # how often each instance writes its keys' "last used" times


class ProjectRecord(NamedTuple):
    name: str
    created: float  # Unix time
    spend_cap: float | None = None  # its monthly spend cap in USD (spend.py), None: none


class KeyRecord(NamedTuple):
    id: str
    project: str
    name: str
    sha256: str
    created: float


class Snapshot(NamedTuple):
    version: int
    projects: tuple[ProjectRecord, ...]
    keys: tuple[KeyRecord, ...]


class Refused(Exception):
    """A write the directory refused; ``reason`` is one of the class constants."""

    EXISTS = "exists"  # the project, or a key of that name in the project, exists
    REUSED = "reused"  # the project's name belonged to a deleted project
    NO_PROJECT = "no_project"
    CAP = "cap"  # projects_limit / keys_limit reached

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


class Directory(Protocol):
    kind: str

    async def version(self) -> int: ...

    async def snapshot(self) -> Snapshot: ...

    async def add_project(
        self, name: str, *, cap: int | None, spend_cap: float | None = None
    ) -> ProjectRecord:
        """``cap``: how many runtime projects may exist (None: no cap). Refused: EXISTS, REUSED, CAP."""
        ...

    async def set_spend_cap(self, name: str, spend_cap: float | None) -> bool:
        """Change a runtime project's monthly spend cap. False: no such project."""
        ...

    async def delete_project(self, name: str) -> list[KeyRecord] | None:
        """The project's keys go with it (revoked); its name is never given again.
        None: no such runtime project."""
        ...

    async def add_key(
        self, project: str, name: str, sha256: str, *, cap: int | None, known: bool
    ) -> KeyRecord:
        """``known``: the project is the config file's (else it must be in the directory).
        ``cap``: how many runtime keys may exist. Refused: NO_PROJECT, EXISTS, CAP."""
        ...

    async def delete_key(self, key_id: str) -> KeyRecord | None: ...

    async def touch(self, used: Mapping[str, float]) -> None:
        """Record when keys were last used (id -> Unix time; later times win)."""
        ...

    async def last_used(self, ids: Iterable[str]) -> dict[str, float]: ...

    async def close(self) -> None: ...


def _unavailable(what: str, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis failed {what}: {type(exc).__name__}: {exc}")


_REDIS_ERRORS = (TimeoutError, OSError, redis_errors.RedisError)

# KEYS: projects, gone, keys, version. ARGV: name, created json, cap (-1: none).
_ADD_PROJECT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'exists' end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'reused' end
local cap = tonumber(ARGV[3])
if cap >= 0 and redis.call('HLEN', KEYS[1]) >= cap then return 'cap' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[4])
return 'ok'
"""

# One consistent read. KEYS: version, projects, keys.
_SNAPSHOT = """
return {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3])}
"""

# KEYS: projects, gone, keys, version, used. ARGV: name. Returns the deleted keys (id, record, ...).
_DELETE_PROJECT = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('SADD', KEYS[2], ARGV[1])
local gone = {}
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  if cjson.decode(all[i + 1]).project == ARGV[1] then
    redis.call('HDEL', KEYS[3], all[i])
    redis.call('HDEL', KEYS[5], all[i])
    table.insert(gone, all[i])
    table.insert(gone, all[i + 1])
  end
end
redis.call('INCR', KEYS[4])
return gone
"""

# KEYS: projects, keys, version. ARGV: id, record json, project, name, cap, known (1/0).
_ADD_KEY = """
if ARGV[6] ~= '1' and redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 then return 'no_project' end
local all = redis.call('HVALS', KEYS[2])
local cap = tonumber(ARGV[5])
if cap >= 0 and #all >= cap then return 'cap' end
for _, raw in ipairs(all) do
  local rec = cjson.decode(raw)
  if rec.project == ARGV[3] and rec.name == ARGV[4] then return 'exists' end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[3])
return 'ok'
"""

# KEYS: projects, version. ARGV: name, the record's new JSON.
_SET_PROJECT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
"""

# KEYS: keys, version, used. ARGV: id.
_DELETE_KEY = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[2])
return raw
"""

# KEYS: used. ARGV: id, time, id, time...  (a later time wins)
_TOUCH = """
for i = 1, #ARGV, 2 do
  local was = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > was then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""


def _project_json(rec: ProjectRecord) -> str:
    return json.dumps({"created": rec.created, "spend_cap": rec.spend_cap})


def _project_from(name: str, raw: str | bytes) -> ProjectRecord:
    doc = json.loads(raw)
    cap = doc.get("spend_cap")
    return ProjectRecord(name, float(doc["created"]), None if cap is None else float(cap))


def _key_json(rec: KeyRecord) -> str:
    return json.dumps(
        {"project": rec.project, "name": rec.name, "sha256": rec.sha256, "created": rec.created}
    )


def _key_from(key_id: str, raw: str | bytes) -> KeyRecord:
    doc = json.loads(raw)
    return KeyRecord(key_id, doc["project"], doc["name"], doc["sha256"], float(doc["created"]))


def _text(raw: str | bytes) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _pairs(flat: list) -> Iterable[tuple]:  # type: ignore[type-arg]
    return zip(flat[::2], flat[1::2], strict=True)


def _cap(cap: int | None) -> int:
    return -1 if cap is None else cap


class RedisDirectory:
    kind = "redis"

    def __init__(self, client: aioredis.Redis, keys: Keys, *, wall: Callable[[], float] = time.time) -> None:
        self._r = client
        self._wall = wall
        self._projects, self._gone, self._keys, self._version, self._used = (
            keys.directory(part) for part in ("projects", "gone", "keys", "version", "used")
        )
        self._snapshot = client.register_script(_SNAPSHOT)
        self._add_project = client.register_script(_ADD_PROJECT)
        self._set_project = client.register_script(_SET_PROJECT)
        self._delete_project = client.register_script(_DELETE_PROJECT)
        self._add_key = client.register_script(_ADD_KEY)
        self._delete_key = client.register_script(_DELETE_KEY)
        self._touch = client.register_script(_TOUCH)

    async def version(self) -> int:
        try:
            return int(await self._r.get(self._version) or 0)
        except _REDIS_ERRORS as exc:
            raise _unavailable("reading the directory's version", exc) from exc

    async def snapshot(self) -> Snapshot:
        version, projects, keys = await self._run(
            "reading the directory", self._snapshot, [self._version, self._projects, self._keys], []
        )
        return Snapshot(
            int(version),
            tuple(sorted(_project_from(_text(n), v) for n, v in _pairs(projects))),
            tuple(
                sorted(
                    (_key_from(_text(i), v) for i, v in _pairs(keys)), key=lambda k: (k.project, k.created)
                )
            ),
        )

    async def _run(self, what: str, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except _REDIS_ERRORS as exc:
            raise _unavailable(what, exc) from exc

    async def add_project(
        self, name: str, *, cap: int | None, spend_cap: float | None = None
    ) -> ProjectRecord:
        rec = ProjectRecord(name, self._wall(), spend_cap)
        keys = [self._projects, self._gone, self._keys, self._version]
        outcome = _text(await self._run("adding a project", self._add_project, keys,
                                        [name, _project_json(rec), _cap(cap)]))  # fmt: skip
        if outcome != "ok":
            raise Refused(outcome)
        return rec

    async def set_spend_cap(self, name: str, spend_cap: float | None) -> bool:
        snap = await self.snapshot()
        found = [p for p in snap.projects if p.name == name]
        if not found:
            return False
        doc = _project_json(found[0]._replace(spend_cap=spend_cap))
        return bool(
            await self._run(
                "setting a spend cap", self._set_project, [self._projects, self._version], [name, doc]
            )
        )

    async def delete_project(self, name: str) -> list[KeyRecord] | None:
        keys = [self._projects, self._gone, self._keys, self._version, self._used]
        raw = await self._run("deleting a project", self._delete_project, keys, [name])
        return None if raw is None else [_key_from(_text(i), v) for i, v in _pairs(raw)]

    async def add_key(
        self, project: str, name: str, sha256: str, *, cap: int | None, known: bool
    ) -> KeyRecord:
        rec = KeyRecord(new_key_id(), project, name, sha256, self._wall())
        keys = [self._projects, self._keys, self._version]
        args: list[object] = [rec.id, _key_json(rec), project, name, _cap(cap), "1" if known else "0"]
        outcome = _text(await self._run("adding a key", self._add_key, keys, args))
        if outcome != "ok":
            raise Refused(outcome)
        return rec

    async def delete_key(self, key_id: str) -> KeyRecord | None:
        raw = await self._run(
            "revoking a key", self._delete_key, [self._keys, self._version, self._used], [key_id]
        )
        return None if raw is None else _key_from(key_id, raw)

    async def touch(self, used: Mapping[str, float]) -> None:
        if used:
            args = [x for key_id, at in used.items() for x in (key_id, repr(at))]
            await self._run("noting keys' last use", self._touch, [self._used], args)

    async def last_used(self, ids: Iterable[str]) -> dict[str, float]:
        ids = list(ids)
        if not ids:
            return {}
        try:
            values = await self._r.hmget(self._used, ids)
        except _REDIS_ERRORS as exc:
            raise _unavailable("reading keys' last use", exc) from exc
        return {key_id: float(v) for key_id, v in zip(ids, values, strict=True) if v is not None}

    async def close(self) -> None:
        pass


class SqliteDirectory:
    """The embedded store's directory: one instance, a local file (``directory.db``)."""

    kind = "sqlite"

    def __init__(self, path: str | Path, *, wall: Callable[[], float] = time.time) -> None:
        self._db = open_db(path)
        self._wall = wall
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS projects (name TEXT PRIMARY KEY, created REAL NOT NULL,
                spend_cap REAL);
            CREATE TABLE IF NOT EXISTS gone (name TEXT PRIMARY KEY);
            CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, project TEXT NOT NULL,
                name TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL,
                UNIQUE (project, name));
            CREATE TABLE IF NOT EXISTS used (id TEXT PRIMARY KEY, at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
            """
        )

    def _count(self, sql: str, *args: object) -> int:
        return int(self._db.execute(sql, args).fetchone()[0])

    def _bump(self) -> None:
        self._db.execute("INSERT INTO meta VALUES ('version', 1) ON CONFLICT (k) DO UPDATE SET v = v + 1")

    async def version(self) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k = 'version'").fetchone()
        return int(row[0]) if row else 0

    async def snapshot(self) -> Snapshot:
        projects = self._db.execute("SELECT name, created, spend_cap FROM projects ORDER BY name").fetchall()
        keys = self._db.execute(
            "SELECT id, project, name, sha256, created FROM keys ORDER BY project, created"
        ).fetchall()
        return Snapshot(
            await self.version(),
            tuple(ProjectRecord(*row) for row in projects),
            tuple(KeyRecord(*row) for row in keys),
        )

    async def add_project(
        self, name: str, *, cap: int | None, spend_cap: float | None = None
    ) -> ProjectRecord:
        rec = ProjectRecord(name, self._wall(), spend_cap)
        with self._db:  # one transaction: the checks and the write
            self._db.execute("BEGIN IMMEDIATE")
            if self._count("SELECT COUNT(*) FROM projects WHERE name = ?", name):
                raise Refused(Refused.EXISTS)
            if self._count("SELECT COUNT(*) FROM gone WHERE name = ?", name):
                raise Refused(Refused.REUSED)
            if cap is not None and self._count("SELECT COUNT(*) FROM projects") >= cap:
                raise Refused(Refused.CAP)
            self._db.execute("INSERT INTO projects VALUES (?, ?, ?)", rec)
            self._bump()
        return rec

    async def set_spend_cap(self, name: str, spend_cap: float | None) -> bool:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            done = self._db.execute(
                "UPDATE projects SET spend_cap = ? WHERE name = ?", (spend_cap, name)
            ).rowcount
            if done:
                self._bump()
        return bool(done)

    async def delete_project(self, name: str) -> list[KeyRecord] | None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if not self._db.execute("DELETE FROM projects WHERE name = ?", (name,)).rowcount:
                return None
            rows = self._db.execute(
                "SELECT id, project, name, sha256, created FROM keys WHERE project = ?", (name,)
            ).fetchall()
            self._db.execute("DELETE FROM keys WHERE project = ?", (name,))
            self._db.executemany("DELETE FROM used WHERE id = ?", [(row[0],) for row in rows])
            self._db.execute("INSERT OR IGNORE INTO gone VALUES (?)", (name,))
            self._bump()
        return [KeyRecord(*row) for row in rows]

    async def add_key(
        self, project: str, name: str, sha256: str, *, cap: int | None, known: bool
    ) -> KeyRecord:
        rec = KeyRecord(new_key_id(), project, name, sha256, self._wall())
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if not known and not self._count("SELECT COUNT(*) FROM projects WHERE name = ?", project):
                raise Refused(Refused.NO_PROJECT)
            if cap is not None and self._count("SELECT COUNT(*) FROM keys") >= cap:
                raise Refused(Refused.CAP)
            if self._count("SELECT COUNT(*) FROM keys WHERE project = ? AND name = ?", project, name):
                raise Refused(Refused.EXISTS)
            self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?)", rec)
            self._bump()
        return rec

    async def delete_key(self, key_id: str) -> KeyRecord | None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT id, project, name, sha256, created FROM keys WHERE id = ?", (key_id,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM keys WHERE id = ?", (key_id,))
            self._db.execute("DELETE FROM used WHERE id = ?", (key_id,))
            self._bump()
        return KeyRecord(*row)

    async def touch(self, used: Mapping[str, float]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO used VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET at = MAX(at, excluded.at)",
                list(used.items()),
            )

    async def last_used(self, ids: Iterable[str]) -> dict[str, float]:
        out = {}
        for key_id in ids:
            row = self._db.execute("SELECT at FROM used WHERE id = ?", (key_id,)).fetchone()
            if row is not None:
                out[key_id] = float(row[0])
        return out

    async def close(self) -> None:
        self._db.close()
