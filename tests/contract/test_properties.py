"""Property tests: random sequences of verbs give identical answers on every store, and the
invariants hold on every sequence.

- The embedded store and fakeredis run the same sequence on the same moved clock and must
  agree exactly (hints and reset times included).
- Real Redis runs sequences without time travel (windows long enough that nothing expires
  mid-sequence) and must agree on every decision: status, blocking limit, tickets ahead,
  order scores, tokens left.
- On every sequence: window lease starts never exceed N in any window + guard (I1),
  concurrency leases never exceed C (I2), an admission holds every limit of its class (I3).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.admission.keys import Keys
from gateway.admission.limits import (
    RANK_CONCURRENCY,
    RANK_MODEL,
    RANK_WINDOW,
    Kind,
    Limit,
    concurrency_limit,
    window_limit,
)
from gateway.admission.memory import MemoryStore
from gateway.admission.redis_store import RedisStore, make_client
from gateway.admission.store import SEQ_SPAN, AcquireRequest, AcquireResult, Status, Store
from gateway.clock import ManualClock
from tests.conftest import REDIS_URL, frozen_manual_clock


def limits(window_s: float) -> tuple[Limit, ...]:
    return (
        window_limit("requests", 3, window_s, 0, rank=RANK_WINDOW),
        window_limit("llm:a", 1, window_s, 0, rank=RANK_MODEL),
        window_limit("llm:b", 2, window_s, 0, rank=RANK_MODEL),
        concurrency_limit("async", 2, 3600, rank=RANK_CONCURRENCY),
    )


def classes(window_s: float) -> list[tuple[Limit, ...]]:
    req, a, b, jobs = limits(window_s)
    return [(req,), (a, req), (b, req), (jobs, req)]


TICKETS = [f"t{i}" for i in range(6)]

acquire_op = st.tuples(
    st.just("acq"),
    st.integers(0, 5),
    st.integers(0, 3),
    st.sampled_from([0, 0, 50, 99]),
    st.sampled_from([200, 3000]),
    st.sampled_from([-1, -1, 0, 1, 2]),  # its owner's share of the queue (-1: no owner)
)
release_op = st.tuples(st.just("rel"), st.integers(0, 5), st.booleans())
refresh_op = st.tuples(st.just("ref"), st.lists(st.integers(0, 5), min_size=1, max_size=3))
advance_op = st.tuples(st.just("adv"), st.sampled_from([1, 50, 150, 199, 300, 999, 1000, 1001, 2500]))


@dataclass
class Outcome:
    results: list[Any]


def normalize(result: AcquireResult, base: int, *, timing: bool) -> tuple[Any, ...]:
    """Comparable form: sequences relative to the run's first, times only when asked."""
    seq = result.seq - base if result.seq else 0
    score = result.score - base if result.score else 0
    states = tuple((s.remaining, s.reset_ms if timing else None) for s in result.states)
    owed = result.owed - base if result.owed else 0
    return (
        result.status,
        seq,
        score,
        owed,
        result.blocked,
        result.ahead,
        result.wait_ms if timing else None,
        states,
    )


async def run(store: Store, clock: ManualClock | None, ops: list[Any], window_s: float) -> Outcome:
    cls = classes(window_s)
    seqs: dict[str, int] = {}
    klass: dict[str, int] = {}
    depths: dict[str, int] = {}
    admitted: dict[str, float] = {}  # ticket -> time admitted (I1/I2 bookkeeping)
    starts: dict[str, list[tuple[float, str]]] = {}
    base: int | None = None
    out: list[Any] = []
    for op in ops:
        kind = op[0]
        if kind == "acq":
            _, t, c, prio, ttl_ms, depth = op
            ticket = TICKETS[t]
            c = klass.setdefault(ticket, c)  # a ticket keeps its class for life
            depth = depths.setdefault(ticket, depth)  # and its owner and share
            request = AcquireRequest(
                ticket,
                cls[c],
                priority=prio,
                seq=seqs.get(ticket, 0),
                ttl_ms=ttl_ms,
                owner="AB"[t % 2] if depth >= 0 else "",
                owner_depth=depth,
            )
            result = await store.acquire(request)
            if result.seq and ticket not in seqs:
                seqs[ticket] = result.seq
                base = result.seq - 1 if base is None else base
            out.append(normalize(result, base or 0, timing=clock is not None))
            if result.status is Status.ADMITTED:
                assert len(result.states) == len(cls[c])  # I3: every limit of its class
                if ticket not in admitted:
                    now = clock.now() if clock else 0.0
                    admitted[ticket] = now
                    for limit in cls[c]:
                        starts.setdefault(limit.name, []).append((now, ticket))
        elif kind == "rel":
            _, t, tomb = op
            ticket = TICKETS[t]
            lims = cls[klass.get(ticket, 0)]
            out.append(("rel", await store.release(ticket, lims, tombstone=tomb)))
            if ticket in admitted:
                del admitted[ticket]
                for limit in lims:  # a refund: its leases no longer count
                    starts[limit.name] = [(s, x) for s, x in starts.get(limit.name, []) if x != ticket]
        elif kind == "ref":
            tickets = [TICKETS[t] for t in op[1]]
            out.append(("ref", tuple(await store.refresh(cls[3], tickets, 2000))))
        elif kind == "adv" and clock is not None:
            await clock.advance(op[1] / 1000, turns=1)
        check_invariants(starts, admitted, window_s)
    return Outcome(out)


def check_invariants(
    starts: dict[str, list[tuple[float, str]]], admitted: dict[str, float], window_s: float
) -> None:
    for limit in limits(window_s):
        times = sorted(s for s, _ in starts.get(limit.name, []))
        if limit.kind is Kind.WINDOW:
            span = limit.lease_ms / 1000
            for i, t in enumerate(times):
                inside = [x for x in times[i:] if x < t + span - 1e-9]
                assert len(inside) <= limit.capacity, (limit.name, times)  # I1
        else:
            assert len(times) <= limit.capacity  # I2 (no job ends in these runs but by release)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(acquire_op, acquire_op, release_op, refresh_op, advance_op), max_size=40))
def test_embedded_store_and_fakeredis_agree_exactly(ops: list[Any]) -> None:
    async def both() -> tuple[Outcome, Outcome]:
        clock = ManualClock()
        memory = await run(MemoryStore(clock), clock, ops, 1.0)
        with frozen_manual_clock() as fclock:
            client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
            try:
                fake = await run(RedisStore(client, Keys(prefix="p"), shebang=False), fclock, ops, 1.0)
            finally:
                await client.aclose()
        return memory, fake

    memory, fake = asyncio.run(both())
    assert memory.results == fake.results


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(acquire_op, acquire_op, release_op, refresh_op), max_size=30))
def test_real_redis_decides_like_the_embedded_store(ops: list[Any]) -> None:
    async def both() -> tuple[Outcome, Outcome]:
        clock = ManualClock()
        memory = await run(MemoryStore(clock), clock=None, ops=ops, window_s=60.0)
        client = make_client(REDIS_URL, timeout_ms=2000)
        keys = Keys(prefix="prop" + uuid.uuid4().hex[:8])
        try:
            real = await run(RedisStore(client, keys), None, ops, 60.0)
        finally:
            async for key in client.scan_iter(match=f"{keys.prefix}:*"):
                await client.delete(key)
            await client.aclose()
        return memory, real

    memory, real = asyncio.run(both())
    assert memory.results == real.results


def test_scores_stay_exact_at_the_edges() -> None:
    """Priority 0 with the largest sequence is the largest score, and stays exact in Lua."""
    assert (99 * SEQ_SPAN + SEQ_SPAN - 1) < 10**14 < 2**53


# -- owners' shares of the queue, under contention ------------------------------------------
SHARE_TICKETS = [f"s{i}" for i in range(12)]
SHARE_DEPTH = 2
share_ops = st.lists(
    st.one_of(
        st.tuples(st.just("acq"), st.integers(0, 11), st.sampled_from([200, 3000])),
        st.tuples(st.just("acq"), st.integers(0, 11), st.sampled_from([200, 3000])),
        st.tuples(st.just("acq"), st.integers(0, 11), st.sampled_from([200, 3000])),
        st.tuples(st.just("rel"), st.integers(0, 11), st.booleans()),
        st.tuples(st.just("ref"), st.lists(st.integers(0, 11), min_size=1, max_size=4)),
        st.tuples(st.just("adv"), st.sampled_from([1, 150, 199, 201, 1000, 3001])),
    ),
    min_size=8,
    max_size=50,
)


async def run_shares(store: Store, clock: ManualClock, ops: list[Any]) -> list[Any]:
    """Owners A and B (ticket i belongs to "AB"[i % 2]) share a queue behind one slow token;
    checks, as it goes, that no owner ever has more than SHARE_DEPTH tickets waiting."""
    slow = (concurrency_limit("async", 1, 3600, rank=RANK_CONCURRENCY),)
    seqs: dict[str, int] = {}
    waiting: dict[str, int] = {}  # ticket -> its deadline (ms of the clock), as last told
    base: int | None = None
    out: list[Any] = []
    for op in ops:
        now_ms = clock.now_ms()  # as the stores read it (whole ms)
        for t in [t for t, d in waiting.items() if d <= now_ms]:
            del waiting[t]  # lapsed, as the store will find
        if op[0] == "acq":
            _, i, ttl_ms = op
            ticket = SHARE_TICKETS[i]
            owner = "AB"[i % 2]
            request = AcquireRequest(
                ticket, slow, seq=seqs.get(ticket, 0), ttl_ms=ttl_ms, owner=owner, owner_depth=SHARE_DEPTH
            )
            result = await store.acquire(request)
            if result.seq and ticket not in seqs:
                seqs[ticket] = result.seq
                base = result.seq - 1 if base is None else base
            out.append(normalize(result, base or 0, timing=True))
            if result.status is Status.BLOCKED:
                waiting[ticket] = now_ms + ttl_ms
            else:
                waiting.pop(ticket, None)
            mine = [t for t in waiting if "AB"[int(t[1:]) % 2] == owner]
            assert len(mine) <= SHARE_DEPTH, (owner, mine)
            if result.status is Status.SHARE_FULL:
                assert result.ahead == len(mine) == SHARE_DEPTH
        elif op[0] == "rel":
            ticket = SHARE_TICKETS[op[1]]
            out.append(("rel", await store.release(ticket, slow, tombstone=op[2])))
            waiting.pop(ticket, None)
        elif op[0] == "ref":
            tickets = [SHARE_TICKETS[i] for i in op[1]]
            where = await store.refresh(slow, tickets, 3000)
            out.append(("ref", tuple(where)))
            for ticket, w in zip(tickets, where, strict=True):
                if w:
                    waiting[ticket] = now_ms + 3000
                else:
                    waiting.pop(ticket, None)
        else:
            await clock.advance(op[1] / 1000, turns=1)
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(share_ops)
def test_owner_shares_agree_on_every_store_and_hold(ops: list[Any]) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        clock = ManualClock()
        memory = await run_shares(MemoryStore(clock), clock, ops)
        with frozen_manual_clock() as fclock:
            client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
            try:
                fake = await run_shares(RedisStore(client, Keys(prefix="p"), shebang=False), fclock, ops)
            finally:
                await client.aclose()
        return memory, fake

    memory, fake = asyncio.run(both())
    assert memory == fake
