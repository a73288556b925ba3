"""Jobs in a local sqlite file: the embedded store's durable queue (one instance, no Redis).

Every verb is one transaction, committed with ``synchronous=FULL``: a job the gateway
answered "queued" for survives a crash or restart. Calls are synchronous and short (an
indexed row or two); submissions are rare next to the requests they answer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ...localdb import open_db
from .jobs import MAX_ERROR_CHARS, Job, State, ended_extra, queue_score

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    data TEXT NOT NULL,
    queue_score REAL NOT NULL,
    heard_ms INTEGER NOT NULL DEFAULT 0,
    expires_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, queue_score);
CREATE TABLE IF NOT EXISTS upstream_ids (
    upstream_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, job_id TEXT NOT NULL, expires_ms INTEGER NOT NULL
);
"""
LIVE = (State.CLAIMED.value, State.SUBMITTED.value)


class SqliteJobStore:
    kind = "sqlite"

    def __init__(self, path: str | Path, *, wall: Callable[[], float] = time.time) -> None:
        self._db = open_db(path)
        self._db.executescript(SCHEMA)
        self._wall = wall
        self._swept = 0

    def _now(self) -> int:
        return int(self._wall() * 1000)

    def _tx(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return out

    def _load(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT data, expires_ms FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (row[1] and row[1] <= self._now()):
            return None
        return Job.from_fields(json.loads(row[0]))

    def _save(
        self, db: sqlite3.Connection, job: Job, *, heard_ms: int | None = None, expires_ms: int = 0
    ) -> None:
        fields = {k: str(v) for k, v in job.to_fields().items()}
        db.execute(
            "INSERT INTO jobs (id, state, data, queue_score, heard_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET state = excluded.state, data = excluded.data, "
            "queue_score = excluded.queue_score, heard_ms = COALESCE(?, jobs.heard_ms), "
            "expires_ms = excluded.expires_ms",
            (
                job.id,
                job.state.value,
                json.dumps(fields),
                queue_score(job.priority, job.created_ms),
                heard_ms or 0,
                expires_ms,
                heard_ms,
            ),
        )

    # -- verbs -------------------------------------------------------------------------
    async def create(self, job: Job, *, idempotency: str | None = None, idem_ttl_s: int = 86400) -> Job:
        def tx(db: sqlite3.Connection) -> Job:
            now = self._now()
            if idempotency is not None:
                row = db.execute(
                    "SELECT job_id FROM idempotency WHERE key = ? AND expires_ms > ?", (idempotency, now)
                ).fetchone()
                if row is not None:
                    existing = self._load(db, row[0])
                    if existing is not None:
                        return existing
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (key, job_id, expires_ms) VALUES (?, ?, ?)",
                    (idempotency, job.id, now + idem_ttl_s * 1000),
                )
            # The job takes its place in line now (its arrival sequence, kept for life). A
            # missing counter (a fresh file, or a lost row) starts past every job's sequence,
            # so a new job never goes ahead of an old one.
            db.execute(
                "INSERT INTO counters (name, value) SELECT 'seq', 1 + COALESCE(MAX("
                "CAST(json_extract(data, '$.seq') AS INTEGER)), 0) FROM jobs "
                "WHERE true ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            job.seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
            self._save(db, job)
            return job

        result: Job = self._tx(tx)
        self._sweep()
        return result

    async def get(self, job_id: str) -> Job | None:
        return self._load(self._db, job_id)

    async def by_upstream(self, upstream_ids: Sequence[str]) -> dict[str, str]:
        if not upstream_ids:
            return {}
        marks = ",".join("?" * len(upstream_ids))
        rows = self._db.execute(
            f"SELECT upstream_id, job_id FROM upstream_ids WHERE upstream_id IN ({marks}) AND expires_ms > ?",
            (*upstream_ids, self._now()),
        ).fetchall()
        return {u: j for u, j in rows}

    def _update(self, job_id: str, change: Callable[[Job], bool], **save: Any) -> Job | None:
        def tx(db: sqlite3.Connection) -> Job | None:
            job = self._load(db, job_id)
            if job is None or not change(job):
                return None
            self._save(db, job, **save)
            return job

        result: Job | None = self._tx(tx)
        return result

    async def set_seq(self, job_id: str, seq: int) -> None:
        def change(job: Job) -> bool:
            job.seq = job.seq or seq
            return True

        self._update(job_id, change)

    async def claim(self, job_id: str, claimer: str, claim_ms: int) -> Job | None:
        now = self._now()

        def change(job: Job) -> bool:
            if job.state is State.CLAIMED and job.claimer == claimer:
                return True  # the same claim again: the job as claimed
            if job.state is not State.QUEUED:
                return False
            job.state, job.claimer, job.claim_until_ms = State.CLAIMED, claimer, now + claim_ms
            return True

        return self._update(job_id, change, heard_ms=now)

    async def submitted(self, job_id: str, upstream_id: str, snapshot: dict[str, Any]) -> None:
        now = self._now()

        def change(job: Job) -> bool:
            if job.state is State.ENDED:
                return False
            job.state, job.upstream_id, job.snapshot, job.refreshed_ms = (
                State.SUBMITTED,
                upstream_id,
                snapshot,
                now,
            )
            job.body = {}  # upstream has it now; nothing needs it again
            self._db.execute(
                "INSERT OR REPLACE INTO upstream_ids (upstream_id, job_id, expires_ms) VALUES (?, ?, ?)",
                (upstream_id, job_id, 2**62),
            )
            return True

        self._update(job_id, change, heard_ms=now)

    async def requeue(self, job_id: str, *, attempt: int, claimer: str = "") -> bool:
        def change(job: Job) -> bool:
            if job.state is State.QUEUED and job.attempt == attempt:
                return True  # requeued under this attempt already
            if job.state is not State.CLAIMED or (claimer and job.claimer != claimer):
                return False
            job.state, job.attempt, job.claimer, job.claim_until_ms = State.QUEUED, attempt, "", 0
            return True

        return self._update(job_id, change) is not None

    async def refreshed(self, job_id: str, snapshot: dict[str, Any]) -> None:
        now = self._now()

        def change(job: Job) -> bool:
            if job.state is State.ENDED:
                return False
            job.snapshot, job.refreshed_ms = snapshot, now
            return True

        self._update(job_id, change, heard_ms=now)

    async def end(
        self,
        job_id: str,
        *,
        snapshot: dict[str, Any] | None,
        error: str,
        retention_s: int,
        upstream_id: str = "",
    ) -> Job | None:
        now = self._now()
        before: list[Job] = []

        def change(job: Job) -> bool:
            if job.state is State.ENDED:
                return False
            before.append(Job.from_fields({k: str(v) for k, v in job.to_fields().items()}))
            job.state, job.ended_ms, job.cred, job.error = State.ENDED, now, None, error[:MAX_ERROR_CHARS]
            job.body = {}
            job.extra.update(ended_extra(job.extra))
            if snapshot is not None:
                job.snapshot, job.refreshed_ms = snapshot, now
            if upstream_id and not job.upstream_id:  # first learnt now (an early webhook)
                job.upstream_id = upstream_id
                self._db.execute(
                    "INSERT OR REPLACE INTO upstream_ids (upstream_id, job_id, expires_ms) VALUES (?, ?, ?)",
                    (upstream_id, job_id, 2**62),
                )
            if job.upstream_id:
                self._db.execute(
                    "UPDATE upstream_ids SET expires_ms = ? WHERE upstream_id = ?",
                    (now + retention_s * 1000, job.upstream_id),
                )
            return True

        self._update(job_id, change, expires_ms=now + retention_s * 1000)
        return before[0] if before else None

    async def update_extra(self, job_id: str, extra: dict[str, Any]) -> None:
        def change(job: Job) -> bool:
            job.extra.update(extra)
            return True

        self._update(job_id, change)

    async def delete(self, job_id: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM idempotency WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM upstream_ids WHERE job_id = ?", (job_id,))

        self._tx(tx)

    async def purge(self, job_id: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT data, expires_ms FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            job = Job.from_fields(json.loads(row[0]))
            if job.state is not State.ENDED:
                return
            job.snapshot = {"id": job.upstream_id or job.id, "status": job.status}
            job.body, job.error, job.extra = {}, "", {}
            self._save(db, job, expires_ms=row[1])

        self._tx(tx)
        # Earlier versions of the row stay in the write-ahead log until a checkpoint: the
        # client asked for its transcript to be deleted, so they go now (rare, explicit).
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def queued(self, limit: int) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE state = ? ORDER BY queue_score, id LIMIT ?",
            (State.QUEUED.value, limit),
        ).fetchall()
        return [r[0] for r in rows]

    async def running(self, heard_before_ms: int, limit: int) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM jobs WHERE state IN (?, ?) AND heard_ms < ? ORDER BY heard_ms LIMIT ?",
            (*LIVE, heard_before_ms, limit),
        ).fetchall()
        return [r[0] for r in rows]

    async def heard(self, job_id: str, *, before_ms: int, now_ms: int) -> bool:
        cur = self._db.execute(
            "UPDATE jobs SET heard_ms = ? WHERE id = ? AND state IN (?, ?) AND heard_ms < ?",
            (now_ms, job_id, *LIVE, before_ms),
        )
        return cur.rowcount == 1

    async def counts(self) -> dict[str, int]:
        rows = dict(
            self._db.execute(
                "SELECT state, COUNT(*) FROM jobs WHERE state != ? GROUP BY state", (State.ENDED.value,)
            ).fetchall()
        )
        return {"queued": rows.get(State.QUEUED.value, 0), "running": sum(rows.get(s, 0) for s in LIVE)}

    def _sweep(self) -> None:
        """Drop what outlived its retention (what key expiry does for the Redis store)."""
        now = self._now()
        if now - self._swept < 60_000:
            return
        self._swept = now
        for table in ("jobs", "upstream_ids", "idempotency"):
            where = "expires_ms > 0 AND expires_ms <= ?"
            self._db.execute(f"DELETE FROM {table} WHERE {where}", (now,))

    async def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"SqliteJobStore({self._db})"
