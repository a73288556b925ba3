"""10,000 waiters must not flood Redis: store calls per admission, with many waiting.

Three admission engines (as three gateway instances would hold them) share one real Redis
and one window limit. WAITERS requests arrive at once; the limit admits CAPACITY per WINDOW.
Reports store round trips per admission (ADMISSION.md I7: about 3 + instances, however many
wait), against the same run with only a few waiters as the baseline, and how far admissions
trail the ideal schedule (the limit's full rate).

    python bench/many_waiters.py                      # 10,000 waiters, redis://127.0.0.1:6379/15
    python bench/many_waiters.py --waiters 2000 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from gateway.admission.engine import AdmissionEngine
from gateway.admission.keys import Keys
from gateway.admission.limits import RANK_WINDOW, Limit, window_limit
from gateway.admission.pipelined import PipelinedRedis
from gateway.admission.redis_store import RedisStore, make_client
from gateway.admission.store import AcquireRequest, AcquireResult
from gateway.clock import SystemClock

INSTANCES = 3


class Counting(RedisStore):
    calls: Counter[str]

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        self.calls["acquire"] += 1
        return await super().acquire(request)

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        self.calls["release"] += 1
        return await super().release(ticket, limits, tombstone=tombstone)

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        self.calls["refresh"] += 1
        return await super().refresh(limits, tickets, ttl_ms)


async def run(url: str, waiters: int, capacity: int, window_s: float) -> tuple[float, float, Counter[str]]:
    keys = Keys(prefix="bench" + uuid.uuid4().hex[:8])
    limit = window_limit("requests", capacity, window_s, 20, rank=RANK_WINDOW)
    clients, engines = [], []
    for _ in range(INSTANCES):
        client = make_client(url, timeout_ms=5000, pool_size=32)
        store = Counting(client, keys, pipelined=PipelinedRedis(url, timeout_ms=5000))  # as the gateway runs
        store.calls = Counter()
        engine = AdmissionEngine(store, SystemClock())
        await engine.start()
        clients.append(client)
        engines.append(engine)
    try:
        start = time.perf_counter()
        done_at: list[float] = []

        async def one(i: int) -> None:
            await engines[i % INSTANCES].admit([limit], max_wait_s=3600)
            done_at.append(time.perf_counter() - start)

        await asyncio.gather(*(one(i) for i in range(waiters)))
        elapsed = time.perf_counter() - start
        ideal = ((waiters - 1) // capacity) * (limit.lease_ms / 1000)
        calls: Counter[str] = Counter()
        for engine in engines:
            calls.update(engine.store.calls)  # type: ignore[attr-defined]
        return elapsed, ideal, calls
    finally:
        for engine in engines:
            await engine.close()
            await engine.store.close()
        for client in clients:
            async for key in client.scan_iter(match=f"{keys.prefix}:*"):
                await client.delete(key)
            await client.aclose()


async def main(args: argparse.Namespace) -> None:
    print(f"{INSTANCES} instances, one Redis, a window of {args.capacity} per {args.window_s:g}s\n")
    rows = []
    for waiters in (args.capacity * 2, args.waiters):
        elapsed, ideal, calls = await run(args.redis, waiters, args.capacity, args.window_s)
        per = sum(calls.values()) / waiters
        rows.append((waiters, per))
        detail = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        print(f"{waiters:>6} waiters: {per:.2f} store calls per admission ({detail})")
        print(
            f"        all admitted in {elapsed:.2f}s; the limit's own schedule needs {ideal:.2f}s"
            f" ({elapsed / ideal:.3f}x)"
        )
    print(
        f"\nratio of calls per admission, {rows[1][0]} waiters vs {rows[0][0]}: {rows[1][1] / rows[0][1]:.2f}"
    )
    print(f"bound (3 + instances): {3 + INSTANCES}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--capacity", type=int, default=1000)
    parser.add_argument("--window-s", type=float, default=1.0)
    asyncio.run(main(parser.parse_args()))
