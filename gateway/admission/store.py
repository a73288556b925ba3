"""The Store protocol: the few atomic verbs the admission engine needs, and their answers.

Two implementations keep the same semantics: ``RedisStore`` (one Lua script per verb, Redis's
clock) shares limits across any number of instances; ``MemoryStore`` (the embedded store)
does the same inside one process with an injected clock. The contract suite
(tests/contract/) runs one set of tests against both, and against fakeredis.

Verbs
-----
acquire(request)
    All or nothing, in one atomic step: check every limit in order and either lease a token
    on each (ADMITTED), or hold reservations on the limits passed so far and queue the
    ticket on the first limit that blocks it (BLOCKED, with a wait hint), or refuse because
    ``max_depth`` tickets already wait ahead of it (FULL, nothing kept), or refuse because
    it would start waiting while ``owner_depth`` tickets of its ``owner`` already wait,
    account-wide (SHARE_FULL, nothing kept; a ticket already waiting keeps its place), or
    refuse because the ticket was aborted (ABORTED, nothing written). Idempotent per ticket.
    ADMITTED and BLOCKED say when, in the store's clock, they were decided (``now_ms``: the
    hint counts from it, however late the reply is read); an admission from a queue says how
    far the capacity still free reaches in it (``owed``), so the instance retries its own
    waiters up to there at once.
    A waiting ticket with an owner counts in its owner's share until it is admitted, refused,
    released, or its deadline lapses (its instance died): no counter that could leak.
release(ticket, limits, tombstone=...)
    Remove the ticket's leases, reservations and queue entries on ``limits`` (and its place
    in its owner's share); with
    ``tombstone`` also leave a short-lived marker that makes a late acquire of the ticket
    return ABORTED. Used to abort a waiter (tombstone), to end a concurrency lease, and to
    refund a window lease for a request that provably never left.
renew(ticket, limit, ttl_ms, create=False)
    Push back the end of a concurrency lease (work still running). A plain renewal never
    revives a missing lease. With ``create`` (work the gateway KNOWS is running: a job it
    tracks upstream, a session it relays) a missing lease (lost in a Redis failover, forgotten
    by the embedded store on a restart) is re-created, whatever the capacity: the work runs
    anyway, and counting it is what stops new admissions until the limit is back under its
    capacity (I2 is about what runs upstream). A restoration that puts the limit over its
    capacity is logged and counted (``aai_gateway_leases_restored_over_total``). A lease a
    release removed is never restored, even by a renewal racing the release (the release
    leaves a one-minute "ended" marker). Returns whether the lease is live afterwards.
refresh(limits, tickets)
    Push back the deadlines of waiting tickets and of their reservations. Returns, per
    ticket, the 1-based index in ``limits`` of the queue it waits in, or 0 when it is gone.
subscribe(callback)
    Deliver wake-up messages: a limit name whose capacity may have appeared;
    ``"<limit>\t<ticket>\t<score>"`` when a ticket waiting on that limit inherited a better
    priority (its owner re-orders it, then retries); or RESYNC after the subscription was
    (re)established and messages may have been missed.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from .limits import Limit

# Ticket ordering score: (99 - priority) * SEQ_SPAN + arrival sequence. Below 10^14, so exact
# in Lua's doubles and in its '%.0f' formatting.
SEQ_SPAN = 10**12
MAX_PRIORITY = 99

# At most this many (ticket, score) pairs in a BLOCKED result's ``first``.
FIRST_MAX = 32

# Wake-up message meaning "you may have missed messages: re-check every head".
RESYNC = "*"


class Status(enum.IntEnum):
    ADMITTED = 1
    BLOCKED = 2
    FULL = 3
    ABORTED = 4
    SHARE_FULL = 5  # FULL for its owner: its share of the queue is taken (nothing kept)


def score_of(priority: int, seq: int) -> int:
    priority = min(max(priority, 0), MAX_PRIORITY)
    return (MAX_PRIORITY - priority) * SEQ_SPAN + seq


# Value objects on the hot path are NamedTuples: built several times per request, and a
# tuple is several times cheaper to make than a frozen dataclass.
class AcquireRequest(NamedTuple):
    ticket: str
    limits: tuple[Limit, ...]  # in the engine's total order (limits.ordered)
    priority: int = 0
    seq: int = 0  # 0 on the first acquire; the store assigns one and it is kept for life
    ttl_ms: int = 4000  # how long a waiting ticket and its reservations live without refresh
    max_depth: int = 10_000
    floor: int = 0  # the highest sequence the caller has seen: a new one is always above it
    owner: str = ""  # who the ticket belongs to (keys.owner_id: a key fingerprint, a project)
    owner_depth: int = -1  # refuse (SHARE_FULL) when this many of owner's tickets wait; -1: no share


class LimitState(NamedTuple):
    """One limit as an admitted request saw it: tokens left, and ms until one comes back."""

    remaining: int
    reset_ms: int


class AcquireResult(NamedTuple):
    status: Status
    seq: int
    score: int = 0  # the ticket's effective ordering score
    blocked: int = 0  # 1-based index into the request's limits (BLOCKED / FULL / SHARE_FULL)
    ahead: int = 0  # tickets ahead of this one on the blocking limit (SHARE_FULL: its owner's waiting)
    wait_ms: int = 0  # when it is worth asking again (BLOCKED)
    states: tuple[LimitState, ...] = ()  # per limit, in order (ADMITTED)
    # BLOCKED: the first tickets of the blocking limit's queue, ahead of this one, with their
    # CURRENT scores (an inherited priority included): those the free capacity is owed to
    # (at least the head, at most FIRST_MAX). The store's order is the source of truth: an
    # instance re-sorts its own waiters by it, so it never stops waking at a waiter the store
    # ranks behind one of its own (a lost or early inheritance message cannot strand it).
    first: tuple[tuple[str, int], ...] = ()
    # ADMITTED / BLOCKED: the store's time (ms: Redis TIME, or the embedded store's clock)
    # when it decided; ``wait_ms`` counts from it. A reply read late (a burst, a busy loop)
    # still wakes its waiter at now_ms + wait_ms in store time, not wait_ms after it was
    # read (the engine learns the store's clock from these; 0: not known).
    now_ms: int = 0
    # ADMITTED from a queue: the score of the last waiting ticket that the capacity still
    # free is owed to (the first min(free, queued) of that queue), or 0. Every ticket up to
    # it passes that limit now, so an instance may retry all of its own at once instead of
    # one round trip after another (10,000 waiters: a window's 1,000 turn over in ~50 ms,
    # not ~200 ms).
    owed: int = 0

    @property
    def admitted(self) -> bool:
        return self.status is Status.ADMITTED


WakeCallback = Callable[[str], None]


class Store(Protocol):
    """See the module docstring for what each verb promises."""

    kind: str  # "memory" or "redis": shown by /readyz and the start-up log

    async def acquire(self, request: AcquireRequest) -> AcquireResult: ...

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int: ...

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]: ...

    async def renew(self, ticket: str, limit: Limit, ttl_ms: int, *, create: bool = False) -> bool: ...

    async def subscribe(self, callback: WakeCallback) -> None: ...

    async def usage(self, limit: Limit) -> tuple[int, int]:
        """(tokens out, tickets waiting) on ``limit`` now: for metrics and /readyz."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
