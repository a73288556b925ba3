"""The jobs an instance saw last (answers polls while Redis is away): bounded, least
recently seen dropped first, never holding a credential."""

from __future__ import annotations

from gateway.products.transcripts.jobs import Job
from gateway.products.transcripts.recent import RecentJobs


def job(i: int, upstream_id: str = "") -> Job:
    return Job(id=f"j{i}", key_fp="fp", body={}, created_ms=0, cred="secret", upstream_id=upstream_id)


def test_bounded_least_recently_seen_first_and_without_credentials() -> None:
    recent = RecentJobs(capacity=3)
    for i in range(3):
        recent.saw(job(i, upstream_id=f"u{i}"))
    assert recent.get("j0") is not None  # seen again: now the most recent
    recent.saw(job(3))
    assert recent.get("j1") is None and len(recent) == 3  # the least recently seen went
    kept = recent.get("j0")
    assert kept is not None and kept.cred is None
    assert recent.by_upstream(["u0", "u1", "u2", "x"]) == {"u0": "j0", "u2": "j2"}
    recent.forget("j0")
    assert recent.get("j0") is None
