"""The admission engine: every limit on every path goes through ``AdmissionEngine.admit``.

A request asks for a set of limits. The store decides, atomically and in Redis time, whether
it gets a lease on every one of them (admitted) or waits, in one global order per limit
(priority, then arrival), on the first limit that blocks it. This module only decides WHEN
to ask the store again, so waiters wake promptly and cheaply (ADMISSION.md I7):

- a waiter is registered locally before its first acquire, so a wake-up that arrives while
  that acquire is in flight makes it ask again at once;
- each limit has a local queue of this instance's waiters in the store's order; a wake-up
  for limit L (a release, a lapse, a waiter ahead leaving) retries L's local waiters in
  order and stops at the first one L refuses ("drain");
- one timer per limit, for its best local waiter only, fires when the store said capacity
  for it would appear (a window lease ending);
- once a second the head of each local queue is re-checked (pub/sub is at-most-once), and
  waiting tickets whose deadline is half gone are refreshed in batches.

A request that is refused, still waiting, or abandoned holds nothing: its ticket is aborted
(reservations, queue place and any lease removed; a tombstone stops a late acquire).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import os
import random
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, Protocol

from ..clock import Clock
from ..errors import GatewayError, QueueFull, RateLimited, StoreUnavailable, WaitTimeout
from .limits import Limit, ordered
from .store import RESYNC, AcquireRequest, AcquireResult, LimitState, Status, Store

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """What the engine reports (metrics.py implements it; tests may pass their own)."""

    def admitted(
        self, limits: Sequence[Limit], states: Sequence[LimitState], waited_s: float, group: str
    ) -> None: ...

    def refused(self, limit: Limit, reason: str, group: str) -> None: ...

    def waiting(self, limit: Limit, delta: int) -> None: ...

    def lapsed(self) -> None: ...


class _NullObserver:
    def admitted(
        self, limits: Sequence[Limit], states: Sequence[LimitState], waited_s: float, group: str
    ) -> None:
        pass

    def refused(self, limit: Limit, reason: str, group: str) -> None:
        pass

    def waiting(self, limit: Limit, delta: int) -> None:
        pass

    def lapsed(self) -> None:
        pass


class Grant(NamedTuple):
    """An admitted request: it holds a lease on each of ``limits`` under ``ticket``."""

    ticket: str
    limits: tuple[Limit, ...]
    states: tuple[LimitState, ...]
    waited_s: float


class _Waiter:
    __slots__ = (
        "ticket",
        "limits",
        "priority",
        "group",
        "seq",
        "score",
        "queue",
        "future",
        "lock",
        "rerun",
        "touched",
        "last",
        "done",
        "admitted",
        "max_depth",
        "placed_score",
    )

    def __init__(
        self, ticket: str, limits: tuple[Limit, ...], priority: int, max_depth: int, group: str, now: float
    ) -> None:
        self.ticket = ticket
        self.limits = limits
        self.priority = priority
        self.max_depth = max_depth
        self.admitted = False
        self.placed_score = 0
        self.group = group
        self.seq = 0
        self.score = 0
        self.queue: str | None = None  # the limit it waits on, locally
        self.future: asyncio.Future[AcquireResult] | None = None
        self.lock: asyncio.Lock | None = None  # made once the waiter is queued (see _attempt)
        self.rerun = False  # a wake-up arrived while its first acquire was in flight
        self.touched = now  # when its deadline was last pushed back (acquire or refresh)
        self.last: AcquireResult | None = None
        self.done = False

    def __repr__(self) -> str:
        return f"<waiter {self.ticket} score={self.score} on={self.queue}>"


class AdmissionEngine:
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
        self.store = store
        self._clock = clock
        self._ttl_ms = ticket_ttl_ms
        self._recheck_s = recheck_s
        self._batch = refresh_batch
        self._obs: EngineObserver = observer or _NullObserver()
        self.instance = instance or os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._pending: set[_Waiter] = set()
        self._by_ticket: dict[str, _Waiter] = {}
        self._max_seq = 0  # highest arrival sequence seen (see AcquireRequest.floor)
        self._queues: dict[str, list[_Waiter]] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._checked: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintenance: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.subscribe(self._on_wake)
        self._maintenance = asyncio.create_task(self._maintain(), name="aai-gateway-engine")

    async def close(self) -> None:
        """Stop waking; every request still waiting here is refused (503) and aborted."""
        for q in list(self._queues.values()):
            for w in list(q):
                if w.future is not None and not w.future.done():
                    w.future.set_exception(StoreUnavailable("the gateway is shutting down"))
        tasks = [
            t for t in (self._maintenance, *self._timers.values(), *self._drains.values(), *self._tasks) if t
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
    ) -> Grant:
        """Wait until the request holds a lease on every limit, in order with other waiters.

        Raises ``WaitTimeout`` after ``max_wait_s``, ``QueueFull`` when ``max_depth`` waiters
        are ahead, ``StoreUnavailable`` when the store cannot be reached. On any of these, and
        on cancellation (the client left), nothing is held afterwards.

        A ``durable`` ticket (a queued transcript job: ``ticket`` and its ``seq`` come from the
        job record) is the exception: it is not aborted when this call gives up, because
        the job still waits; dispatchers on any instance may wait on the same ticket (acquire
        is idempotent per ticket), and its place in the queue lapses only if none refreshes it.
        """
        ordered_limits = ordered(limits)
        start = self._clock.now()
        w = _Waiter(
            ticket or f"{self.instance}.{next(self._ids):x}",
            ordered_limits,
            priority,
            max_depth,
            group,
            start,
        )
        w.seq = seq
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
                    raise self._refusal(WaitTimeout, w, w.last or result, f"waited {max_wait_s:g}s for")
                result = got
            if result.status is Status.ADMITTED:
                waited = self._clock.now() - start
                self._obs.admitted(ordered_limits, result.states, waited, group)
                w.admitted = True
                return Grant(w.ticket, ordered_limits, result.states, waited)
            if result.status is Status.FULL:
                raise self._refusal(QueueFull, w, result, f"{result.ahead} requests already wait for")
            raise GatewayError("admission was aborted")
        finally:
            self._forget(w)
            # Refused, timed out, or abandoned (cancelled): hold nothing. FULL kept nothing.
            if not w.admitted and not durable and not (w.last is not None and w.last.status is Status.FULL):
                await self._abort(w)

    def _refusal(self, kind: type[RateLimited], w: _Waiter, result: AcquireResult, why: str) -> RateLimited:
        """The 429 for a waiter refused on the limit that blocked it (counted in metrics)."""
        limit = w.limits[result.blocked - 1]
        self._obs.refused(limit, "timeout" if kind is WaitTimeout else "queue_full", w.group)
        return kind(
            f"Too Many Requests: {why} the gateway's {limit.name!r} limit "
            f"({limit.capacity} per {_span(limit)})",
            limit=limit.name,
            retry_after_s=self._retry_after(result),
        )

    async def release(self, grant: Grant, limits: Sequence[Limit] | None = None) -> None:
        """End leases: a finished concurrency lease, or a refund for work that never left."""
        await self.store.release(grant.ticket, list(limits) if limits is not None else grant.limits)

    # -- asking the store ------------------------------------------------------------------
    async def _attempt(self, w: _Waiter) -> AcquireResult:
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

    async def _ask(self, w: _Waiter) -> AcquireResult:
        request = AcquireRequest(
            ticket=w.ticket,
            limits=w.limits,
            priority=w.priority,
            seq=w.seq,
            ttl_ms=self._ttl_ms,
            max_depth=w.max_depth,
            floor=self._max_seq,
        )
        result = await self.store.acquire(request)
        w.seq, w.score, w.last = result.seq, result.score, result
        if result.seq > self._max_seq:
            self._max_seq = result.seq
        w.touched = self._clock.now()
        return result

    async def _abort(self, w: _Waiter) -> None:
        try:
            await asyncio.shield(self.store.release(w.ticket, w.limits, tombstone=True))
        except (StoreUnavailable, asyncio.CancelledError):
            # Its ticket and reservations lapse at their deadline (nothing is forever).
            log.debug("abort of %s left to expire", w.ticket)

    # -- local queues ----------------------------------------------------------------------
    def _place(self, w: _Waiter, result: AcquireResult) -> None:
        """Put a blocked waiter in its limit's local queue; arm the timer if it is the head."""
        name = w.limits[result.blocked - 1].name
        q = self._queues.get(name)
        if w.queue != name or q is None or w.placed_score != w.score:
            self._unqueue(w)
            q = self._queues.setdefault(name, [])
            bisect.insort(q, w, key=_order)
            w.queue, w.placed_score = name, w.score
            self._by_ticket[w.ticket] = w  # for inherited priorities (waiting tickets only)
            self._obs.waiting(w.limits[result.blocked - 1], +1)
        if q[0] is w:
            self._arm(name, result.wait_ms / 1000)

    def _unqueue(self, w: _Waiter) -> None:
        if w.queue is None:
            return
        q = self._queues.get(w.queue)
        if q is not None:
            with contextlib.suppress(ValueError):
                q.remove(w)
            if not q:
                del self._queues[w.queue]
                timer = self._timers.pop(w.queue, None)
                if timer is not None:
                    timer.cancel()
        for limit in w.limits:
            if limit.name == w.queue:
                self._obs.waiting(limit, -1)
        w.queue = None

    def _forget(self, w: _Waiter) -> None:
        w.done = True
        self._pending.discard(w)
        self._by_ticket.pop(w.ticket, None)
        self._unqueue(w)
        if w.future is not None and not w.future.done():
            w.future.cancel()

    async def _wait(self, w: _Waiter, seconds: float) -> AcquireResult | None:
        loop = asyncio.get_running_loop()
        w.future = loop.create_future()
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((w.future, sleeper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if w.future.done() and not w.future.cancelled():
            return w.future.result()  # raises what close() set
        return None

    def _deliver(self, w: _Waiter, result: AcquireResult) -> None:
        self._unqueue(w)
        if w.future is not None and not w.future.done():
            w.future.set_result(result)

    # -- waking ----------------------------------------------------------------------------
    def _on_wake(self, name: str) -> None:
        if "\t" in name:
            self._inherit(*name.split("\t"))
            return
        if name == RESYNC:
            # Messages may have been missed, or the store lost its state (a Redis restart):
            # retry every head, and refresh every waiter now, which re-queues any the store
            # no longer knows (with their original sequence, so they keep their turn).
            for w in self._pending:
                w.rerun = True
            for limit in list(self._queues):
                self._kick(limit)
            if self._queues:
                self._spawn(self._refresh_now())
            return
        for w in self._pending:
            if any(limit.name == name for limit in w.limits):
                w.rerun = True
        if name in self._queues:
            self._kick(name)

    def _inherit(self, name: str, ticket: str = "", score: str = "0") -> None:
        """One of our waiters on ``name`` took a better priority: re-order it, then retry."""
        w = self._by_ticket.get(ticket)
        if w is None or w.done or w.queue != name or int(score) >= w.score:
            return
        self._unqueue(w)
        w.score = int(score)
        q = self._queues.setdefault(name, [])
        bisect.insort(q, w, key=_order)
        w.queue, w.placed_score = name, w.score
        for limit in w.limits:
            if limit.name == name:
                self._obs.waiting(limit, +1)
        self._kick(name)

    def _arm(self, name: str, delay: float) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = asyncio.create_task(self._fire(name, delay + 0.001))

    async def _fire(self, name: str, delay: float) -> None:
        await self._clock.sleep(delay)
        if self._timers.get(name) is asyncio.current_task():
            del self._timers[name]
        self._kick(name)

    def _kick(self, name: str) -> None:
        running = self._drains.get(name)
        if running is not None and not running.done():
            self._again.add(name)
            return
        if name in self._queues:
            self._drains[name] = asyncio.create_task(self._drain(name))

    async def _drain(self, name: str) -> None:
        """Retry this instance's waiters on ``name`` in order; stop at the first it refuses."""
        try:
            while True:
                self._again.discard(name)
                self._checked[name] = self._clock.now()
                for w in list(self._queues.get(name, ())):
                    if w.done or w.queue != name:
                        continue
                    try:
                        result = await self._attempt(w)
                    except StoreUnavailable:
                        self._arm(name, self._recheck_s)
                        return
                    except Exception:
                        log.exception("retrying waiters on %s failed", name)
                        self._arm(name, self._recheck_s)
                        return
                    if w.done:
                        continue
                    if result.status is not Status.BLOCKED:
                        self._deliver(w, result)
                        continue
                    self._place(w, result)
                    if w.limits[result.blocked - 1].name == name:
                        break
                if name not in self._again:
                    return
        finally:
            if self._drains.get(name) is asyncio.current_task():
                del self._drains[name]

    # -- housekeeping ----------------------------------------------------------------------
    async def _maintain(self) -> None:
        while True:
            await self._clock.sleep(self._recheck_s / 2)
            now = self._clock.now()
            for name in list(self._queues):
                if now - self._checked.get(name, 0.0) >= self._recheck_s:
                    self._kick(name)
            try:
                await self._refresh(now)
            except StoreUnavailable as exc:
                log.warning("refresh of waiting tickets failed: %s", exc.detail)
            except Exception:  # never let housekeeping die
                log.exception("engine housekeeping failed")

    async def _refresh(self, now: float, *, force: bool = False) -> None:
        stale_after = 0.0 if force else self._ttl_ms / 2000
        groups: dict[tuple[Limit, ...], list[_Waiter]] = {}
        for q in self._queues.values():
            for w in q:
                if not w.done and now - w.touched >= stale_after:
                    groups.setdefault(w.limits, []).append(w)
        lost: list[_Waiter] = []
        for limits, waiters in groups.items():
            for i in range(0, len(waiters), self._batch):
                batch = waiters[i : i + self._batch]
                where = await self.store.refresh(limits, [w.ticket for w in batch], self._ttl_ms)
                for w, index in zip(batch, where, strict=True):
                    w.touched = now
                    if index == 0 and not w.done:
                        lost.append(w)
        if lost:
            # Their deadlines lapsed (this instance stalled) or the store lost them (a restart):
            # evaluate them afresh, in their original order, with their original sequences.
            for _ in lost:
                self._obs.lapsed()
            self._spawn(self._retry(sorted(lost, key=_order)))

    async def _refresh_now(self) -> None:
        try:
            await self._refresh(self._clock.now(), force=True)
        except StoreUnavailable:
            pass  # the regular housekeeping tries again

    async def _retry(self, waiters: list[_Waiter]) -> None:
        for w in waiters:
            if w.done:
                continue
            try:
                result = await self._attempt(w)
            except StoreUnavailable:
                return
            if w.done:
                continue
            if result.status is Status.BLOCKED:
                self._place(w, result)
            else:
                self._deliver(w, result)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retry_after(self, result: AcquireResult) -> float:
        """Seconds a refused client should wait: the store's hint, with jitter so they spread."""
        base = max(result.wait_ms / 1000, 0.5)
        return math.ceil(base + random.uniform(0, min(2.0, base)))

    def __repr__(self) -> str:
        waiting = {name: len(q) for name, q in self._queues.items()}
        return f"AdmissionEngine({self.instance}, store={self.store.kind}, waiting={waiting})"


def _order(w: _Waiter) -> tuple[int, str]:
    return (w.score, w.ticket)


def _span(limit: Limit) -> str:
    if limit.window_ms:
        return f"{limit.window_ms / 1000:g}s"
    return "concurrent"
