"""One contract, every store: the embedded store, fakeredis and real Redis answer alike.

Windows are short (a few hundred ms) so the real-Redis runs stay quick; on the embedded
store and fakeredis the clock is moved, never slept.
"""

from __future__ import annotations

import asyncio
import uuid

from gateway.admission.limits import (
    RANK_CONCURRENCY,
    RANK_MODEL,
    RANK_WINDOW,
    concurrency_limit,
    window_limit,
)
from gateway.admission.memory import MemoryStore
from gateway.admission.store import SEQ_SPAN, AcquireRequest, Status, score_of
from tests.conftest import StoreEnv, redis_client

W = 0.2  # window seconds
G = 50  # guard ms
REQ = window_limit("requests", 3, W, G, rank=RANK_WINDOW)
MODEL = window_limit("llm:m", 2, W, G, rank=RANK_MODEL)
JOBS = concurrency_limit("async", 2, 30.0, rank=RANK_CONCURRENCY)


def req(ticket: str, *limits, priority: int = 0, seq: int = 0, ttl_ms: int = 4000, max_depth: int = 10_000):
    return AcquireRequest(
        ticket, tuple(limits), priority=priority, seq=seq, ttl_ms=ttl_ms, max_depth=max_depth
    )


def tid() -> str:
    return uuid.uuid4().hex[:12]


async def test_burst_of_n_then_queue(store_env: StoreEnv) -> None:
    store = store_env.store()
    got = [await store.acquire(req(f"a{i}", REQ)) for i in range(4)]
    assert [r.status for r in got] == [Status.ADMITTED] * 3 + [Status.BLOCKED]
    assert [r.states[0].remaining for r in got[:3]] == [2, 1, 0]
    assert got[3].blocked == 1 and got[3].ahead == 0
    # The wait hint points at the first lease's end: window + guard after it was taken.
    assert 0 < got[3].wait_ms <= REQ.lease_ms
    assert [r.seq for r in got] == sorted(r.seq for r in got)
    assert await store.usage(REQ) == (3, 1)


async def test_replies_say_when_they_were_decided_in_store_time(store_env: StoreEnv) -> None:
    """ADMITTED and BLOCKED carry the store's clock at the decision (now_ms): a hint counts
    from it, so a caller that reads the reply late still knows the store-time instant."""
    store = store_env.store()
    got = []
    for i in range(4):
        got.append(await store.acquire(req(f"a{i}", REQ)))
        await store_env.advance(0.01)
    assert [r.status for r in got] == [Status.ADMITTED] * 3 + [Status.BLOCKED]
    assert all(r.now_ms > 0 for r in got)
    assert [r.now_ms for r in got] == sorted(r.now_ms for r in got)
    first_end = got[0].now_ms + REQ.lease_ms  # the first lease's end, in store time
    assert [r.now_ms + r.states[0].reset_ms for r in got[:3]] == [first_end] * 3
    assert got[3].now_ms + got[3].wait_ms == first_end


async def test_an_admission_from_a_queue_says_how_far_the_free_capacity_reaches(store_env: StoreEnv) -> None:
    """ADMITTED ``owed``: the score of the last ticket in the queue it left that the capacity
    still free is owed to (0: none), so its instance may retry all of its own up to it at once."""
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"a{i}", REQ))).admitted
    queued = await store.acquire(req("a3", REQ))
    assert queued.status is Status.BLOCKED and queued.owed == 0  # not an admission
    fresh = await store.acquire(req("fresh", MODEL))
    assert fresh.admitted and fresh.owed == 0  # it waited in no queue
    w = [await store.acquire(req(f"w{i}", REQ)) for i in range(4)]
    assert all(r.status is Status.BLOCKED for r in w)
    await store_env.advance(REQ.lease_ms / 1000 + 0.01)  # all three leases end: 3 free
    a3 = await store.acquire(req("a3", REQ, seq=queued.seq))  # the head of the queue
    assert a3.admitted and a3.states[0].remaining == 2
    assert a3.owed == w[1].score  # the next two (w0, w1) are owed the two left
    w0 = await store.acquire(req("w0", REQ, seq=w[0].seq))
    assert w0.admitted and w0.owed == w[1].score
    w1 = await store.acquire(req("w1", REQ, seq=w[1].seq))
    assert w1.admitted and w1.states[0].remaining == 0 and w1.owed == 0
    await store_env.advance(REQ.lease_ms / 1000 + 0.01)  # 3 free, 2 queued (w2, w3)
    w2 = await store.acquire(req("w2", REQ, seq=w[2].seq))
    assert w2.admitted and w2.owed == w[3].score  # the queue is shorter than the capacity free


async def test_token_returns_exactly_after_window_plus_guard(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"a{i}", REQ))).admitted
    if store_env.moved:
        await store_env.advance(REQ.lease_ms / 1000 - 0.002)
        assert (await store.acquire(req("b", REQ))).status is Status.BLOCKED
        await store_env.advance(0.003)
    else:
        await store_env.advance(REQ.lease_ms / 1000 + 0.02)
    r = await store.acquire(req("b", REQ))
    assert r.admitted
    assert r.states[0].remaining == 2


async def test_all_or_nothing(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(2):
        assert (await store.acquire(req(f"m{i}", MODEL, REQ))).admitted
    blocked = await store.acquire(req("x", MODEL, REQ))
    assert blocked.status is Status.BLOCKED and blocked.blocked == 1
    # Blocked on the model, it holds nothing on the account window.
    assert await store.usage(REQ) == (2, 0)
    assert (await store.acquire(req("y", REQ))).admitted


async def test_waiter_blocked_late_holds_reservations_on_earlier_limits(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"r{i}", REQ))).admitted
    r = await store.acquire(req("t", MODEL, REQ))
    assert r.status is Status.BLOCKED and r.blocked == 2
    assert await store.usage(MODEL) == (1, 0)  # its reservation
    # A newcomer for the model alone still finds one model token.
    assert (await store.acquire(req("v", MODEL))).admitted
    # ...but not two.
    assert (await store.acquire(req("w", MODEL))).status is Status.BLOCKED


async def test_order_newcomer_never_jumps_a_waiter(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"a{i}", REQ))).admitted
    old = await store.acquire(req("old", REQ))
    assert old.status is Status.BLOCKED
    await store_env.advance(REQ.lease_ms / 1000 + 0.02)
    # Three tokens came back. A newcomer finds 1 ahead, 3 free: admitted; order holds as
    # long as fewer than `free` are ahead of it.
    new = await store.acquire(req("new", REQ))
    assert new.admitted
    again = await store.acquire(req("old", REQ, seq=old.seq))
    assert again.admitted and again.seq == old.seq


async def test_order_when_capacity_is_short(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"a{i}", REQ))).admitted
    w1 = await store.acquire(req("w1", REQ))
    w2 = await store.acquire(req("w2", REQ))
    w3 = await store.acquire(req("w3", REQ))
    assert [w.ahead for w in (w1, w2, w3)] == [0, 1, 2]
    late = await store.acquire(req("late", REQ))
    assert late.status is Status.BLOCKED and late.ahead == 3


async def test_priority_goes_first_and_backlog_never_refuses_it(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"a{i}", REQ))).admitted
    for i in range(3):
        r = await store.acquire(req(f"low{i}", REQ, priority=0, max_depth=3))
        assert r.status is Status.BLOCKED
    # Depth 3 reached for priority 0: a fourth low one is refused at once, keeping nothing.
    full = await store.acquire(req("low3", REQ, priority=0, max_depth=3))
    assert full.status is Status.FULL and full.ahead == 3
    assert await store.usage(REQ) == (3, 3)
    high = await store.acquire(req("high", REQ, priority=50, max_depth=3))
    assert high.status is Status.BLOCKED and high.ahead == 0
    assert high.score == score_of(50, high.seq) < score_of(0, 1)


async def test_edge_scores(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"a{i}", REQ))).admitted
    big = SEQ_SPAN - 1
    p0 = await store.acquire(req("p0", REQ, priority=0, seq=big))
    p99 = await store.acquire(req("p99", REQ, priority=99, seq=big - 1))
    clamp = await store.acquire(req("clamped", REQ, priority=500, seq=big - 2))
    assert p0.score == 99 * SEQ_SPAN + big
    assert p99.score == big - 1 and clamp.score == big - 2
    assert (p0.ahead, p99.ahead, clamp.ahead) == (0, 0, 0)
    again = await store.acquire(req("p0", REQ, priority=0, seq=big))
    assert again.ahead == 2
    # The arrival counter was pushed past every sequence seen.
    fresh = await store.acquire(req("fresh", REQ))
    assert fresh.seq > big


async def test_abort_removes_everything_and_tombstone_stops_a_late_acquire(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"r{i}", REQ))).admitted
    t = await store.acquire(req("t", MODEL, REQ))
    assert t.status is Status.BLOCKED
    removed = await store.release("t", [MODEL, REQ], tombstone=True)
    assert removed == 2  # its reservation on the model, its place in the window queue
    assert await store.usage(MODEL) == (0, 0)
    assert await store.usage(REQ) == (3, 0)
    late = await store.acquire(req("t", MODEL, REQ, seq=t.seq))
    assert late.status is Status.ABORTED
    assert await store.usage(MODEL) == (0, 0)


async def test_abort_after_admission_gives_leases_back(store_env: StoreEnv) -> None:
    store = store_env.store()
    r = await store.acquire(req("t", MODEL, REQ))
    assert r.admitted
    assert await store.release("t", [MODEL, REQ], tombstone=True) == 2
    assert await store.usage(REQ) == (0, 0)


async def test_acquire_is_idempotent(store_env: StoreEnv) -> None:
    store = store_env.store()
    first = await store.acquire(req("t", MODEL, REQ))
    second = await store.acquire(req("t", MODEL, REQ, seq=first.seq))
    assert first.admitted and second.admitted
    assert await store.usage(REQ) == (1, 0)
    assert await store.usage(MODEL) == (1, 0)


async def test_a_rerun_acquire_restarts_a_held_window_lease_from_now(store_env: StoreEnv) -> None:
    """An acquire whose reply was lost (a Redis stall, a timeout) may have admitted the ticket;
    its caller forwards only after a later acquire says so. That lease must count from the
    later acquire, or the guard no longer covers admission-to-arrival (ADMISSION.md I1)."""
    store = store_env.store()
    first = await store.acquire(req("t", REQ))
    await store_env.advance(0.1)  # less than one lease life (W + guard: 250 ms)
    again = await store.acquire(req("t", REQ, seq=first.seq))
    assert first.admitted and again.admitted
    assert await store.usage(REQ) == (1, 0)  # still one lease, not two
    first_end = first.now_ms + first.states[0].reset_ms
    again_end = again.now_ms + again.states[0].reset_ms
    assert again_end - first_end >= 80  # it now ends one lease life after the re-run
    assert again_end == again.now_ms + REQ.lease_ms


async def test_concurrency_lease_released_at_once(store_env: StoreEnv) -> None:
    store = store_env.store()
    assert (await store.acquire(req("j1", JOBS))).admitted
    assert (await store.acquire(req("j2", JOBS))).admitted
    assert (await store.acquire(req("j3", JOBS))).status is Status.BLOCKED
    assert await store.release("j1", [JOBS]) == 1
    assert await store.release("j1", [JOBS]) == 0  # a second release changes nothing
    assert (await store.acquire(req("j3", JOBS))).admitted


async def test_unrefreshed_ticket_is_purged_and_refresh_keeps_one_alive(store_env: StoreEnv) -> None:
    store = store_env.store()
    for i in range(3):
        assert (await store.acquire(req(f"r{i}", REQ))).admitted
    ttl = 300
    kept = await store.acquire(req("kept", MODEL, REQ, ttl_ms=ttl))
    lost = await store.acquire(req("lost", MODEL, REQ, ttl_ms=ttl))
    assert kept.status is lost.status is Status.BLOCKED
    assert await store.usage(MODEL) == (2, 0)
    await store_env.advance(0.2)
    assert await store.refresh([MODEL, REQ], ["kept"], ttl) == [2]
    await store_env.advance(0.15)
    # "lost" lapsed: its reservation and queue place are gone; "kept" still holds both.
    assert await store.refresh([MODEL, REQ], ["kept", "lost"], ttl) == [2, 0]
    assert await store.usage(MODEL) == (1, 0)
    assert (await store.usage(REQ))[1] == 1


async def test_wake_published_on_release(store_env: StoreEnv) -> None:
    a, b = store_env.store(), store_env.store()
    heard: list[str] = []
    await b.subscribe(heard.append)
    await asyncio.sleep(0.05)
    assert (await a.acquire(req("j1", JOBS))).admitted
    await a.release("j1", [JOBS])
    for _ in range(100):
        if "async" in heard:
            break
        await asyncio.sleep(0.01)
    assert "async" in heard


async def test_instances_share_one_limit(store_env: StoreEnv) -> None:
    # A 10 s window: five round trips on a loaded machine (a Cluster, in CI) can outlast REQ's
    # 0.25 s lease, and a token come back before the fifth.
    window = window_limit("requests", 3, 10.0, G, rank=RANK_WINDOW)
    a, b = store_env.store(), store_env.store()
    results = [await (a if i % 2 else b).acquire(req(f"i{i}", window)) for i in range(5)]
    assert sum(r.admitted for r in results) == 3
    assert [r.ahead for r in results if not r.admitted] == [0, 1]


async def test_unused_buckets_expire(store_env: StoreEnv) -> None:
    store = store_env.store()
    model = window_limit("llm:rare-model", 5, W, G, rank=RANK_MODEL)
    assert (await store.acquire(req("t", model))).admitted
    if store_env.kind == "memory":
        await store_env.advance(15.0)
        assert (await store.acquire(req("u", REQ))).admitted  # any later call sweeps
        assert "llm:rare-model" not in store.limit_names()  # type: ignore[attr-defined]
        return
    client = store._client  # type: ignore[attr-defined]
    key = store._keys.leases("llm:rare-model")  # type: ignore[attr-defined]
    ttl = await client.pttl(key)
    assert 0 < ttl <= max(model.lease_ms, 4000) + 1000


async def test_wait_hint_is_the_earlier_of_lease_end_and_a_deadline_ahead(store_env: StoreEnv) -> None:
    """A waiter behind a ticket that may die is told to look again at that ticket's deadline."""
    store = store_env.store()
    window = window_limit("requests", 1, 10.0, 0, rank=RANK_WINDOW)
    assert (await store.acquire(req("a", window))).admitted
    mortal = await store.acquire(req("mortal", window, ttl_ms=300))
    assert mortal.status is Status.BLOCKED and mortal.wait_ms == 300  # never later than its own ttl
    behind = await store.acquire(req("behind", window, ttl_ms=4000))
    assert behind.status is Status.BLOCKED and behind.ahead == 1
    assert 200 < behind.wait_ms <= 300  # not 4 s, not 10 s: when "mortal" would be purged


async def test_a_short_lived_ticket_never_cuts_short_a_queue_key(store_env: StoreEnv) -> None:
    """Found by the property test: a key's expiry set for a short-lived ticket must not drop
    a longer-lived ticket that waits in the same queue."""
    if not store_env.moved:
        return  # needs 2.5 s of moved time
    store = store_env.store()
    model = window_limit("llm:m", 1, 1.0, 0, rank=RANK_MODEL)
    assert (await store.acquire(req("a", model))).admitted
    long_lived = await store.acquire(req("long", model, ttl_ms=3000))
    assert (await store.acquire(req("short", model, ttl_ms=200))).status is Status.BLOCKED
    await store_env.advance(2.5)
    late = await store.acquire(req("late", model))
    assert late.status is Status.BLOCKED and late.ahead == 1  # "long" still waits ahead of it
    assert (await store.acquire(req("long", model, seq=long_lived.seq, ttl_ms=3000))).admitted


async def test_renew_pushes_back_a_live_lease_and_never_revives_a_released_one(store_env: StoreEnv) -> None:
    store = store_env.store()
    jobs = concurrency_limit("async", 1, 0.3, rank=RANK_CONCURRENCY)
    assert (await store.acquire(req("job", jobs))).admitted
    await store_env.advance(0.2)
    assert await store.renew("job", jobs, 300)  # now ends 0.3 s from here
    await store_env.advance(0.2)
    assert await store.usage(jobs) == (1, 0)  # past its first end, still live
    assert await store.release("job", [jobs]) == 1
    assert not await store.renew("job", jobs, 300)  # released: a late renewal does nothing
    assert not await store.renew("job", jobs, 300, create=True)  # nor one that restores (ended marker)
    assert await store.usage(jobs) == (0, 0)
    assert await store.renew("other", jobs, 300, create=True)  # never released: restored
    assert await store.usage(jobs) == (1, 0)


async def _lose(store, ticket: str, limit) -> None:  # type: ignore[no-untyped-def]
    """What a Redis failover does to a lease: it is simply gone (no release, no marker)."""
    if isinstance(store, MemoryStore):
        store._z(store._leases, limit.name).remove(ticket)
    else:
        await store._client.zrem(store._keys.leases(limit.name), ticket)


async def test_a_lost_lease_of_running_work_is_restored_and_counted_when_over(store_env: StoreEnv) -> None:
    """A renewal with ``create`` (work known to be running) re-creates a lease a failover
    lost. If its slot was taken meanwhile, it is restored anyway (the work runs: counting it
    is what stops further admissions) and counted; a plain renewal restores nothing."""
    from gateway.admission import health

    store = store_env.store()
    jobs = concurrency_limit("async", 2, 5.0, rank=RANK_CONCURRENCY)
    over = health.RESTORED_OVER.get(jobs.metric_label, 0)
    assert (await store.acquire(req("job", jobs))).admitted
    await _lose(store, "job", jobs)
    assert not await store.renew("job", jobs, 5000)  # a plain renewal: gone stays gone
    assert await store.renew("job", jobs, 5000, create=True)  # restored, within the capacity
    assert await store.usage(jobs) == (1, 0)
    assert health.RESTORED_OVER.get(jobs.metric_label, 0) == over

    assert (await store.acquire(req("x", jobs))).admitted  # 2 of 2
    await _lose(store, "job", jobs)
    assert (await store.acquire(req("y", jobs))).admitted  # its slot taken meanwhile
    assert await store.renew("job", jobs, 5000, create=True)  # restored: the job runs anyway...
    assert await store.usage(jobs) == (3, 0)
    assert health.RESTORED_OVER[jobs.metric_label] == over + 1  # ...and counted
    assert (await store.acquire(req("z", jobs))).status is Status.BLOCKED  # nothing admitted...
    await store.release("x", [jobs])
    assert (await store.acquire(req("z", jobs))).status is Status.BLOCKED  # ...until under C
    await store.release("y", [jobs])
    assert (await store.acquire(req("z", jobs))).admitted
    for t in ("z", "job"):
        await store.release(t, [jobs])
    assert await store.usage(jobs) == (0, 0)


# -- an owner's share of the queue (queue.max_depth_per_key) -------------------------------
# A long window, so nothing comes back by itself while a test runs (real Redis included).
LONG = window_limit("requests", 1, 10.0, 0, rank=RANK_WINDOW)


def owned(
    ticket: str, owner: str, depth: int = 2, *limits, seq: int = 0, ttl_ms: int = 4000
) -> AcquireRequest:
    return AcquireRequest(
        ticket, tuple(limits or (LONG,)), seq=seq, ttl_ms=ttl_ms, owner=owner, owner_depth=depth
    )


async def _fill_long(store) -> None:  # type: ignore[no-untyped-def]
    assert (await store.acquire(req("fill", LONG))).admitted


async def test_owner_share_refuses_a_new_waiter_at_once_keeping_nothing(store_env: StoreEnv) -> None:
    store = store_env.store()
    await _fill_long(store)
    a1, a2 = await store.acquire(owned("a1", "A")), await store.acquire(owned("a2", "A"))
    assert a1.status is a2.status is Status.BLOCKED
    a3 = await store.acquire(owned("a3", "A"))
    assert a3.status is Status.SHARE_FULL and a3.ahead == 2 and a3.blocked == 1
    assert await store.usage(LONG) == (1, 2)  # a3 kept nothing: no lease, no queue place
    # Other owners are unaffected: B queues behind A's two, in arrival order.
    b1 = await store.acquire(owned("b1", "B"))
    assert b1.status is Status.BLOCKED and b1.ahead == 2
    # Requests without an owner (a durable job) are not subject to any share.
    assert (await store.acquire(req("job", LONG))).status is Status.BLOCKED
    # A ticket already waiting is never refused by its share when it asks again.
    again = await store.acquire(owned("a2", "A", seq=a2.seq))
    assert again.status is Status.BLOCKED and again.ahead == 1
    # Refused on every instance alike: the share is account-wide.
    other = store_env.store()
    assert (await other.acquire(owned("a4", "A"))).status is Status.SHARE_FULL


async def test_owner_share_does_not_refuse_what_does_not_wait(store_env: StoreEnv) -> None:
    store = store_env.store()
    big = window_limit("llm:big", 5, 10.0, 0, rank=RANK_MODEL)
    for i in range(3):  # depth 0: no request of A may wait; admissions still go through
        assert (await store.acquire(owned(f"a{i}", "A", 0, big))).admitted
    for i in range(2):
        assert (await store.acquire(owned(f"w{i}", "A", 5, big))).admitted
    r = await store.acquire(owned("late", "A", 0, big))
    assert r.status is Status.SHARE_FULL and r.ahead == 0
    assert await store.usage(big) == (5, 0)


async def test_owner_share_frees_when_a_waiter_is_admitted(store_env: StoreEnv) -> None:
    store = store_env.store()
    jobs = concurrency_limit("async", 1, 30.0, rank=RANK_CONCURRENCY)
    assert (await store.acquire(req("running", jobs))).admitted
    a1 = await store.acquire(owned("a1", "A", 2, jobs))
    a2 = await store.acquire(owned("a2", "A", 2, jobs))
    assert (await store.acquire(owned("a3", "A", 2, jobs))).status is Status.SHARE_FULL
    assert await store.release("running", [jobs]) == 1
    assert (await store.acquire(owned("a1", "A", 2, jobs, seq=a1.seq))).admitted
    # a1 no longer waits: A has one waiter (a2), so one more may wait.
    assert (await store.acquire(owned("a3", "A", 2, jobs))).status is Status.BLOCKED
    assert (await store.acquire(owned("a4", "A", 2, jobs))).status is Status.SHARE_FULL
    assert a2.status is Status.BLOCKED


async def test_owner_share_frees_when_a_waiter_is_aborted(store_env: StoreEnv) -> None:
    store = store_env.store()
    await _fill_long(store)
    for t in ("a1", "a2"):
        assert (await store.acquire(owned(t, "A"))).status is Status.BLOCKED
    assert (await store.acquire(owned("a3", "A"))).status is Status.SHARE_FULL
    assert await store.release("a1", [LONG], tombstone=True) == 1
    assert (await store.acquire(owned("a3", "A"))).status is Status.BLOCKED
    assert (await store.acquire(owned("a4", "A"))).status is Status.SHARE_FULL


async def test_owner_share_lapses_with_a_dead_instances_tickets(store_env: StoreEnv) -> None:
    """A dead instance neither refreshes nor aborts: its tickets, and their places in their
    owner's share, lapse at their deadline; a refreshed ticket keeps its place."""
    store = store_env.store()
    await _fill_long(store)
    ttl = 300
    assert (await store.acquire(owned("kept", "A", ttl_ms=ttl))).status is Status.BLOCKED
    assert (await store.acquire(owned("dead", "A", ttl_ms=ttl))).status is Status.BLOCKED
    assert (await store.acquire(owned("x", "A"))).status is Status.SHARE_FULL
    await store_env.advance(0.2)
    assert await store.refresh([LONG], ["kept"], ttl) == [1]
    await store_env.advance(0.15)  # "dead" lapsed; "kept" was refreshed
    assert (await store.acquire(owned("y", "A"))).status is Status.BLOCKED
    assert (await store.acquire(owned("z", "A"))).status is Status.SHARE_FULL  # kept + y
    assert await store.refresh([LONG], ["kept", "dead"], ttl) == [1, 0]


async def test_owner_share_entries_leave_no_trace(store_env: StoreEnv) -> None:
    """Admitted, refused and aborted waiters leave nothing in the share keys."""
    store = store_env.store()
    jobs = concurrency_limit("async", 1, 30.0, rank=RANK_CONCURRENCY)
    assert (await store.acquire(req("running", jobs))).admitted
    w1 = await store.acquire(owned("w1", "A", 1, jobs))
    assert (await store.acquire(owned("w2", "A", 1, jobs))).status is Status.SHARE_FULL
    w3 = await store.acquire(owned("w3", "B", 1, jobs))
    await store.release("running", [jobs])
    assert (await store.acquire(owned("w1", "A", 1, jobs, seq=w1.seq))).admitted
    await store.release("w3", [jobs], tombstone=True)
    assert w3.status is Status.BLOCKED
    if store_env.kind == "memory":
        assert store.share_size() == 0  # type: ignore[attr-defined]
        return
    client, k = store._client, store._keys  # type: ignore[attr-defined]
    if store_env.kind == "redis":
        client = await redis_client()
    try:
        for key in (k.share_dead, k.share_owner, k.share_lex):
            assert not await client.exists(key), key
    finally:
        if store_env.kind == "redis":
            await client.aclose()


async def test_a_blocked_reply_names_the_first_tickets_with_their_current_scores(store_env: StoreEnv) -> None:
    """The store's order is the truth an instance follows: a BLOCKED reply carries the first
    tickets ahead on the blocking limit (those the free capacity is owed to, at least the
    head) with their CURRENT scores, an inherited priority included."""
    store = store_env.store()
    one = window_limit("requests", 1, W, G, rank=RANK_WINDOW)
    m1 = window_limit("llm:m", 1, W, G, rank=RANK_MODEL)
    t, h, v = tid(), tid(), tid()
    assert (await store.acquire(req(tid(), one))).admitted
    low = await store.acquire(req(t, m1, one, priority=0))  # passes m1, waits on the window
    assert low.status is Status.BLOCKED and low.blocked == 2 and low.first == ()
    high = await store.acquire(req(h, m1, one, priority=99))  # blocked on m1 by t: lifts t
    assert high.status is Status.BLOCKED and high.blocked == 1 and high.first == ()  # none wait on m1
    mid = await store.acquire(req(v, one, priority=50))
    lifted = score_of(99, low.seq)
    assert mid.status is Status.BLOCKED and mid.ahead == 1 and mid.first == ((t, lifted),)
