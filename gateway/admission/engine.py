"""The admission engine: every limit on every path goes through ``AdmissionEngine.admit``.

A request asks for a set of limits. The store decides, atomically and in Redis time, whether
it gets a lease on every one of them (admitted) or waits, in one global order per limit
(priority, then arrival), on the first limit that blocks it. This module is the entry point
and the asking; waking.py decides WHEN to ask again, so waiters wake promptly and cheaply.

A request that is refused, still waiting, or abandoned holds nothing: its ticket is aborted
(reservations, queue place and any lease removed; a tombstone stops a late acquire).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..clock import Clock
from ..errors import GatewayError, QueueFull, RateLimited, StoreUnavailable, WaitTimeout
from .health import stop_tasks, supervise
from .keys import owner_id
from .limits import Limit, ordered
from .store import AcquireRequest, AcquireResult, LimitState, Status, Store
from .waking import EngineObserver, Waiter, Waking

log = logging.getLogger(__name__)

FORCED = 1 << 40  # the capacity a shadow limit is taken with once decided: never blocks
MAX_OWED = 100_000  # owed releases kept per instance; beyond, the oldest lapse by their TTLs


class Grant(NamedTuple):
    """An admitted request: it holds a lease on each of ``limits`` under ``ticket``."""

    ticket: str
    limits: tuple[Limit, ...]
    states: tuple[LimitState, ...]
    waited_s: float


class AdmissionEngine(Waking):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        ticket_ttl_ms: int = 4000,
        recheck_s: float = 1.0,
        refresh_batch: int = 200,
        observer: EngineObserver | None = None,
        instance: str | None = None,
    ) -> None:
        super().__init__(
            store,
            clock,
            ticket_ttl_ms=ticket_ttl_ms,
            recheck_s=recheck_s,
            refresh_batch=refresh_batch,
            observer=observer,
        )
        self.instance = instance or os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._max_seq = 0  # highest arrival sequence seen (see AcquireRequest.floor)
        self._maintenance: asyncio.Task[None] | None = None
        # Releases the store could not take (ticket -> limits, tombstone), sent again later.
        self._owed: dict[str, tuple[tuple[Limit, ...], bool]] = {}

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.subscribe(self._on_wake)
        # Supervised: restarted (logged, counted, liveness exported) if it ever ends.
        self._maintenance = supervise("engine-housekeeping", self._maintain)

    async def close(self) -> None:
        """Stop waking; every request still waiting here is refused (503) and aborted."""
        for q in list(self._queues.values()):
            for w in list(q):
                if w.future is not None and not w.future.done():
                    w.future.set_exception(StoreUnavailable("the gateway is shutting down"))
        tasks = [
            t for t in (self._maintenance, *self._timers.values(), *self._drains.values(), *self._tasks) if t
        ]
        await stop_tasks(*tasks)
        self._maintenance = None

    # -- the one entry point ---------------------------------------------------------------
    async def admit(
        self,
        limits: Sequence[Limit],
        *,
        max_wait_s: float,
        max_depth: int = 10_000,
        priority: int = 0,
        group: str = "",
        ticket: str | None = None,
        seq: int = 0,
        durable: bool = False,
        owner: str = "",
        max_owner_depth: int | None = None,
    ) -> Grant:
        """Wait until the request holds a lease on every limit, in order with other waiters.

        Raises ``WaitTimeout`` after ``max_wait_s``, ``QueueFull`` when ``max_depth`` waiters
        are ahead, ``StoreUnavailable`` when the store cannot be reached. On any of these, and
        on cancellation (the client left), nothing is held afterwards.

        ``owner`` (a key fingerprint; later a project) with ``max_owner_depth`` is its share of
        the queue: a request that would start waiting while ``max_owner_depth`` of the owner's
        requests already wait, account-wide (admitted ones do not count), is refused at once
        with ``QueueFull``, nothing kept or charged; other owners are unaffected. An admission
        that does not wait costs no extra store call for it.

        A ``durable`` ticket (a queued transcript job: ``ticket`` and its ``seq`` come from the
        job record) is the exception: it is not aborted when this call gives up, because
        the job still waits; dispatchers on any instance may wait on the same ticket (acquire
        is idempotent per ticket), and its place in the queue lapses only if none refreshes it.
        A durable admission that gives up (``WaitTimeout``) is not a refusal: the job still
        waits, so it is not counted in the refusal metric.
        """
        ordered_limits = ordered(limits)
        if any(limit.shadow for limit in ordered_limits):
            return await self._shadowed(
                ordered_limits, max_wait_s=max_wait_s, max_depth=max_depth, priority=priority,
                group=group, ticket=ticket, seq=seq, durable=durable, owner=owner,
                max_owner_depth=max_owner_depth,
            )  # fmt: skip
        start = self._clock.now()
        w = Waiter(
            ticket or f"{self.instance}.{next(self._ids):x}",
            ordered_limits,
            priority,
            max_depth,
            group,
            start,
        )
        w.seq = seq
        if owner and max_owner_depth is not None:
            w.owner, w.owner_depth = owner_id(owner), max(0, max_owner_depth)
        # Registered before its first acquire: a wake-up that lands while that acquire is in
        # flight sets ``rerun``, so no capacity freed in between is missed.
        self._pending.add(w)
        try:
            result = await self._attempt(w)
            while result.status is Status.BLOCKED and w.rerun:
                w.rerun = False
                result = await self._attempt(w)
            if result.status is Status.BLOCKED:
                self._pending.discard(w)
                self._place(w, result)
                remaining = start + max_wait_s - self._clock.now()
                got = await self._wait(w, remaining) if remaining > 0 else None
                if got is None:
                    why = f"waited {format_seconds(max_wait_s)}s for"
                    raise self._refusal(WaitTimeout, w, w.last or result, why, counted=not durable)
                result = got
            if result.status is Status.ADMITTED:
                waited = self._clock.now() - start
                self._obs.admitted(ordered_limits, result.states, waited, group)
                w.admitted = True
                return Grant(w.ticket, ordered_limits, result.states, waited)
            if result.status is Status.FULL:
                raise self._refusal(QueueFull, w, result, f"{result.ahead} requests already wait for")
            if result.status is Status.SHARE_FULL:
                why = (
                    f"{result.ahead} of your requests already wait, your share of the gateway's queue "
                    f"(at most {w.owner_depth} per key: queue.max_depth_per_key), for"
                )
                raise self._refusal(QueueFull, w, result, why, reason="queue_share")
            raise GatewayError("admission was aborted")
        finally:
            self._forget(w)
            # Refused, timed out, or abandoned (cancelled): hold nothing. FULL kept nothing.
            if not w.admitted and not durable and not (w.last is not None and w.last.status in _KEPT_NOTHING):
                await self._abort(w)

    async def _shadowed(self, limits: tuple[Limit, ...], **admit: Any) -> Grant:
        """Shadow mode: the limits not in shadow are enforced as always (``admit``); those in
        shadow are decided as they would be, the decision recorded (metrics, a log line when
        it differs), and then taken whatever it was, so the request is forwarded at once and
        the store still counts it as upstream will (a window in shadow keeps what really
        arrived). One store call when the decision is "admitted", two when it differs."""
        start = self._clock.now()
        enforced = tuple(limit for limit in limits if not limit.shadow)
        shadow = tuple(limit for limit in limits if limit.shadow)
        group = str(admit.get("group", ""))
        grant = await self.admit(enforced, **admit) if enforced else None
        ticket = grant.ticket if grant else (admit.get("ticket") or f"{self.instance}.{next(self._ids):x}")
        request = AcquireRequest(
            ticket=ticket,
            limits=shadow,
            priority=int(admit.get("priority", 0)),
            seq=int(admit.get("seq", 0)),
            ttl_ms=self._ttl_ms,
            max_depth=int(admit.get("max_depth", 10_000)),
            floor=self._max_seq,
        )
        try:
            result = await self.store.acquire(request)
            if result.status is Status.ADMITTED:
                decision, states = "admitted", result.states
            else:
                blocked = shadow[result.blocked - 1]
                decision = "would_wait" if result.status is Status.BLOCKED else "would_refuse"
                log.info(
                    "shadow: %s on the %r limit (%d per %s; %d ahead); forwarded at once",
                    decision.replace("_", " "), blocked.name, blocked.capacity, _span(blocked), result.ahead,
                )  # fmt: skip
                # Taken whatever the capacity (the same keys): upstream will count it.
                forced = tuple(dataclasses.replace(limit, capacity=FORCED) for limit in shadow)
                result = await self.store.acquire(request._replace(limits=forced, seq=result.seq))
                states = tuple(s._replace(remaining=max(0, s.remaining - FORCED + limit.capacity))
                               for s, limit in zip(result.states, shadow, strict=True))  # fmt: skip
        except StoreUnavailable:
            decision, states = "unknown", tuple(LimitState(0, limit.lease_ms) for limit in shadow)
        for limit in shadow:
            self._obs.shadow(limit, decision, group)
        if grant is None:
            self._obs.admitted(shadow, states, self._clock.now() - start, group)
            return Grant(ticket, shadow, states, 0.0)
        by_name = dict(
            zip((limit.name for limit in (*grant.limits, *shadow)), (*grant.states, *states), strict=True)
        )
        every = ordered((*grant.limits, *shadow))
        return Grant(ticket, every, tuple(by_name[limit.name] for limit in every), grant.waited_s)

    def _refusal(
        self,
        kind: type[RateLimited],
        w: Waiter,
        result: AcquireResult,
        why: str,
        *,
        reason: str = "",
        counted: bool = True,
    ) -> RateLimited:
        """The 429 for a waiter refused on the limit that blocked it, counted in metrics when
        it is final for the request (``counted``: a durable job that stops waiting still waits)."""
        limit = w.limits[result.blocked - 1]
        if counted:
            self._obs.refused(limit, reason or ("timeout" if kind is WaitTimeout else "queue_full"), w.group)
        return kind(
            f"Too Many Requests: {why} the gateway's {limit.name!r} limit "
            f"({limit.capacity} per {_span(limit)})",
            limit=limit.name,
            retry_after_s=self._retry_after(result),
        )

    def retune(self, current: Callable[[Limit], Limit]) -> int:
        """A reload changed limits: every request still waiting here is moved onto the
        current limit of the same name (``current``), and every queue is retried at once, so
        a waiter queued under a capacity of 1 is admitted as soon as a reload raises it to 2.
        A limit is known by its name in the store: leases and queue places carry over.
        Returns how many waiters were moved."""
        waiters = set(self._pending)
        for queue in self._queues.values():
            waiters.update(queue)
        moved = 0
        for w in waiters:
            limits = tuple(current(limit) for limit in w.limits)
            if limits != w.limits:
                w.limits = limits
                moved += 1
        if moved:
            for name in list(self._queues):
                self._kick(name)
        return moved

    async def release(self, grant: Grant, limits: Sequence[Limit] | None = None) -> None:
        """End leases: a finished concurrency lease, or a refund for work that never left."""
        await self.give_back(grant.ticket, limits if limits is not None else grant.limits)

    async def give_back(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> None:
        """Release ``ticket``'s leases (and reservations, and its place in a queue). When the
        store cannot be reached, the release is OWED: kept here and sent again by
        housekeeping until it lands, so a lease outlives its work by the outage at most, not
        by its TTL (a job's concurrency lease lives hours). Releasing twice is harmless, and a
        ticket given back is never used again (a requeued job takes a new attempt's ticket)."""
        try:
            await self.store.release(ticket, list(limits), tombstone=tombstone)
        except StoreUnavailable as exc:
            self._owe(ticket, limits, tombstone, exc)

    def _owe(self, ticket: str, limits: Sequence[Limit], tombstone: bool, exc: StoreUnavailable) -> None:
        owed = self._owed.get(ticket)
        merged = tuple(dict.fromkeys((*(owed[0] if owed else ()), *limits)))
        self._owed[ticket] = (merged, tombstone or bool(owed and owed[1]))
        while len(self._owed) > MAX_OWED:  # past this, the oldest are left to their TTLs
            self._owed.pop(next(iter(self._owed)))
        log.warning("release of %s owed, sent again when the store answers (%s)", ticket, exc.detail)

    async def settle_owed(self) -> int:
        """Send the owed releases again (housekeeping); returns how many landed. Stops at the
        first failure: the store is still away."""
        landed = 0
        for ticket, (limits, tombstone) in list(self._owed.items()):
            try:
                await self.store.release(ticket, list(limits), tombstone=tombstone)
            except StoreUnavailable:
                break
            self._owed.pop(ticket, None)
            landed += 1
        if landed:
            log.info("%d owed releases landed; %d still owed", landed, len(self._owed))
        return landed

    @property
    def owed_releases(self) -> int:
        return len(self._owed)

    async def _housekeep(self) -> None:
        if self._owed:
            await self.settle_owed()

    # -- asking the store ------------------------------------------------------------------
    async def _attempt(self, w: Waiter) -> AcquireResult:
        """One acquire for ``w``. Before a waiter is placed in a local queue only its own
        admit() can ask for it; after that, drains, retries and admit() may race, so at most
        one acquire per ticket is in flight (its lock; the others re-run after it).

        A caller cancelled mid-call leaves an unknown outcome: admit() then aborts the
        ticket, which is safe whichever of the two reaches the store first (tombstone).
        """
        if w.queue is None and w.lock is None:
            return await self._ask(w)
        if w.lock is None:
            w.lock = asyncio.Lock()
        async with w.lock:
            return await self._ask(w)

    async def _ask(self, w: Waiter) -> AcquireResult:
        request = AcquireRequest(
            ticket=w.ticket,
            limits=w.limits,
            priority=w.priority,
            seq=w.seq,
            ttl_ms=self._ttl_ms,
            max_depth=w.max_depth,
            floor=self._max_seq,
            owner=w.owner,
            owner_depth=w.owner_depth,
        )
        sent = self._clock.now()
        result = await self.store.acquire(request)
        w.seq, w.score, w.last = result.seq, result.score, result
        if result.seq > self._max_seq:
            self._max_seq = result.seq
        w.touched = self._clock.now()
        self._sync(result, sent, w.touched)
        return result

    async def _abort(self, w: Waiter) -> None:
        try:
            await asyncio.shield(self.store.release(w.ticket, w.limits, tombstone=True))
        except StoreUnavailable as exc:
            # An acquire sent before the store went away may still run when it returns (it
            # sat in Redis's socket): its place, or its lease, is given back then.
            self._owe(w.ticket, w.limits, True, exc)
        except asyncio.CancelledError:  # the shielded release goes on by itself
            log.debug("abort of %s cancelled; the release goes on", w.ticket)

    def _retry_after(self, result: AcquireResult) -> float:
        """Seconds a refused client should wait: the store's hint, with jitter so they spread."""
        base = max(result.wait_ms / 1000, 0.5)
        return math.ceil(base + random.uniform(0, min(2.0, base)))

    def __repr__(self) -> str:
        waiting = {name: len(q) for name, q in self._queues.items()}
        return f"AdmissionEngine({self.instance}, store={self.store.kind}, waiting={waiting})"


_KEPT_NOTHING = (Status.FULL, Status.SHARE_FULL)


def format_seconds(s: float) -> str:
    """A duration for a message a client reads: tenths below 10 s, whole seconds above, so
    "waited 10s", never "waited 9.99999s" (callers with their own refusal texts use it too)."""
    return f"{round(s, 1):g}" if s < 10 else f"{round(s)}"


def _span(limit: Limit) -> str:
    if limit.window_ms:
        return f"{limit.window_ms / 1000:g}s"
    return "concurrent"
