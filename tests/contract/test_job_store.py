"""One contract, every job store: sqlite (the embedded store's file), fakeredis, real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import make_client
from gateway.products.transcripts.jobs import Job, JobStore, State
from gateway.products.transcripts.redis_jobs import RedisJobStore
from gateway.products.transcripts.sqlite_jobs import SqliteJobStore
from tests.conftest import REDIS_URL, redis_client


class Wall:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", "fakeredis", "redis"])
async def jobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[JobStore, Wall]]:
    wall = Wall()
    if request.param == "sqlite":
        store = SqliteJobStore(tmp_path / "jobs.db", wall=wall)
        yield store, wall
        await store.close()
    elif request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        yield RedisJobStore(client, Keys(prefix="j"), shebang=False, wall=wall), wall
        await client.aclose()
    else:
        await (await redis_client()).aclose()
        client = make_client(REDIS_URL, timeout_ms=2000)
        keys = Keys(prefix="jobs" + uuid.uuid4().hex[:8])
        yield RedisJobStore(client, keys, wall=wall), wall
        async for key in client.scan_iter(match=f"{keys.prefix}:*"):
            await client.delete(key)
        await client.aclose()


def new_job(i: int = 0, *, priority: int = 0, created_ms: int = 1000) -> Job:
    return Job(
        id=f"job-{i}",
        key_fp="fp",
        body={"audio_url": f"https://x/{i}.mp3", "speaker_labels": True},
        created_ms=created_ms + i,
        priority=priority,
        cred="encrypted-credential",
    )


async def test_a_job_round_trips(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    job = new_job()
    job.extra = {"webhook": {"url": "https://c/hook?customer_id=1"}}
    await store.create(job)
    got = await store.get(job.id)
    assert got == job and job.seq > 0
    assert await store.get("nope") is None


async def test_queue_order_is_priority_then_arrival(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    for i, prio in enumerate([0, 0, 50, 0, 99]):
        await store.create(new_job(i, priority=prio))
    assert await store.queued(10) == ["job-4", "job-2", "job-0", "job-1", "job-3"]
    assert await store.queued(2) == ["job-4", "job-2"]
    assert await store.counts() == {"queued": 5, "running": 0}


async def test_claim_is_compare_and_set(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    await store.create(new_job())
    first = await store.claim("job-0", "instance-a", 30_000)
    assert first is not None and first.state is State.CLAIMED and first.claimer == "instance-a"
    assert first.claim_until_ms > 0
    assert await store.claim("job-0", "instance-b", 30_000) is None  # already claimed
    assert await store.queued(10) == []
    assert await store.counts() == {"queued": 0, "running": 1}


async def test_requeue_takes_a_new_attempt_and_keeps_the_place(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    for i in range(3):
        await store.create(new_job(i))
    await store.claim("job-0", "a", 30_000)
    assert await store.requeue("job-0", attempt=1)
    assert not await store.requeue("job-0", attempt=2)  # not claimed any more
    await store.claim("job-1", "b/1", 30_000)
    assert not await store.requeue("job-1", attempt=1, claimer="b/0")  # a stale claim's requeue
    assert await store.requeue("job-1", attempt=1, claimer="b/1")
    job = await store.get("job-0")
    assert job is not None and job.state is State.QUEUED and job.attempt == 1 and job.ticket == "job-0.1"
    assert await store.queued(10) == ["job-0", "job-1", "job-2"]


async def test_submitted_indexes_the_upstream_id(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    await store.create(new_job())
    await store.claim("job-0", "a", 30_000)
    await store.submitted("job-0", "up-1", {"id": "up-1", "status": "queued"})
    job = await store.get("job-0")
    assert job is not None and job.state is State.SUBMITTED and job.upstream_id == "up-1"
    assert job.status == "queued" and job.refreshed_ms > 0
    assert await store.by_upstream(["up-1", "up-unknown"]) == {"up-1": "job-0"}


async def test_end_happens_once_deletes_the_credential_and_keeps_the_record(
    jobs: tuple[JobStore, Wall],
) -> None:
    store, _ = jobs
    await store.create(new_job())
    await store.claim("job-0", "a", 30_000)
    await store.submitted("job-0", "up-1", {"id": "up-1", "status": "processing"})
    before = await store.end(
        "job-0", snapshot={"id": "up-1", "status": "completed"}, error="", retention_s=3600
    )
    assert before is not None and before.state is State.SUBMITTED and before.cred == "encrypted-credential"
    assert await store.end("job-0", snapshot=None, error="", retention_s=3600) is None  # once
    job = await store.get("job-0")
    assert job is not None and job.state is State.ENDED and job.cred is None and job.status == "completed"
    assert await store.counts() == {"queued": 0, "running": 0}
    assert await store.by_upstream(["up-1"]) == {"up-1": "job-0"}  # still mapped while retained
    # An ended job is never updated again.
    await store.refreshed("job-0", {"id": "up-1", "status": "processing"})
    job = await store.get("job-0")
    assert job is not None and job.status == "completed"


async def test_cancelled_while_queued(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    await store.create(new_job())
    before = await store.end("job-0", snapshot=None, error="cancelled", retention_s=3600)
    assert before is not None and before.state is State.QUEUED
    assert await store.queued(10) == []
    assert await store.claim("job-0", "a", 30_000) is None
    job = await store.get("job-0")
    assert job is not None and job.status == "error" and job.error == "cancelled"


async def test_idempotency_returns_the_first_job(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    first = await store.create(new_job(0), idempotency="fp:retry-1")
    again = await store.create(new_job(1), idempotency="fp:retry-1")
    other = await store.create(new_job(2), idempotency="fp:retry-2")
    assert again.id == first.id == "job-0" and other.id == "job-2"
    assert await store.queued(10) == ["job-0", "job-2"]


async def test_running_lists_jobs_not_heard_of(jobs: tuple[JobStore, Wall]) -> None:
    store, wall = jobs
    for i in range(3):
        await store.create(new_job(i))
        await store.claim(f"job-{i}", "a", 30_000)
    wall.t += 10
    await store.refreshed("job-1", {"id": "u1", "status": "processing"})
    heard_before = int(wall.t * 1000) - 1
    assert sorted(await store.running(heard_before, 10)) == ["job-0", "job-2"]


async def test_extra_items_update_independently(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    await store.create(new_job())
    await store.update_extra("job-0", {"a": 1})
    await store.update_extra("job-0", {"b": {"c": [1, 2]}})
    job = await store.get("job-0")
    assert job is not None and job.extra == {"a": 1, "b": {"c": [1, 2]}}


async def test_jobs_take_their_place_in_line_when_created(jobs: tuple[JobStore, Wall]) -> None:
    store, _ = jobs
    seqs = [(await store.create(new_job(i))).seq for i in range(3)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    stored = [(await store.get(f"job-{i}")).seq for i in range(3)]  # type: ignore[union-attr]
    assert stored == seqs


async def test_heard_lets_one_caller_look_a_job_up(jobs: tuple[JobStore, Wall]) -> None:
    store, wall = jobs
    await store.create(new_job())
    await store.claim("job-0", "a", 30_000)
    wall.t += 60
    now = int(wall.t * 1000)
    assert await store.heard("job-0", before_ms=now - 30_000, now_ms=now)
    assert not await store.heard("job-0", before_ms=now - 30_000, now_ms=now)  # just marked
    assert await store.running(now - 30_000, 10) == []
    assert not await store.heard("nope", before_ms=now, now_ms=now)


async def test_an_early_webhook_ends_a_claimed_job_and_records_its_upstream_id(
    jobs: tuple[JobStore, Wall],
) -> None:
    store, _ = jobs
    await store.create(new_job())
    await store.claim("job-0", "a", 30_000)
    before = await store.end(
        "job-0", snapshot={"id": "up-9", "status": "error"}, error="", retention_s=3600, upstream_id="up-9"
    )
    assert before is not None and before.state is State.CLAIMED
    await store.submitted("job-0", "up-9", {"id": "up-9", "status": "queued"})  # the dispatcher, late
    job = await store.get("job-0")
    assert (
        job is not None and job.state is State.ENDED and job.upstream_id == "up-9" and job.status == "error"
    )
    assert await store.by_upstream(["up-9"]) == {"up-9": "job-0"}


def replaying(store: JobStore, *scripts: str) -> None:
    """Each named script runs twice per call, the caller getting the second reply: what
    redis-py's retry does when a connection drops after a script ran but before its reply
    arrived. (sqlite has no replay: its verbs are called twice by the tests instead.)"""
    for name in scripts:
        script = getattr(store, name)

        async def twice(*, keys: list[str], args: list[object], script: object = script) -> object:
            await script(keys=keys, args=args)  # type: ignore[operator]
            return await script(keys=keys, args=args)  # type: ignore[operator]

        setattr(store, name, twice)


async def test_replayed_job_scripts_return_the_same_result(jobs: tuple[JobStore, Wall]) -> None:
    """claim, submitted, requeue and end, each run twice with the same arguments, leave the
    state of one run and answer as the first run did (a replayed claim used to answer "not
    queued", leaving the job claimed by nobody until the reconciler)."""
    store, _ = jobs
    redis = isinstance(store, RedisJobStore)
    if redis:
        replaying(store, "_claim", "_update", "_requeue", "_end")
    for i in range(2):
        await store.create(new_job(i))

    async def claim(job_id: str, claimer: str) -> Job | None:
        got = await store.claim(job_id, claimer, 30_000)
        return got if redis else await store.claim(job_id, claimer, 30_000)

    first = await claim("job-0", "a/1")
    assert first is not None and first.state is State.CLAIMED and first.claimer == "a/1"
    assert await store.claim("job-0", "a/2", 30_000) is None  # another claim still loses
    for _ in range(1 if redis else 2):
        await store.submitted("job-0", "up-1", {"id": "up-1", "status": "queued"})
    job = await store.get("job-0")
    assert job is not None and job.state is State.SUBMITTED and job.upstream_id == "up-1"
    assert await store.by_upstream(["up-1"]) == {"up-1": "job-0"}

    assert await claim("job-1", "a/3") is not None
    for _ in range(1 if redis else 2):
        assert await store.requeue("job-1", attempt=1)
    job = await store.get("job-1")
    assert job is not None and job.state is State.QUEUED and job.attempt == 1
    assert await store.queued(10) == ["job-1"]

    done = {"id": "up-1", "status": "completed"}
    before = await store.end("job-0", snapshot=done, error="", retention_s=60)
    assert before is not None and before.state is State.SUBMITTED and before.ticket == "job-0.0"
    job = await store.get("job-0")
    assert job is not None and job.state is State.ENDED and job.cred is None
    assert await store.end("job-0", snapshot=None, error="", retention_s=60) is None  # a new call: once


async def test_a_lost_sequence_counter_never_puts_new_jobs_ahead(jobs: tuple[JobStore, Wall]) -> None:
    """The arrival counter is lost (a Redis restart without persistence, an eviction, a lost
    row): a job created afterwards still takes its place after every older one."""
    store, _ = jobs
    old = [(await store.create(new_job(i))).seq for i in range(3)]
    if isinstance(store, RedisJobStore):
        await store._r.delete(store._k.seq)
    else:
        assert isinstance(store, SqliteJobStore)
        store._db.execute("DELETE FROM counters")
    new = await store.create(new_job(3))
    assert new.seq > max(old)
    assert (await store.get("job-3")).seq == new.seq  # type: ignore[union-attr]
