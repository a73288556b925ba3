"""Transcript jobs: the durable record of every POST /v2/transcript, and where it is kept.

A job is created before anything else happens to the request, so no crash can leave a
transcript upstream that the gateway does not know about. Its life:

    queued ──claim──▶ claimed ──upstream id recorded──▶ submitted ──▶ ended
       ▲                 │ (gave up before POSTing, upstream refused    ▲
       └────requeue──────┘  with 429, or a search shows it absent)       │
       └──────────────── cancelled (DELETE while queued), refused, too old ┘

``ticket`` names the admission of the current attempt (``<id>.<attempt>``): a requeued job
waits under a new ticket, so its next POST takes a fresh window token, while ``seq`` (its
arrival order) stays, so it keeps its place. Two stores keep jobs: Redis (shared by every
instance) and sqlite (the embedded store: a file, so a restart loses nothing).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class State(enum.StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"
    SUBMITTED = "submitted"
    ENDED = "ended"


@dataclass
class Job:
    id: str
    key_fp: str  # keyed hash of the creator's API key (ownership checks)
    body: dict[str, Any]  # the request body as the client sent it; cleared once submitted or ended
    created_ms: int  # wall clock
    priority: int = 0
    state: State = State.QUEUED
    cred: str | None = None  # the creator's key, encrypted; deleted when the job ends
    seq: int = 0  # arrival order in the admission queue (0 until first known)
    attempt: int = 0
    claimer: str = ""
    claim_until_ms: int = 0
    upstream_id: str = ""
    snapshot: dict[str, Any] | None = None  # the last upstream view (upstream's ids)
    refreshed_ms: int = 0
    ended_ms: int = 0
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # webhook relay state and the like

    @property
    def ticket(self) -> str:
        return f"{self.id}.{self.attempt}"

    @property
    def status(self) -> str:
        """The status a client sees: upstream's once known, else the gateway's own."""
        if self.snapshot and isinstance(self.snapshot.get("status"), str):
            return str(self.snapshot["status"])
        if self.state is State.ENDED:
            return "error"
        return "queued"

    def to_fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key_fp": self.key_fp,
            "body": json.dumps(self.body),
            "created_ms": self.created_ms,
            "priority": self.priority,
            "state": self.state.value,
            "cred": self.cred or "",
            "seq": self.seq,
            "attempt": self.attempt,
            "claimer": self.claimer,
            "claim_until_ms": self.claim_until_ms,
            "upstream_id": self.upstream_id,
            "snapshot": json.dumps(self.snapshot) if self.snapshot is not None else "",
            "refreshed_ms": self.refreshed_ms,
            "ended_ms": self.ended_ms,
            "error": self.error,
            **extra_fields(self.extra),
        }

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> Job:
        return cls(
            id=f["id"],
            key_fp=f["key_fp"],
            body=json.loads(f.get("body") or "{}"),
            created_ms=int(f["created_ms"]),
            priority=int(f.get("priority") or 0),
            state=State(f["state"]),
            cred=f.get("cred") or None,
            seq=int(f.get("seq") or 0),
            attempt=int(f.get("attempt") or 0),
            claimer=f.get("claimer", ""),
            claim_until_ms=int(f.get("claim_until_ms") or 0),
            upstream_id=f.get("upstream_id", ""),
            snapshot=json.loads(f["snapshot"]) if f.get("snapshot") else None,
            refreshed_ms=int(f.get("refreshed_ms") or 0),
            ended_ms=int(f.get("ended_ms") or 0),
            error=f.get("error", ""),
            extra={k[2:]: json.loads(v) for k, v in f.items() if k.startswith("x:")},
        )


class JobStore(Protocol):
    """Durable job records. Every verb is one atomic step; times are the store's clock."""

    kind: str

    async def create(self, job: Job, *, idempotency: str | None = None, idem_ttl_s: int = 86400) -> Job:
        """Record a new queued job. With ``idempotency`` (keyed by the creator), a job
        already recorded under the same key within ``idem_ttl_s`` is returned instead."""
        ...

    async def get(self, job_id: str) -> Job | None: ...

    async def by_upstream(self, upstream_ids: Sequence[str]) -> dict[str, str]:
        """upstream id -> job id, for those the gateway knows."""
        ...

    async def set_seq(self, job_id: str, seq: int) -> None: ...

    async def claim(self, job_id: str, claimer: str, claim_ms: int) -> Job | None:
        """queued -> claimed, if still queued (compare-and-set); the claimed job, else None.
        The same claimer claiming again (a replay) gets the job it claimed: claimers must be
        unique per claim."""
        ...

    async def submitted(self, job_id: str, upstream_id: str, snapshot: dict[str, Any]) -> None:
        """claimed -> submitted: the upstream id is recorded, and indexed."""
        ...

    async def requeue(self, job_id: str, *, attempt: int, claimer: str = "") -> bool:
        """claimed -> queued under a new attempt (nothing reached upstream, or it refused),
        if claimed (by ``claimer``, unless empty). True also when the job is already queued
        under that attempt (a replay)."""
        ...

    async def refreshed(self, job_id: str, snapshot: dict[str, Any]) -> None: ...

    async def end(
        self,
        job_id: str,
        *,
        snapshot: dict[str, Any] | None,
        error: str,
        retention_s: int,
        upstream_id: str = "",
    ) -> Job | None:
        """-> ended (once): the credential, the body and the webhook's secret are deleted, the
        rest kept ``retention_s`` (``snapshot`` should be ``ended_snapshot``'s).
        ``upstream_id`` records (and indexes) an id first learnt now, from an early webhook.
        Returns the job as it was, or None if it had already ended (or is unknown)."""
        ...

    async def update_extra(self, job_id: str, extra: dict[str, Any]) -> None: ...

    async def delete(self, job_id: str) -> None:
        """Forget a job entirely (one upstream refused at once: the client has its answer)."""
        ...

    async def purge(self, job_id: str) -> None:
        """An ended job keeps only what maps its ids (the transcript was deleted upstream):
        no snapshot beyond its id and status, no error, no webhook."""
        ...

    async def queued(self, limit: int) -> list[str]:
        """The first ``limit`` queued jobs, in order (priority, then arrival)."""
        ...

    async def running(self, heard_before_ms: int, limit: int) -> list[str]:
        """Claimed or submitted jobs last refreshed before ``heard_before_ms`` (wall ms)."""
        ...

    async def heard(self, job_id: str, *, before_ms: int, now_ms: int) -> bool:
        """Mark a running job heard of now, if nobody did since ``before_ms``: True for the
        one instance that should look it up (compare-and-set on the last-heard time)."""
        ...

    async def counts(self) -> dict[str, int]:
        """Jobs per live state (for metrics and /readyz)."""
        ...

    async def close(self) -> None: ...


# What an ended job keeps of upstream's document: never the transcript itself.
KEPT_AT_END = ("id", "status", "error", "audio_duration")
MAX_ERROR_CHARS = 1000


def ended_snapshot(doc: dict[str, Any]) -> dict[str, Any]:
    """Upstream's final document reduced to what the gateway keeps: ids, status, the error
    message (capped) and the audio duration (what upstream bills)."""
    out = {k: doc[k] for k in KEPT_AT_END if doc.get(k) is not None}
    if isinstance(out.get("error"), str):
        out["error"] = out["error"][:MAX_ERROR_CHARS]
    return out


def ended_extra(extra: dict[str, Any]) -> dict[str, Any]:
    """A job's extra items once it ended: its webhook without the auth header's secret
    (the relay already holds what it needs; views show only the URL and header name)."""
    hook = extra.get("webhook")
    if not isinstance(hook, dict) or "auth_header_value" not in hook:
        return {}
    return {"webhook": {k: v for k, v in hook.items() if k != "auth_header_value"}}


def extra_fields(extra: dict[str, Any]) -> dict[str, str]:
    """Each extra item is its own field (``x:<name>``), so items are updated independently."""
    return {f"x:{k}": json.dumps(v) for k, v in extra.items()}


def queue_score(priority: int, created_ms: int) -> float:
    """The queued index's order: higher priority first, then arrival (wall ms)."""
    return (99 - min(max(priority, 0), 99)) * 1e13 + created_ms
