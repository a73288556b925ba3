"""New transcript submissions made while Redis is away (``redis.on_outage: fail_open``).

The job store lives in Redis; while it cannot be reached, ``POST /v2/transcript`` keeps the
new job here (sqlite under ``transcripts.data_dir``, mode 0600: the record holds the
client's key, encrypted by the vault as in the store) and answers it as queued, under its
own id. When Redis answers again, the jobs are moved into it in the order they came, each
created with an idempotency key (the client's, or ``journal:<job id>``), so a move that is
replayed (the journal entry deleted after the create, a crash in between) never makes a
second job; then the entry is deleted. Until it is moved, ``GET /v2/transcript/<id>``
answers from here.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...localdb import open_db
from .jobs import Job


class Journal:
    def __init__(self, path: str | Path) -> None:
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "id TEXT UNIQUE NOT NULL, idem TEXT, fields TEXT NOT NULL)"
        )

    def add(self, job: Job, idempotency: str | None) -> Job:
        """Keep ``job``; the same idempotency key again gives back the job kept first."""
        if idempotency is not None:
            row = self._db.execute("SELECT fields FROM journal WHERE idem = ?", (idempotency,)).fetchone()
            if row is not None:
                return Job.from_fields(json.loads(row[0]))
        fields = {k: str(v) for k, v in job.to_fields().items()}
        self._db.execute(
            "INSERT INTO journal (id, idem, fields) VALUES (?, ?, ?)",
            (job.id, idempotency, json.dumps(fields)),
        )
        return job

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT fields FROM journal WHERE id = ?", (job_id,)).fetchone()
        return Job.from_fields(json.loads(row[0])) if row is not None else None

    def first(self, n: int) -> list[tuple[int, Job, str | None]]:
        """The oldest ``n`` entries, in the order they came: (entry, job, idempotency key)."""
        rows = self._db.execute("SELECT seq, fields, idem FROM journal ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [(seq, Job.from_fields(json.loads(fields)), idem) for seq, fields, idem in rows]

    def delete(self, seq: int) -> None:
        self._db.execute("DELETE FROM journal WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM journal").fetchone()[0])

    def close(self) -> None:
        self._db.close()
