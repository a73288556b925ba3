"""How an instance wakes its waiters: local queues, one timer per limit, wake-up messages.

The store holds the one global order; this holds, per limit, this instance's own waiters in
that order, and decides WHEN to ask the store again (ADMISSION.md I7):

- a waiter is registered locally before its first acquire, so a wake-up that arrives while
  that acquire is in flight makes it ask again at once (``rerun``);
- a wake-up for limit L (a release, a lapse, a waiter ahead leaving) retries L's local
  waiters in order and stops at the first one L refuses (``_drain``);
- one timer per limit, for its best local waiter only, fires when the store said capacity
  for it would appear (a window lease ending): at that instant of the STORE's clock, mapped
  to ours (``_sync``), so a reply read late (a burst of arrivals keeps the loop busy) does
  not wake its waiter late by as much;
- once a second the head of each local queue is re-checked (pub/sub is at-most-once), and
  waiting tickets whose deadline is half gone are refreshed in batches; tickets the store
  lost (a stalled instance, a Redis restart) are re-queued in their original order.

``Waking`` is the base of AdmissionEngine, which supplies ``_attempt`` (one acquire).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from ..clock import Clock
from ..errors import StoreUnavailable
from .limits import Limit
from .store import RESYNC, AcquireResult, LimitState, Status, Store

log = logging.getLogger(__name__)

# The most waiters one drain retries at once on the store's word that capacity is owed to them.
OWED_BATCH = 64


class EngineObserver(Protocol):
    """What the engine reports (metrics.py implements it; tests may pass their own)."""

    def admitted(
        self, limits: Sequence[Limit], states: Sequence[LimitState], waited_s: float, group: str
    ) -> None: ...

    def refused(self, limit: Limit, reason: str, group: str) -> None: ...

    def waiting(self, limit: Limit, delta: int) -> None: ...

    def lapsed(self) -> None: ...

    def shadow(self, limit: Limit, decision: str, group: str) -> None: ...


class NullObserver:
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

    def shadow(self, limit: Limit, decision: str, group: str) -> None:
        pass


class Waiter:
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
        "owner",
        "owner_depth",
        "inherited",
    )

    def __init__(
        self, ticket: str, limits: tuple[Limit, ...], priority: int, max_depth: int, group: str, now: float
    ) -> None:
        self.ticket = ticket
        self.limits = limits
        self.priority = priority
        self.max_depth = max_depth
        self.owner = ""  # keys.owner_id of who it belongs to, when it has a share of the queue
        self.owner_depth = -1  # that share (-1: none)
        self.admitted = False
        self.placed_score = 0
        self.group = group
        self.seq = 0
        self.score = 0
        self.queue: str | None = None  # the limit it waits on, locally
        self.future: asyncio.Future[AcquireResult | None] | None = None  # None: its wait is over
        self.lock: asyncio.Lock | None = None  # made once the waiter is queued (see _attempt)
        self.rerun = False  # a wake-up arrived while its first acquire was in flight
        self.touched = now  # when its deadline was last pushed back (acquire or refresh)
        self.last: AcquireResult | None = None
        self.done = False
        # (limit, score) of a priority it inherited while its first acquire was in flight:
        # kept, and applied when it is placed (the reply may predate the inheritance).
        self.inherited: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"<waiter {self.ticket} score={self.score} on={self.queue}>"


class Waking:
    """Local queues and wake-ups (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        ticket_ttl_ms: int,
        recheck_s: float,
        refresh_batch: int,
        observer: EngineObserver | None,
    ) -> None:
        self.store = store
        self._clock = clock
        self._ttl_ms = ticket_ttl_ms
        self._recheck_s = recheck_s
        self._batch = refresh_batch
        self._obs: EngineObserver = observer or NullObserver()
        self._pending: set[Waiter] = set()
        self._by_ticket: dict[str, Waiter] = {}
        self._queues: dict[str, list[Waiter]] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._checked: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Store time minus our clock (s): a lower bound, as tight as the quickest reply made
        # it (see _sync). None until a reply says when it was decided.
        self._offset: float | None = None

    async def _attempt(self, w: Waiter) -> AcquireResult:
        raise NotImplementedError

    def waiting(self) -> dict[str, dict[str, int]]:
        """This instance's waiting requests, per limit name (the one each waits on) and owner
        (``project:<name>``, a key fingerprint, or ``~<hash>``): what a status page shows."""
        out: dict[str, dict[str, int]] = {}
        for name, waiters in self._queues.items():
            for w in waiters:
                per = out.setdefault(name, {})
                per[w.owner] = per.get(w.owner, 0) + 1
        return out

    # -- local queues ----------------------------------------------------------------------
    def _place(self, w: Waiter, result: AcquireResult) -> None:
        """Put a blocked waiter in its limit's local queue; arm the timer if it is the head."""
        name = w.limits[result.blocked - 1].name
        if w.inherited is not None:
            if w.inherited[0] == name and w.inherited[1] < w.score:
                w.score = w.inherited[1]
            w.inherited = None
        self._follow(name, result)
        q = self._queues.get(name)
        if w.queue != name or q is None or w.placed_score != w.score:
            self._unqueue(w)
            q = self._queues.setdefault(name, [])
            bisect.insort(q, w, key=order)
            w.queue, w.placed_score = name, w.score
            self._by_ticket[w.ticket] = w  # for inherited priorities (waiting tickets only)
            self._obs.waiting(w.limits[result.blocked - 1], +1)
        if q[0] is w:
            self._arm(name, self._wake_delay(result))

    def _sync(self, result: AcquireResult, sent: float, read: float) -> None:
        """Learn the store's clock from a reply decided at ``result.now_ms``, somewhere
        between ``sent`` and ``read`` on ours: the offset is at least now - read and at most
        now - sent. Keep the largest lower bound (never wake early); start again from this
        reply when it proves the bound too high (the store's clock stepped back, a failover)."""
        if not result.now_ms:
            return
        at = result.now_ms / 1000
        low = at - read
        if self._offset is None or low > self._offset or at - sent + 0.001 < self._offset:
            self._offset = low

    def _wake_delay(self, result: AcquireResult) -> float:
        """Seconds from now until the store's hint is due: now_ms + wait_ms in store time."""
        if not result.now_ms or self._offset is None:
            return result.wait_ms / 1000
        due = (result.now_ms + result.wait_ms) / 1000 - self._offset
        return max(0.0, due - self._clock.now())

    def _follow(self, name: str, result: AcquireResult) -> None:
        """The store's order is the truth: re-score our own waiters among the first of the
        queue on ``name`` (an inherited priority whose message was lost or came too early)."""
        for ticket, score in result.first:
            x = self._by_ticket.get(ticket)
            if x is None or x.done:
                continue
            if x.queue == name and score < x.score:
                self._rescore(x, name, score)

    def _rescore(self, w: Waiter, name: str, score: int) -> None:
        q = self._queues.get(name)
        if q is None:
            return
        with contextlib.suppress(ValueError):
            q.remove(w)
        w.score = w.placed_score = score
        bisect.insort(q, w, key=order)

    def _unqueue(self, w: Waiter) -> None:
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

    def _forget(self, w: Waiter) -> None:
        w.done = True
        self._pending.discard(w)
        self._by_ticket.pop(w.ticket, None)
        self._unqueue(w)
        if w.future is not None and not w.future.done():
            w.future.cancel()

    async def _wait(self, w: Waiter, seconds: float) -> AcquireResult | None:
        """The waiter's result when its turn comes, or None after ``seconds``."""
        future: asyncio.Future[AcquireResult | None] = asyncio.get_running_loop().create_future()
        w.future = future
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))

        def over(_: asyncio.Future[None]) -> None:
            if not future.done():
                future.set_result(None)

        sleeper.add_done_callback(over)
        try:
            return await future  # raises what close() set
        finally:
            sleeper.cancel()

    def _deliver(self, w: Waiter, result: AcquireResult) -> None:
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
        if w is None:
            # Still on its first acquire (not placed yet): keep the inheritance; its reply may
            # have been computed before it, and is corrected when the waiter is placed.
            for p in self._pending:
                if p.ticket == ticket and not p.done:
                    if p.inherited is None or int(score) < p.inherited[1]:
                        p.inherited = (name, int(score))
            return
        if w.done or w.queue != name or int(score) >= w.score:
            return
        self._rescore(w, name, int(score))
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
        """Retry this instance's waiters on ``name`` in order; stop at the first it refuses,
        unless the store's answer ranks one of ours not yet retried ahead of it.

        An admission tells how far the capacity still free reaches into the queue (``owed``:
        a score); all of our waiters up to it are retried at once, in order (their acquires
        leave in one write, so the store decides them in that order), not one round trip
        after another."""
        try:
            while True:
                self._again.discard(name)
                self._checked[name] = self._clock.now()
                tried: set[Waiter] = set()
                batch = self._untried(name, tried, 0)
                while batch:
                    tried.update(batch)
                    results = await self._attempt_all(batch)
                    owed, stop, failed = 0, False, None
                    for w, result in zip(batch, results, strict=True):
                        if isinstance(result, BaseException):
                            failed = failed or result
                            continue
                        if w.done:
                            continue
                        if result.status is not Status.BLOCKED:
                            owed = max(owed, result.owed)
                            self._deliver(w, result)
                            continue
                        self._place(w, result)
                        refused_here = w.limits[result.blocked - 1].name == name
                        if refused_here and not self._untried_ahead(name, w, tried):
                            stop = True
                    if failed is not None:
                        if not isinstance(failed, StoreUnavailable):
                            log.error("retrying waiters on %s failed", name, exc_info=failed)
                        self._arm(name, self._recheck_s)
                        return
                    batch = [] if stop else self._untried(name, tried, owed)
                if name not in self._again:
                    return
        finally:
            if self._drains.get(name) is asyncio.current_task():
                del self._drains[name]

    async def _attempt_all(self, batch: list[Waiter]) -> list[AcquireResult | BaseException]:
        """One acquire per waiter, all in flight at once (one alone: no task to make)."""
        if len(batch) == 1:
            try:
                return [await self._attempt(batch[0])]
            except Exception as exc:
                return [exc]
        return await asyncio.gather(*(self._attempt(w) for w in batch), return_exceptions=True)

    def _untried(self, name: str, tried: set[Waiter], owed: int) -> list[Waiter]:
        """The next waiters to retry on ``name``, in order: every untried one the store said
        capacity is owed to (score up to ``owed``, at most OWED_BATCH), else the first."""
        batch: list[Waiter] = []
        for w in self._queues.get(name, ()):
            if w in tried or w.done or w.queue != name:
                continue
            if batch and (w.score > owed or len(batch) >= OWED_BATCH):
                break
            batch.append(w)
        return batch

    def _untried_ahead(self, name: str, w: Waiter, tried: set[Waiter]) -> bool:
        """Whether one of our waiters not retried in this pass now ranks ahead of ``w``."""
        q = self._queues.get(name, [])
        end = bisect.bisect_left(q, order(w), key=order)
        return any(x not in tried and not x.done for x in q[:end])

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
                await self._housekeep()
            except StoreUnavailable as exc:
                log.warning("refresh of waiting tickets failed: %s", exc.detail)
            except Exception:  # never let housekeeping die
                log.exception("engine housekeeping failed")

    async def _housekeep(self) -> None:
        """More of each housekeeping turn, for the engine (owed releases)."""

    async def _refresh(self, now: float, *, force: bool = False) -> None:
        stale_after = 0.0 if force else self._ttl_ms / 2000
        groups: dict[tuple[Limit, ...], list[Waiter]] = {}
        for q in self._queues.values():
            for w in q:
                if not w.done and now - w.touched >= stale_after:
                    groups.setdefault(w.limits, []).append(w)
        lost: list[Waiter] = []
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
            self._spawn(self._retry(sorted(lost, key=order)))

    async def _refresh_now(self) -> None:
        try:
            await self._refresh(self._clock.now(), force=True)
        except StoreUnavailable:
            pass  # the regular housekeeping tries again

    async def _retry(self, waiters: list[Waiter]) -> None:
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
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[None]) -> None:
        """A one-shot housekeeping task ended: never let its failure pass unseen."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("engine housekeeping step failed", exc_info=exc)


def order(w: Waiter) -> tuple[int, str]:
    return (w.score, w.ticket)
