"""Life through a Redis outage: admit locally, within this instance's share, until Redis returns.

``FallbackStore`` wraps the shared store (Redis). While Redis answers it is a pass-through
that remembers what THIS instance was granted (its window leases still counting, its
concurrency leases), at the cost of one dict write per admission. When Redis stops answering
and ``redis.on_outage`` is ``fail_open``, admissions go to an embedded store (``MemoryStore``,
the same semantics) holding this instance's SHARE of every limit:

    share(limit) = capacity // live instances      (at least 0)

where the number of live instances is the last one read from the instances' heartbeats in
Redis. Every token the account had out when Redis stopped answering was granted to some
instance, which holds it (its window lease still counting, its running job's lease); the
embedded store starts with those, as themselves, and placeholders hold the rest of the share:

- with other instances alive, for a whole lease life from now (a window limit: every token
  granted before the outage has come back by then) or until Redis returns (a concurrency
  limit: the others' jobs run on, unseen). What the account had left is not handed out: an
  instance's last view of it predates the others' last grants, and its part of a remainder
  they had already taken would come on top. So each instance reuses its own tokens as they
  end, then admits its share per window;
- alone (one instance counted), its last view is the account's: the last count ``G`` seen at
  ``t`` from Redis's replies (``capacity - remaining``, or all of them when it blocked) lets
  it take ``capacity - G`` until ``t + lease life``; a limit not heard of within a second
  counts as full for one lease life.

Across the account, during the outage:

    arrivals upstream in any window  <=  what was out + what the instances reuse  <=  capacity

provided the instances alive are the ones counted (an instance started during the outage,
never seen in a heartbeat, is not; its admissions come on top) and no instance admits from
Redis meanwhile: Redis sees this instance's tokens end too, and would hand their room out
again. The FENCE keeps that so (fence.py). An instance that loses Redis raises it (``<prefix>:{account}:
fence``, ``FENCE_MS``; a stalled Redis runs the command as it resumes), and Redis raises it
itself when an acquire or heartbeat finds nothing ran for longer than the gap (``gap_ms``:
under the Redis timeout; heartbeats every ``BEAT_S`` keep the silence short otherwise), so
the order in which Redis runs what it was sent during a stall does not matter. While it is
up, acquire.lua admits nothing (``Fenced``, nothing taken) and the instance goes local too,
seeded the same way; every one writes back before the first switches back. Alone (one
instance counted) nothing is fenced. Waiters move to the local
store (their tickets, unknown there, are evaluated afresh in their order), so nobody gets a
503 because Redis died; with a share of 0 (more instances than tokens) they wait.

When Redis answers again, this instance writes back the leases it holds (its window leases
still inside their lease life, before or during the outage: Redis may have come back empty;
the concurrency leases it granted or renewed during the outage), each with the time it has
left (``renew(create=True)``), so the shared view is not emptier than upstream's; admits
nothing new for ``settle_s`` (its waiters wait: every other instance notices the return
within ``PROBE_S`` and writes back its own meanwhile; admitting locally while another
instance admits from Redis would put the account over); then switches back and
resynchronises its waiters. A concurrency lease from before the outage is not written back:
another instance may have ended its work since, and a lease the gateway knows is running is
restored by its own renewals anyway.

``fail_closed`` is the behaviour without this module: ``StoreUnavailable`` (503 at once,
charged nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..clock import Clock
from ..errors import Fenced, StoreUnavailable
from .fence import BEAT_S, FENCE_MS
from .health import stop_tasks, supervise
from .limits import Kind, Limit
from .memory import MemoryStore
from .store import RESYNC, AcquireRequest, AcquireResult, Status, Store, WakeCallback

log = logging.getLogger(__name__)

# Alone: a view of a limit older than this (no reply about it from Redis since) is not trusted
# (an instance started meanwhile may have taken anything), so the limit counts as full.
FRESH_MS = 1000
PROBE_S = 0.25  # while degraded: how often Redis is asked whether it is back
SETTLE_S = 1.0  # after Redis returns: admit nothing new this long, so every instance writes back
# A concurrency limit's placeholders last the outage (the local store is dropped when Redis returns).
OUTAGE_HOLD_MS = 24 * 3600 * 1000


@dataclasses.dataclass
class Outage:
    """What /readyz and the metrics say about the store."""

    degraded: bool = False
    since: float = 0.0  # monotonic, when the outage began
    last_s: float = 0.0  # how long the last one lasted
    count: int = 0


class FallbackStore:
    kind = "redis"

    def __init__(
        self,
        primary: Store,
        clock: Clock,
        *,
        beat: Callable[[], Any] | None = None,
        settle_s: float = SETTLE_S,
        heartbeat_s: float = BEAT_S,
        fence_ms: int = FENCE_MS,
    ) -> None:
        """``primary``: the shared store. ``beat()``: one heartbeat in Redis, returning the
        number of live instances (this one included); None counts this instance alone.
        ``fence_ms``: how long the fence this instance raises when it loses Redis lives
        (the primary raises it if it can: ``fence(ms, timeout_s)``)."""
        self.primary = primary
        self._clock = clock
        self._beat = beat
        self._settle_s = settle_s
        self._heartbeat_s = heartbeat_s
        self._fence_ms = fence_ms
        self._fenced = False  # this outage began with a Fenced reply: another instance's fence
        self._entering: asyncio.Future[None] | None = None  # the degrade under way (its fence)
        self._wake = asyncio.Event()  # wakes the heartbeat loop: probe now
        self.instances = 1  # the last count read from the heartbeats
        self.outage = Outage()
        self._local: MemoryStore | None = None
        self._settling_until = 0.0
        self._settled = asyncio.Event()  # set except while settling: acquires wait on it
        self._settled.set()
        # What this instance holds, for the local store's start and the write-back:
        # ticket -> {limit name: (limit, end in this instance's clock ms)}.
        self._held: dict[str, dict[str, tuple[Limit, int]]] = {}
        self._callbacks: list[WakeCallback] = []
        self._local_only: set[str] = set()  # tickets first seen while degraded: not in Redis
        # The account's view, from Redis's replies: limit name -> (limit, tokens out, when).
        self._seen: dict[str, tuple[Limit, int, int]] = {}
        self._seeded: set[str] = set()  # limits the local store was started on
        self._during: set[str] = set()  # tickets granted or renewed locally (concurrency write-back)
        self._task: asyncio.Task[None] | None = None
        self._next_prune = 0

    # -- the verbs ---------------------------------------------------------------------------
    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        while self._settling:  # Redis is back, the others are writing back: admit nothing yet
            await self._settled.wait()
        if self._local is None:
            try:
                result = await self.primary.acquire(request)
            except StoreUnavailable as exc:
                await self._degrade(exc)
            else:
                self._observe(request.limits, result)
                if result.status is Status.ADMITTED:
                    self._granted(request.ticket, request.limits)
                    if self._local is not None:
                        await self._late_grant(request)
                return result
        local = self._local
        assert local is not None
        if request.seq == 0:  # its first acquire: Redis never saw this ticket
            self._local_only.add(request.ticket)
        for limit in request.limits:
            if limit.name not in self._seeded:
                await self._seed(local, limit)
        result = await local.acquire(request._replace(limits=self._shares(request.limits)))
        if result.status is Status.ADMITTED:
            self._granted(request.ticket, request.limits)
            self._during.add(request.ticket)
        return result

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        """Released in both while degraded: Redis may hold the ticket's lease from before
        the outage. While Redis is away that raises, and the engine owes the release (it
        lands when Redis returns; this instance no longer writes the lease back)."""
        self._forget(ticket, limits)
        if self._local is not None:
            local = await self._local.release(ticket, self._shares(limits), tombstone=tombstone)
            if ticket in self._local_only:
                self._local_only.discard(ticket)
                return local
        return await self.primary.release(ticket, limits, tombstone=tombstone)

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        if self._local is not None:
            # Tickets queued in Redis are unknown here: 0 tells the engine to evaluate them
            # afresh, in their order, which moves them into the local store.
            return await self._local.refresh(self._shares(limits), tickets, ttl_ms)
        return await self.primary.refresh(limits, tickets, ttl_ms)

    async def renew(self, ticket: str, limit: Limit, ttl_ms: int, *, create: bool = False) -> bool:
        if self._local is not None:
            live = await self._local.renew(ticket, self._share(limit), ttl_ms, create=create)
            if live:
                self._hold(ticket, limit, ttl_ms)
                self._during.add(ticket)
            return live
        live = await self.primary.renew(ticket, limit, ttl_ms, create=create)
        if live:
            self._hold(ticket, limit, ttl_ms)
        return live

    async def subscribe(self, callback: WakeCallback) -> None:
        self._callbacks.append(callback)
        await self.primary.subscribe(callback)
        if self._task is None:
            self._task = supervise("store-heartbeat", self._heartbeats)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        if self._local is not None:
            return await self._local.usage(self._share(limit))
        return await self.primary.usage(limit)

    async def ping(self) -> None:
        await self.primary.ping()

    async def close(self) -> None:
        await stop_tasks(self._task)  # a heartbeat every 50 ms: a cancel may race a reply
        await self.primary.close()

    # -- what this instance holds ------------------------------------------------------------
    def _granted(self, ticket: str, limits: Sequence[Limit]) -> None:
        now = self._clock.now_ms()
        held = self._held.setdefault(ticket, {})
        for limit in limits:
            held[limit.name] = (limit, now + limit.lease_ms)
        if now >= self._next_prune:
            self._prune(now)

    def _hold(self, ticket: str, limit: Limit, ttl_ms: int) -> None:
        self._held.setdefault(ticket, {})[limit.name] = (limit, self._clock.now_ms() + ttl_ms)

    def _forget(self, ticket: str, limits: Sequence[Limit]) -> None:
        held = self._held.get(ticket)
        if held is None:
            return
        for limit in limits:
            held.pop(limit.name, None)
        if not held:
            del self._held[ticket]

    def _prune(self, now: int) -> None:
        """Drop what has ended (a window lease past its life): the table holds at most one
        lease life of this instance's admissions."""
        for ticket in [t for t, held in self._held.items() if all(end <= now for _, end in held.values())]:
            del self._held[ticket]
        self._next_prune = now + 1000

    def _observe(self, limits: Sequence[Limit], result: AcquireResult) -> None:
        """How many tokens of each limit the account had out, per Redis's reply."""
        at = self._clock.now_ms()
        if result.status is Status.ADMITTED:
            for limit, state in zip(limits, result.states, strict=False):
                self._seen[limit.name] = (limit, limit.capacity - state.remaining, at)
        elif result.status is Status.BLOCKED and 0 < result.blocked <= len(limits):
            limit = limits[result.blocked - 1]
            self._seen[limit.name] = (limit, limit.capacity, at)

    async def _seed(self, local: MemoryStore, limit: Limit) -> None:
        """Start the local store on ``limit``: this instance's own leases go in as themselves
        (one that ends frees its place), placeholders hold the rest of its share.

        With other instances alive, what the account had left is not split: each instance's
        last view of it is older than the others' last grants, and a token another took after
        that view, unseen, would come on top of the part this one took from it (the soak saw
        31 of 30). So the placeholders hold the rest of the share for a whole lease life from
        now (a window: until every token granted before the outage has come back; a
        concurrency limit: until Redis returns, as the others' jobs run on unseen). Across the
        account every token out is some instance's own lease, and each instance only reuses
        its own as they end: never more than was out, never more than capacity.

        Alone, its last view is the account's (every grant was its own): it may take what was
        left, until every token out then has come back. Unseen: taken as full for that long."""
        self._seeded.add(limit.name)
        now = self._clock.now_ms()
        share = self._share(limit)
        mine = [(t, held[limit.name][1]) for t, held in self._held.items() if limit.name in held]
        mine = [(t, end) for t, end in mine if end > now]
        for ticket, end in mine:
            local.hold(ticket, share, end - now)
        if max(1, self.instances) > 1:
            ttl = limit.lease_ms if limit.kind is Kind.WINDOW else OUTAGE_HOLD_MS
            placeholders = share.capacity - len(mine)
        else:
            limit, out, at = self._seen.get(limit.name, (limit, limit.capacity, now))
            if now - at > FRESH_MS:  # an acquire of ours may have run since: full, from now
                out, at = limit.capacity, now
            ttl = at + limit.lease_ms - now
            placeholders = out - len(mine)
        for i in range(max(0, placeholders)):
            local.hold(f"~held:{limit.name}:{i}", share, ttl)

    # -- shares ------------------------------------------------------------------------------
    async def _late_grant(self, request: AcquireRequest) -> None:
        """Redis granted an acquire sent before it stalled, and the reply came after this
        instance had begun admitting locally (another call's failure): that token was taken
        from what Redis had left, on top of what the local store was seeded with, so it
        occupies this instance's share too. (A SIGSTOPped Redis runs what it was sent once it
        resumes; without this, the late grant and a full local share both went upstream.)"""
        local = self._local
        assert local is not None
        for limit in request.limits:
            if limit.name in self._seeded:  # not yet seeded: the seeding counts it (its reply's view)
                local.hold(request.ticket, self._share(limit), limit.lease_ms)
        self._during.add(request.ticket)

    def _share(self, limit: Limit) -> Limit:
        return dataclasses.replace(limit, capacity=limit.capacity // max(1, self.instances))

    def _shares(self, limits: Sequence[Limit]) -> tuple[Limit, ...]:
        return tuple(self._share(limit) for limit in limits)

    @property
    def degraded(self) -> bool:
        return self._local is not None

    @property
    def _settling(self) -> bool:
        return self._settling_until > 0

    @property
    def settling(self) -> bool:
        """Redis is back and this instance has written back: it admits nowhere until it switches."""
        return self._settling

    # -- outage and return -------------------------------------------------------------------
    async def _degrade(self, exc: StoreUnavailable) -> None:
        """Go local. Concurrent callers wait for the one degrade under way, and with it for
        the fence (see _raise_fence): nothing is admitted locally before it went out."""
        if self._local is not None:
            return
        if self._entering is None:
            self._entering = asyncio.ensure_future(self._enter(exc))
        await asyncio.shield(self._entering)

    async def _enter(self, exc: StoreUnavailable) -> None:
        try:
            fenced = isinstance(exc, Fenced)
            if not fenced:
                await self._raise_fence()
            local = MemoryStore(self._clock)
            self._local, self._fenced = local, fenced
            self.outage.degraded, self.outage.since = True, time.monotonic()
            self.outage.count += 1
            if fenced:
                log.warning(
                    "store: another instance lost Redis (%s); admitting locally within this "
                    "instance's share (1/%d of every limit) until every one has written back",
                    exc.detail,
                    self.instances,
                )
            else:
                log.error(
                    "store: Redis unavailable (%s); admitting locally within this instance's share "
                    "(1/%d of every limit) until it returns",
                    exc.detail,
                    self.instances,
                )
            self._seeded.clear()
            self._during.clear()
            self._wake.set()  # probe soon: the heartbeat loop may be asleep for a beat
            for callback in self._callbacks:  # its wake-ups; RESYNC: every head is asked again
                await local.subscribe(callback)
        finally:
            self._entering = None

    async def _raise_fence(self) -> None:
        """Tell every other instance to go local too: one admitting from Redis while this one
        admits locally would put the account over (the local store reuses this instance's
        tokens as they end, which Redis sees end too). If Redis only stalls, the command waits
        in its socket and runs as it resumes, with what was sent during the stall; an acquire
        that runs first finds the stall by the tick (acquire.lua) and raises it itself."""
        fence = getattr(self.primary, "fence", None)
        if fence is None or self._fence_ms <= 0:
            return
        try:
            await fence(self._fence_ms, PROBE_S * 2)
        except Exception:  # never keep an instance from going local: Redis's own check remains
            log.exception("store: raising the outage fence failed")

    async def _heartbeats(self) -> None:
        while True:
            if self._local is None:
                await self._beat_once()
            else:
                await self._probe()
            # Settling, Redis answers: beat as usual (the tick stays fresh, or the first acquire
            # after the switch would find a silence and fence everyone again).
            healthy = self._local is None or self._settling
            pause = self._heartbeat_s if healthy else max(self._heartbeat_s, PROBE_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)
            self._wake.clear()

    async def _beat_once(self) -> None:
        if self._beat is None:
            return
        try:
            self.instances = max(1, int(await self._beat()))
        except Exception as exc:  # keep the last count; Redis is away: go local now
            # Every instance beats every BEAT_S, so every one notices an outage, not only
            # those with an acquire in flight: one that noticed nothing would admit from a
            # Redis that came back empty before the others wrote back.
            await self._degrade(StoreUnavailable(f"redis unavailable during heartbeat: {type(exc).__name__}"))

    async def _ping(self) -> None:
        """Is Redis there? A heartbeat (its count is not taken: the shares stay as they
        were through the outage), which finds a silence and raises the fence if it runs
        first after a stall."""
        if self._beat is None:
            await self.primary.ping()
            return
        try:
            await self._beat()
        except Exception as exc:
            raise StoreUnavailable(f"redis unavailable during heartbeat: {type(exc).__name__}") from exc

    async def _probe(self) -> None:
        """While degraded: is Redis back? Then write back, settle, and switch."""
        local = self._local
        assert local is not None
        try:
            await self._ping()
            if not self._settling:
                # From now on nothing is admitted here until the switch: an instance that
                # admitted locally while another admits from Redis would put the account over.
                self._settling_until = time.monotonic() + self._settle_s
                self._settled.clear()
                if not self._fenced:  # Redis may have restarted empty: fence the quiet ones
                    await self._raise_fence()
                await self._write_back()
                log.warning("store: Redis answers again; leases written back, switching in %.1fs",
                            self._settle_s)  # fmt: skip
                return
            if time.monotonic() < self._settling_until:
                return
        except StoreUnavailable as exc:
            self._settling_until = 0.0
            self._settled.set()  # gone again: local admission goes on
            log.debug("store: Redis still unavailable (%s)", exc.detail)
            return
        self._local, self._settling_until = None, 0.0
        self._settled.set()
        self._local_only.clear()  # their leases were written back: released in Redis from now
        self._fenced = False
        lasted = time.monotonic() - self.outage.since
        self.outage.degraded, self.outage.last_s = False, lasted
        log.warning("store: back on Redis after an outage of %.1fs", lasted)
        await self._beat_once()
        for callback in self._callbacks:
            callback(RESYNC)  # every waiter is asked again, of Redis

    async def _write_back(self) -> None:
        """The leases this instance holds, into Redis, with the time each has left: window
        leases all (Redis may have come back empty), concurrency leases granted or renewed
        during the outage only."""
        for ticket in list(self._held):
            await self._write_back_ticket(ticket)

    async def _write_back_ticket(self, ticket: str) -> None:
        now = self._clock.now_ms()
        for limit, end in list(self._held.get(ticket, {}).values()):
            if end > now and (limit.kind is Kind.WINDOW or ticket in self._during):
                await self.primary.renew(ticket, limit, end - now, create=True)
