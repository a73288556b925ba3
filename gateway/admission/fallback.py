"""Life through a Redis outage: admit locally, within this instance's share, until Redis returns.

``FallbackStore`` wraps the shared store (Redis). While Redis answers it is a pass-through
that remembers what THIS instance was granted (its window leases still counting, its
concurrency leases), at the cost of one dict write per admission. When Redis stops answering
and ``redis.on_outage`` is ``fail_open``, admissions go to an embedded store (``MemoryStore``,
the same semantics) holding this instance's SHARE of every limit:

    share(limit) = capacity // live instances      (at least 0)

where the number of live instances is the last one read from the instances' heartbeats in
Redis. The embedded store starts with what this instance was granted before the outage
(window leases still inside their lease life, concurrency leases held), so in every window
the instance admits at most its share, counting the tokens it took just before Redis
stopped answering. Across the account, during the outage:

    arrivals upstream in any window  <=  sum of the instances' shares  <=  capacity

provided the instances alive are the ones counted (an instance started during the outage,
never seen in a heartbeat, is not; its admissions come on top). Waiters move to the local
store (their tickets, unknown there, are evaluated afresh in their order), so nobody gets a
503 because Redis died; with a share of 0 (more instances than tokens) they wait.

When Redis answers again, this instance writes back every lease it holds locally (window and
concurrency, each with the time it has left: ``renew(create=True)``), so the shared view is
not emptier than upstream's, keeps admitting locally for ``settle_s`` (so every other
instance notices the return and writes back its own), then switches back and resynchronises
its waiters. Releases of tickets granted locally go to both stores (harmless twice).

``fail_closed`` is the behaviour without this module: ``StoreUnavailable`` (503 at once,
charged nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..clock import Clock
from ..errors import StoreUnavailable
from .health import supervise
from .keys import Keys
from .limits import Limit
from .memory import MemoryStore
from .store import RESYNC, AcquireRequest, AcquireResult, Status, Store, WakeCallback

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # how often an instance says it is alive (and, while degraded, probes Redis)
ALIVE_S = 5.0  # an instance not heard of for this long is not counted
SETTLE_S = 2.0  # after Redis returns: keep admitting locally this long, so every instance writes back

# One heartbeat: this instance's entry, the stale ones dropped, how many are alive (Redis TIME).
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""


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
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        """``primary``: the shared store. ``beat()``: one heartbeat in Redis, returning the
        number of live instances (this one included); None counts this instance alone."""
        self.primary = primary
        self._clock = clock
        self._beat = beat
        self._settle_s = settle_s
        self._heartbeat_s = heartbeat_s
        self.instances = 1  # the last count read from the heartbeats
        self.outage = Outage()
        self._local: MemoryStore | None = None
        self._settling_until = 0.0
        # What this instance holds, for the local store's start and the write-back:
        # ticket -> {limit name: (limit, end in this instance's clock ms)}.
        self._held: dict[str, dict[str, tuple[Limit, int]]] = {}
        self._callbacks: list[WakeCallback] = []
        self._local_only: set[str] = set()  # tickets first seen while degraded: not in Redis
        self._task: asyncio.Task[None] | None = None
        self._next_prune = 0

    # -- the verbs ---------------------------------------------------------------------------
    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        if self._local is None:
            try:
                result = await self.primary.acquire(request)
            except StoreUnavailable as exc:
                await self._degrade(exc)
            else:
                if result.status is Status.ADMITTED:
                    self._granted(request.ticket, request.limits)
                return result
        assert self._local is not None
        if request.seq == 0:  # its first acquire: Redis never saw this ticket
            self._local_only.add(request.ticket)
        result = await self._local.acquire(request._replace(limits=self._shares(request.limits)))
        if result.status is Status.ADMITTED:
            self._granted(request.ticket, request.limits)
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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
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

    # -- shares ------------------------------------------------------------------------------
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

    # -- outage and return -------------------------------------------------------------------
    async def _degrade(self, exc: StoreUnavailable) -> None:
        if self._local is not None:
            return
        local = MemoryStore(self._clock)
        self._local = local
        self.outage.degraded, self.outage.since = True, time.monotonic()
        self.outage.count += 1
        log.error(
            "store: Redis unavailable (%s); admitting locally within this instance's share "
            "(1/%d of every limit) until it returns",
            exc.detail,
            self.instances,
        )
        # What this instance was granted and still counts, it counts locally too (before any
        # local admission: nothing here awaits anything but the embedded store).
        now = self._clock.now_ms()
        for ticket, held in list(self._held.items()):
            for limit, end in list(held.values()):
                if end > now:
                    await local.renew(ticket, self._share(limit), end - now, create=True)
        for callback in self._callbacks:  # its wake-ups; RESYNC: every head is asked again
            await local.subscribe(callback)

    async def _heartbeats(self) -> None:
        while True:
            if self._local is None:
                await self._beat_once()
            else:
                await self._probe()
            await asyncio.sleep(self._heartbeat_s)

    async def _beat_once(self) -> None:
        if self._beat is None:
            return
        try:
            self.instances = max(1, int(await self._beat()))
        except Exception as exc:  # the next acquire finds out for itself; keep the last count
            log.debug("store heartbeat failed: %s", exc)

    async def _probe(self) -> None:
        """While degraded: is Redis back? Then write back, settle, and switch."""
        local = self._local
        assert local is not None
        try:
            await self.primary.ping()
            if not self._settling:
                await self._write_back()
                self._settling_until = time.monotonic() + self._settle_s
                log.warning("store: Redis answers again; leases written back, switching in %.1fs",
                            self._settle_s)  # fmt: skip
                return
            if time.monotonic() < self._settling_until:
                await self._write_back()  # what was granted meanwhile, too
                return
            await self._write_back()
        except StoreUnavailable as exc:
            self._settling_until = 0.0
            log.debug("store: Redis still unavailable (%s)", exc.detail)
            return
        self._local, self._settling_until = None, 0.0
        self._local_only.clear()  # their leases were written back: released in Redis from now
        lasted = time.monotonic() - self.outage.since
        self.outage.degraded, self.outage.last_s = False, lasted
        log.warning("store: back on Redis after an outage of %.1fs", lasted)
        await self._beat_once()
        for callback in self._callbacks:
            callback(RESYNC)  # every waiter is asked again, of Redis

    async def _write_back(self) -> None:
        """Every lease this instance holds, into Redis, with the time it has left."""
        now = self._clock.now_ms()
        for ticket, held in list(self._held.items()):
            for limit, end in list(held.values()):
                if end > now:
                    await self.primary.renew(ticket, limit, end - now, create=True)


def heartbeat(client: Any, keys: Keys, instance: str | None = None) -> Callable[[], Awaitable[int]]:
    """One heartbeat in Redis for this instance: returns how many instances are alive."""
    script = client.register_script(HEARTBEAT_LUA)
    me = instance or os.urandom(6).hex()
    alive_ms = str(int(ALIVE_S * 1000))

    async def beat() -> int:
        return int(await asyncio.wait_for(script(keys=[keys.instances], args=[me, alive_ms]), 1.0))

    return beat
