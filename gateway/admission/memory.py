"""The embedded store: the Redis scripts' semantics inside one process, on an injected clock.

It mirrors lua/acquire.lua, release.lua and refresh.lua step for step (same data model, same
answers; the contract suite holds them to it), so a single instance needs no Redis. Two
instances on embedded stores would each allow the full limit: /readyz and the start-up log
say which store is in use.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterator, Sequence

from ..clock import Clock
from .health import renewed
from .limits import Limit
from .store import (
    FIRST_MAX,
    RESYNC,
    SEQ_SPAN,
    AcquireRequest,
    AcquireResult,
    LimitState,
    Status,
    WakeCallback,
)

TOMBSTONE_MS = 60_000
ENDED_MS = 60_000
SWEEP_MS = 10_000


class ZSet:
    """A small sorted set: member -> score, ordered by (score, member) like Redis."""

    __slots__ = ("_scores", "_order")

    def __init__(self) -> None:
        self._scores: dict[str, float] = {}
        self._order: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, member: str) -> bool:
        return member in self._scores

    def score(self, member: str) -> float | None:
        return self._scores.get(member)

    def add(self, member: str, score: float) -> None:
        self.remove(member)
        self._scores[member] = score
        bisect.insort(self._order, (score, member))

    def update(self, member: str, score: float) -> bool:
        """ZADD XX: only an existing member's score changes."""
        if member not in self._scores:
            return False
        self.add(member, score)
        return True

    def remove(self, member: str) -> bool:
        old = self._scores.pop(member, None)
        if old is None:
            return False
        i = bisect.bisect_left(self._order, (old, member))
        del self._order[i]
        return True

    def count_below(self, score: float) -> int:
        """ZCOUNT -inf (score."""
        return bisect.bisect_left(self._order, (score, ""))

    def count_above(self, score: float) -> int:
        """ZCOUNT (score +inf."""
        return len(self._order) - bisect.bisect_right(self._order, (score, "\U0010ffff"))

    def pop_upto(self, score: float) -> list[str]:
        """ZRANGEBYSCORE -inf score, then remove them."""
        end = bisect.bisect_right(self._order, (score, "\U0010ffff"))
        gone = [m for _, m in self._order[:end]]
        del self._order[:end]
        for m in gone:
            del self._scores[m]
        return gone

    def at(self, index: int) -> tuple[float, str] | None:
        return self._order[index] if 0 <= index < len(self._order) else None

    def __iter__(self) -> Iterator[tuple[float, str]]:
        return iter(list(self._order))


class MemoryStore:
    kind = "memory"

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._leases: dict[str, ZSet] = {}
        self._wait: dict[str, ZSet] = {}
        self._dead: dict[str, ZSet] = {}
        self._resv: dict[str, ZSet] = {}
        self._seq = 0
        self._tombs: dict[str, int] = {}
        self._ended: dict[str, int] = {}  # ticket -> until when a renewal may not restore its lease
        # The owners' shares of the queue (share:dead, share:owner, share:lex in Redis).
        self._share_dead = ZSet()  # waiting ticket with an owner -> deadline
        self._share_owner: dict[str, str] = {}  # ticket -> owner
        self._shares: dict[str, set[str]] = {}  # owner -> its waiting tickets
        self._subscribers: list[WakeCallback] = []
        self._swept = clock.now_ms()

    # -- helpers ---------------------------------------------------------------------------
    def _z(self, table: dict[str, ZSet], name: str) -> ZSet:
        z = table.get(name)
        if z is None:
            z = table[name] = ZSet()
        return z

    def _publish(self, names: Sequence[str]) -> None:
        """Deliver wake-up messages to subscribers, after this call returns (like Redis)."""
        if not names or not self._subscribers:
            return
        loop = asyncio.get_running_loop()
        for name in names:
            for callback in self._subscribers:
                loop.call_soon(callback, name)

    def _purge(self, limit: str, now: int, earlier: Sequence[Limit] = ()) -> bool:
        """Drop lapsed leases/reservations and dead tickets; True if a queue lost a ticket."""
        self._z(self._leases, limit).pop_upto(now)
        dead = self._z(self._dead, limit).pop_upto(now)
        wait = self._z(self._wait, limit)
        for ticket in dead:
            wait.remove(ticket)
            for other in earlier:
                self._z(self._resv, other.name).remove(ticket)
        return bool(dead)

    def _gc(self, limits: Sequence[Limit]) -> None:
        for limit in limits:
            for table in (self._leases, self._wait, self._dead, self._resv):
                z = table.get(limit.name)
                if z is not None and not len(z):
                    del table[limit.name]
        now = self._clock.now_ms()
        if now - self._swept >= SWEEP_MS:
            # What key expiry does in Redis: buckets nobody uses (a model tried once) go away.
            self._swept = now
            self._prune_shares(now)
            for name in list(self._leases.keys() | self._dead.keys() | self._resv.keys()):
                self._purge(name, now)
                resv, leases = self._resv.get(name), self._leases.get(name)
                for _, holder in list(resv or ()):
                    if leases is None or holder + ":r" not in leases:
                        resv.remove(holder)  # type: ignore[union-attr]
                for table in (self._leases, self._wait, self._dead, self._resv):
                    z = table.get(name)
                    if z is not None and not len(z):
                        del table[name]

    def _leave_share(self, ticket: str) -> None:
        owner = self._share_owner.pop(ticket, None)
        if owner is not None:
            mine = self._shares.get(owner)
            if mine is not None:
                mine.discard(ticket)
                if not mine:
                    del self._shares[owner]
        self._share_dead.remove(ticket)

    def _join_share(self, ticket: str, owner: str, deadline: int) -> None:
        self._share_dead.add(ticket, deadline)
        self._share_owner[ticket] = owner
        self._shares.setdefault(owner, set()).add(ticket)

    def _prune_shares(self, now: int) -> None:
        """Lapsed share entries go (their tickets' deadlines passed: an instance died)."""
        for ticket in self._share_dead.pop_upto(now):
            self._leave_share(ticket)

    def _share_count(self, owner: str, now: int) -> int:
        self._prune_shares(now)
        return len(self._shares.get(owner, ()))

    def share_size(self) -> int:
        """Entries held for owners' shares (tests: nothing is left behind)."""
        return len(self._share_dead) + len(self._share_owner) + sum(map(len, self._shares.values()))

    def limit_names(self) -> set[str]:
        """The limits this store holds any state for (what KEYS would show in Redis)."""
        return set(self._leases) | set(self._wait) | set(self._dead)

    def _tombstoned(self, ticket: str, now: int) -> bool:
        until = self._tombs.get(ticket)
        if until is None:
            return False
        if until <= now:
            del self._tombs[ticket]
            return False
        return True

    # -- verbs -----------------------------------------------------------------------------
    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        now = self._clock.now_ms()
        ticket, limits, n = request.ticket, request.limits, len(request.limits)
        resv = ticket + ":r"
        prio = min(max(request.priority, 0), 99)
        seq = request.seq
        if self._tombstoned(ticket, now):
            return AcquireResult(Status.ABORTED, seq)
        if seq == 0:
            self._seq = max(self._seq + 1, request.floor + 1)
            seq = self._seq
        else:
            self._seq = max(self._seq, seq)
        score = (99 - prio) * SEQ_SPAN + seq

        publish = [False] * n
        inherited: list[str] = []
        for i, limit in enumerate(limits):
            publish[i] = self._purge(limit.name, now, limits[:i])

        cur_q = -1
        for i, limit in enumerate(limits):
            s = self._z(self._wait, limit.name).score(ticket)
            if s is not None:
                cur_q = i
                score = min(score, int(s))

        holds: list[str | None] = [None] * n
        blocked, ahead_b, free_b = -1, 0, 0
        for i, limit in enumerate(limits):
            leases = self._z(self._leases, limit.name)
            if ticket in leases:
                holds[i] = "l"
            elif resv in leases:
                holds[i] = "r"
            else:
                free = limit.capacity - len(leases)
                ahead = self._z(self._wait, limit.name).count_below(score)
                if ahead >= free:
                    blocked, ahead_b, free_b = i, ahead, free
                    break

        def leave_queue(i: int) -> None:
            self._z(self._wait, limits[i].name).remove(ticket)
            self._z(self._dead, limits[i].name).remove(ticket)

        def done(result: AcquireResult) -> AcquireResult:
            self._publish([limits[i].name for i in range(n) if publish[i]] + inherited)
            self._gc(limits)
            return result

        if blocked < 0:
            states = []
            owed = 0
            for i, limit in enumerate(limits):
                leases = self._z(self._leases, limit.name)
                if holds[i] != "l":
                    leases.remove(resv)
                    self._z(self._resv, limit.name).remove(ticket)
                    leases.add(ticket, now + limit.lease_ms)
                else:  # held already (a re-run, or a lost reply): it counts from now, never less
                    leases.add(ticket, max(leases.score(ticket) or 0, now + limit.lease_ms))
                if cur_q == i:
                    leave_queue(i)
                    self._leave_share(ticket)
                first = leases.at(0)
                reset = int(first[0]) - now if first else 0
                states.append(LimitState(limit.capacity - len(leases), max(0, reset)))
                queue = self._z(self._wait, limit.name)
                if cur_q == i and states[-1].remaining > 0 and len(queue):
                    owed = int(queue.at(min(states[-1].remaining, len(queue)) - 1)[0])  # type: ignore[index]
            result = AcquireResult(Status.ADMITTED, seq, score, states=tuple(states), now_ms=now, owed=owed)
            return done(result)

        # The owner's share (see acquire.lua): only a ticket about to start waiting is refused.
        mine = -1
        if cur_q < 0 and request.owner_depth >= 0:
            mine = self._share_count(request.owner, now)
            if mine < request.owner_depth:
                mine = -1

        if mine >= 0 or (cur_q != blocked and ahead_b >= request.max_depth):
            for i, limit in enumerate(limits):
                if holds[i] == "r":
                    self._z(self._leases, limit.name).remove(resv)
                    self._z(self._resv, limit.name).remove(ticket)
                    publish[i] = True
            if cur_q >= 0:
                leave_queue(cur_q)
                self._leave_share(ticket)
                publish[cur_q] = True
            if mine >= 0:
                return done(AcquireResult(Status.SHARE_FULL, seq, score, blocked=blocked + 1, ahead=mine))
            return done(AcquireResult(Status.FULL, seq, score, blocked=blocked + 1, ahead=ahead_b))

        deadline = now + request.ttl_ms
        for i, limit in enumerate(limits):
            leases = self._z(self._leases, limit.name)
            if i < blocked:
                if holds[i] != "l":
                    leases.add(resv, deadline)
                    self._z(self._resv, limit.name).add(ticket, score)
            elif holds[i] == "r":
                leases.remove(resv)
                self._z(self._resv, limit.name).remove(ticket)
                publish[i] = True
        if cur_q != blocked and cur_q >= 0:
            leave_queue(cur_q)
            if cur_q > blocked:
                publish[cur_q] = True
        blocking = limits[blocked].name
        self._z(self._wait, blocking).add(ticket, score)
        self._z(self._dead, blocking).add(ticket, deadline)
        if request.owner_depth >= 0:
            self._join_share(ticket, request.owner, deadline)

        # Priority inheritance (see acquire.lua).
        band = score // SEQ_SPAN
        resv_b = self._z(self._resv, blocking)
        for hscore, holder in list(resv_b):
            if hscore < (band + 1) * SEQ_SPAN:
                continue
            if holder + ":r" not in self._z(self._leases, blocking):
                resv_b.remove(holder)
                continue
            lifted = band * SEQ_SPAN + int(hscore) % SEQ_SPAN
            for limit in limits:
                self._z(self._resv, limit.name).update(holder, lifted)
            for j in range(blocked + 1, n):
                wait_j = self._z(self._wait, limits[j].name)
                if holder in wait_j:
                    wait_j.add(holder, lifted)
                    inherited.append(f"{limits[j].name}\t{holder}\t{lifted}")
                    break

        hint = request.ttl_ms
        k = ahead_b - free_b
        if k >= 0:
            entry = self._z(self._leases, blocking).at(k)
            if entry is not None:
                hint = min(hint, int(entry[0]) - now)
        first_dead = self._z(self._dead, blocking).at(0)
        if first_dead is not None and first_dead[1] != ticket:
            hint = min(hint, int(first_dead[0]) - now)
        hint = max(hint, 1)
        wait_b = self._z(self._wait, blocking)
        firsts = []
        for f in range(min(ahead_b, max(free_b, 1), FIRST_MAX)):
            entry = wait_b.at(f)
            if entry is not None:
                firsts.append((entry[1], int(entry[0])))
        result = AcquireResult(Status.BLOCKED, seq, score, blocked=blocked + 1, ahead=ahead_b, wait_ms=hint)
        return done(result._replace(first=tuple(firsts), now_ms=now))

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        removed = 0
        names = []
        now = self._clock.now_ms()
        for i, limit in enumerate(limits):
            if self._purge(limit.name, now, limits[:i]):  # lapsed entries first, as acquire does
                names.append(limit.name)
            leases = self._z(self._leases, limit.name)
            lease = leases.remove(ticket)
            if lease:  # the "ended" marker (release.lua): a racing renewal never restores it
                if len(self._ended) > 1024:
                    self._ended = {t: until for t, until in self._ended.items() if until > now}
                self._ended[ticket] = now + ENDED_MS
            got = int(lease) + int(leases.remove(ticket + ":r"))
            got += int(self._z(self._wait, limit.name).remove(ticket))
            self._z(self._dead, limit.name).remove(ticket)
            self._z(self._resv, limit.name).remove(ticket)
            if got:
                removed += got
                names.append(limit.name)
        self._leave_share(ticket)
        if tombstone:
            if len(self._tombs) > 1024:  # what Redis's key expiry does for the Redis store
                self._tombs = {t: until for t, until in self._tombs.items() if until > now}
            self._tombs[ticket] = now + TOMBSTONE_MS
        self._publish(names)
        self._gc(limits)
        return removed

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        if not tickets:
            return []
        now = self._clock.now_ms()
        deadline = now + ttl_ms
        self._publish(
            [limit.name for i, limit in enumerate(limits) if self._purge(limit.name, now, limits[:i])]
        )
        out = []
        for ticket in tickets:
            where = 0
            for i, limit in enumerate(limits, start=1):
                if ticket in self._z(self._dead, limit.name):
                    where = i
            if where:
                self._z(self._dead, limits[where - 1].name).update(ticket, deadline)
                for limit in limits[: where - 1]:
                    self._z(self._leases, limit.name).update(ticket + ":r", deadline)
                self._share_dead.update(ticket, deadline)
            else:
                self._leave_share(ticket)
            out.append(where)
        self._gc(limits)
        return out

    async def renew(self, ticket: str, limit: Limit, ttl_ms: int, *, create: bool = False) -> bool:
        """Mirrors lua/renew.lua."""
        now = self._clock.now_ms()
        leases = self._z(self._leases, limit.name)
        leases.pop_upto(now)
        if leases.update(ticket, now + ttl_ms):
            outcome = 1
        elif create and self._ended.get(ticket, 0) <= now:
            leases.add(ticket, now + ttl_ms)
            outcome = 3 if len(leases) > limit.capacity else 2
        else:
            outcome = 0
        return renewed(ticket, limit, outcome)

    def hold(self, ticket: str, limit: Limit, ttl_ms: int) -> None:
        """Put a lease held elsewhere in place as it is, whatever the count (fallback.py
        starts the local store with what this instance held): not a restoration, no log."""
        self._z(self._leases, limit.name).add(ticket, self._clock.now_ms() + ttl_ms)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        now = self._clock.now_ms()
        leases = self._leases.get(limit.name)
        dead = self._dead.get(limit.name)
        return (leases.count_above(now) if leases else 0, dead.count_above(now) if dead else 0)

    async def subscribe(self, callback: WakeCallback) -> None:
        self._subscribers.append(callback)
        asyncio.get_running_loop().call_soon(callback, RESYNC)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()

    def __repr__(self) -> str:
        used = {name: len(z) for name, z in self._leases.items()}
        waiting = {name: len(z) for name, z in self._wait.items()}
        return f"MemoryStore(leases={used}, waiting={waiting})"
