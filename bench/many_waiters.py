"""10,000 waiters must not flood Redis: store calls per admission, with many waiting.

Three admission engines (as three gateway instances would hold them) share one real Redis
and one window limit. WAITERS requests arrive at once; the limit admits CAPACITY per WINDOW.
Reports store round trips per admission (ADMISSION.md I7: about 3 + instances, however many
wait), against the same run with only a few waiters (2 x CAPACITY) as the baseline, how far
admissions trail the ideal schedule (the limit's full rate), and the admission lag once
capacity frees: for each admission after the first window's, from the moment its token came
free (the lease it takes the place of ended: the admission CAPACITY before it, in Redis's
order, plus the lease's life) to the moment its waiter had its grant; p50/p99/max, and the
part of it Redis took to decide (the rest is the reply, the wake-up and the event loop).
Redis's clock (TIME) and ``time.time()`` are the same clock on one host.

    python bench/many_waiters.py                      # 10,000 waiters, redis://127.0.0.1:6379/15
    python bench/many_waiters.py --waiters 2000 --redis redis://127.0.0.1:6379/0   # the baseline alone
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

from gateway.admission.engine import AdmissionEngine
from gateway.admission.keys import Keys
from gateway.admission.limits import RANK_WINDOW, Limit, window_limit
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.redis_store import RedisStore, make_client
from gateway.admission.store import AcquireRequest, AcquireResult
from gateway.clock import SystemClock

INSTANCES = 3


class Counting(RedisStore):
    """The store as the gateway runs it, counting its calls and noting when (Redis's clock,
    ms) each ticket was admitted."""

    calls: Counter[str]
    decided_ms: dict[str, int]

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        self.calls["acquire"] += 1
        result = await super().acquire(request)
        if result.admitted:
            self.decided_ms[request.ticket] = result.now_ms
        return result

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        self.calls["release"] += 1
        return await super().release(ticket, limits, tombstone=tombstone)

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        self.calls["refresh"] += 1
        return await super().refresh(limits, tickets, ttl_ms)


class Lag(NamedTuple):
    """Seconds from a token coming free to its waiter's grant (``total``), and to Redis's
    decision (``decided``), for every admission after the first window's."""

    total: list[float]
    decided: list[float]

    def line(self) -> str:
        def q(xs: list[float]) -> str:
            return (
                f"p50 {percentile(xs, 50) * 1000:.1f} ms, p99 {percentile(xs, 99) * 1000:.1f} ms, "
                f"max {max(xs) * 1000:.1f} ms"
            )

        return (
            f"admission lag once capacity frees ({len(self.total):,} admissions): {q(self.total)}"
            f"\n          of which Redis deciding: {q(self.decided)}"
        )

    @property
    def p99(self) -> float:
        return percentile(self.total, 99)


def percentile(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else xs[0]


def lag(granted: list[tuple[float, str]], decided_ms: dict[str, int], capacity: int, lease_ms: int) -> Lag:
    """``granted``: (wall time of the grant, ticket) per admission."""
    rows = sorted((decided_ms[ticket] / 1000, at) for at, ticket in granted)
    total, decided = [], []
    for k in range(capacity, len(rows)):
        free = rows[k - capacity][0] + lease_ms / 1000  # the lease this admission replaces ended
        total.append(rows[k][1] - free)
        decided.append(rows[k][0] - free)
    return Lag(total, decided)


async def run(
    url: str, waiters: int, capacity: int, window_s: float
) -> tuple[float, float, Counter[str], Lag]:
    keys = Keys(prefix="bench" + uuid.uuid4().hex[:8])
    limit = window_limit("requests", capacity, window_s, 20, rank=RANK_WINDOW)
    clients, engines = [], []
    for _ in range(INSTANCES):
        client = make_client(url, timeout_ms=5000, pool_size=32)
        store = Counting(client, keys, pipelined=PipelinedRedis(url, timeout_ms=5000))  # as the gateway runs
        store.calls, store.decided_ms = Counter(), {}
        engine = AdmissionEngine(store, SystemClock())
        await engine.start()
        clients.append(client)
        engines.append(engine)
    try:
        start = time.perf_counter()
        granted: list[tuple[float, str]] = []

        async def one(i: int) -> None:
            grant = await engines[i % INSTANCES].admit([limit], max_wait_s=3600)
            granted.append((time.time(), grant.ticket))

        await asyncio.gather(*(one(i) for i in range(waiters)))
        elapsed = time.perf_counter() - start
        ideal = ((waiters - 1) // capacity) * (limit.lease_ms / 1000)
        calls: Counter[str] = Counter()
        decided_ms: dict[str, int] = {}
        for engine in engines:
            calls.update(engine.store.calls)  # type: ignore[attr-defined]
            decided_ms.update(engine.store.decided_ms)  # type: ignore[attr-defined]
        return elapsed, ideal, calls, lag(granted, decided_ms, capacity, limit.lease_ms)
    finally:
        for engine in engines:
            await engine.close()
            await engine.store.close()
        for client in clients:
            async for key in client.scan_iter(match=f"{keys.prefix}:*"):
                await client.delete(key)
            await client.aclose()


async def main(args: argparse.Namespace) -> None:
    if args.waiters <= args.capacity:
        raise SystemExit(f"--waiters must be above --capacity ({args.capacity}): else no one waits")
    print(f"{INSTANCES} instances, one Redis, a window of {args.capacity} per {args.window_s:g}s\n")
    baseline = args.capacity * 2
    # The baseline, then the many; --waiters at or below the baseline runs alone (run-all
    # uses it for the memory baseline).
    counts = (baseline, args.waiters) if args.waiters > baseline else (args.waiters,)
    rows = []
    for waiters in counts:
        elapsed, ideal, calls, lags = await run(args.redis, waiters, args.capacity, args.window_s)
        per = sum(calls.values()) / waiters
        rows.append((waiters, per, lags))
        detail = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        print(f"{waiters:>6} waiters: {per:.2f} store calls per admission ({detail})")
        print(
            f"        all admitted in {elapsed:.2f}s; the limit's own schedule needs {ideal:.2f}s"
            f" ({elapsed / ideal:.3f}x)"
        )
        print(f"        {lags.line()}")
    if len(rows) == 2:
        (few, few_per, few_lag), (many, many_per, many_lag) = rows
        print(f"\nratio of calls per admission, {many} waiters vs {few}: {many_per / few_per:.2f}")
        print(
            f"admission lag p99, {many} waiters vs {few}: {many_lag.p99 * 1000:.1f} ms vs "
            f"{few_lag.p99 * 1000:.1f} ms ({many_lag.p99 / few_lag.p99:.2f}x)"
        )
    print(f"bound on calls per admission (3 + instances): {3 + INSTANCES}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument("--window-s", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))
