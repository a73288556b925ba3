"""The Redis client's cost per admission: CPU the gateway process spends on one acquire.

One admission is one EVALSHA of the acquire script (gateway/admission/lua/acquire.lua), made
by the product's own ``RedisStore.acquire`` (argument building, error translation, reply
parsing). Only the client underneath changes:

    redis-py hiredis          gateway.admission.redis_store.make_client, as shipped
                              (BlockingConnectionPool, hiredis parser, health checks every 10 s)
    redis-py hiredis, plain pool
                              the same with redis-py's non-blocking ConnectionPool
    redis-py python-parser    BlockingConnectionPool with redis._parsers._AsyncRESP2Parser
    pipelined (hot path)      gateway.admission.pipelined.PipelinedRedis under RedisStore,
                              as the gateway runs it on one server
    pipelined, located        the same with a ``locate`` (how Cluster and Sentinel point it at
                              the account's server: topology.py), here naming the same server
    lean hiredis protocol     a 60-line asyncio.Protocol: one pipelined connection, commands
                              packed by hiredis.pack_command, replies parsed by hiredis.Reader,
                              every call bounded by asyncio.timeout (what a hand-rolled
                              client could save; a lower bound, not a drop-in)

each on asyncio and on uvloop. C tasks (32) share the client and issue N acquires (4000);
the figure is the process's CPU time (time.process_time) per acquire, medians over
interleaved rounds, and its ratio to the shipped client on the same loop. Redis itself is a
private redis-server on a free port (flushed between runs, killed at the end); its CPU is
not counted.

Run:   python bench/redis_client.py            (3 rounds, about 30 s)
       python bench/redis_client.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's gateway package

import hiredis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import uvloop  # noqa: E402
from redis import exceptions as redis_errors  # noqa: E402
from redis._parsers import _AsyncRESP2Parser  # noqa: E402

from gateway.admission.keys import Keys  # noqa: E402
from gateway.admission.limits import RANK_WINDOW, window_limit  # noqa: E402
from gateway.admission.pipelined import PipelinedRedis  # noqa: E402
from gateway.admission.redis_store import RedisStore, make_client  # noqa: E402
from gateway.admission.store import AcquireRequest, Status  # noqa: E402

sys.path.insert(0, str(HERE))
from processes import Processes, start_redis  # noqa: E402

LIMIT = window_limit("requests", 10_000_000, 300, 100, rank=RANK_WINDOW)
TIMEOUT_S = 0.25


class LeanProtocol(asyncio.Protocol):
    """One Redis connection: requests pipelined, replies matched to callers in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(redis_errors.ConnectionError("connection lost"))


class LeanClient:
    def __init__(self, protocol: LeanProtocol) -> None:
        self.protocol = protocol

    @classmethod
    async def connect(cls, host: str, port: int) -> LeanClient:
        _, protocol = await asyncio.get_running_loop().create_connection(LeanProtocol, host, port)
        return cls(protocol)

    async def execute(self, *args: Any) -> Any:
        p = self.protocol
        assert p.transport is not None
        waiter = asyncio.get_running_loop().create_future()
        p.waiters.append(waiter)
        p.transport.write(hiredis.pack_command(args))
        async with asyncio.timeout(TIMEOUT_S):
            reply = await waiter
        if isinstance(reply, hiredis.ReplyError):
            raise redis_errors.ResponseError(str(reply))
        return reply

    def close(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.close()


class LeanScript:
    """Stands in for redis-py's AsyncScript: ``await script(keys=..., args=...)``."""

    def __init__(self, client: LeanClient, sha: str) -> None:
        self.client = client
        self.sha = sha

    async def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        return await self.client.execute("EVALSHA", self.sha, len(keys), *keys, *args)


def here(port: int) -> Callable[[], Awaitable[tuple[str, int]]]:
    async def locate() -> tuple[str, int]:
        return "127.0.0.1", port

    return locate


def redis_py_client(url: str, kind: str) -> aioredis.Redis:
    if kind == "hiredis":
        return make_client(url)  # the product's client, as shipped
    pool_cls: Any = aioredis.BlockingConnectionPool if kind == "python" else aioredis.ConnectionPool
    kwargs: dict[str, Any] = dict(
        max_connections=64,
        socket_timeout=TIMEOUT_S,
        socket_connect_timeout=0.5,
        health_check_interval=10,
    )
    if kind == "python":
        kwargs.update(timeout=TIMEOUT_S, parser_class=_AsyncRESP2Parser)
    return aioredis.Redis.from_pool(pool_cls.from_url(url, **kwargs))


CLIENTS = {
    "redis-py hiredis (shipped)": "hiredis",
    "redis-py hiredis, plain pool": "plain",
    "redis-py python-parser": "python",
    "pipelined (hot path)": "pipelined",
    "pipelined, located": "located",
    "lean hiredis protocol": "lean",
}


async def run_one(client_name: str, port: int, calls: int, concurrency: int, round_no: int) -> float:
    """CPU seconds per acquire, for ``calls`` acquires from ``concurrency`` tasks."""
    url = f"redis://127.0.0.1:{port}/0"
    kind = CLIENTS[client_name]
    client = make_client(url) if kind in ("lean", "pipelined", "located") else redis_py_client(url, kind)
    pipelined = None
    if kind in ("pipelined", "located"):
        pipelined = PipelinedRedis(
            url, timeout_ms=int(TIMEOUT_S * 1000), locate=here(port) if kind == "located" else None
        )
    store = RedisStore(client, Keys(prefix="bench", account="redis-client"), pipelined=pipelined)
    lean = None
    if kind == "lean":
        lean = await LeanClient.connect("127.0.0.1", port)
        sha = await client.script_load(store._acquire.script)  # the script, loaded once
        store._acquire = LeanScript(lean, sha)  # type: ignore[assignment]
    tag = f"{kind}.{round_no}.{time.monotonic_ns():x}"
    counter = iter(range(10**9))

    async def worker(n: int) -> None:
        for _ in range(n):
            req = AcquireRequest(ticket=f"{tag}.{next(counter)}", limits=(LIMIT,))
            result = await store.acquire(req)
            if result.status is not Status.ADMITTED:
                raise RuntimeError(f"acquire not admitted: {result}")

    async def burst(total: int) -> None:
        each = total // concurrency
        await asyncio.gather(*(worker(each) for _ in range(concurrency)))

    try:
        await burst(concurrency * 20)  # warm: connections open, script loaded
        cpu0 = time.process_time()
        await burst(calls)
        cpu = time.process_time() - cpu0
    finally:
        if lean is not None:
            lean.close()
        if pipelined is not None:
            await pipelined.close()
        await client.aclose()
    return cpu / (calls // concurrency * concurrency)


def run_loop(loop_name: str, coro_fn: Callable[[], Awaitable[float]]) -> float:
    if loop_name == "uvloop":
        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", "-n", type=int, default=4000)
    ap.add_argument("--concurrency", "-C", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1000 calls, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.rounds = 1000, 2
    workdir = Path(tempfile.mkdtemp(prefix="aai-bench-redis-"))
    procs = Processes(workdir)
    try:
        _, port, info = start_redis(procs)
        results: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        names = list(CLIENTS)
        for r in range(args.rounds):
            for loop_name in ("asyncio", "uvloop") if r % 2 == 0 else ("uvloop", "asyncio"):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    info._command("FLUSHDB")
                    per_call = run_loop(
                        loop_name, lambda n=name, r=r: run_one(n, port, args.calls, args.concurrency, r)
                    )
                    results[(loop_name, name)].append(per_call)
        print(
            f"## Redis client CPU per acquire (gateway process side; {args.calls} acquires from "
            f"{args.concurrency} tasks, median of {args.rounds} interleaved rounds)"
        )
        shipped = {
            lp: statistics.median(results[(lp, "redis-py hiredis (shipped)")]) for lp in ("asyncio", "uvloop")
        }
        width = max(len(n) for n in names)
        print(f"{'client':<{width}}  {'loop':<7}  {'us/acquire':>10}  {'vs shipped, same loop':>21}")
        for name in names:
            for lp in ("asyncio", "uvloop"):
                us = statistics.median(results[(lp, name)]) * 1e6
                print(f"{name:<{width}}  {lp:<7}  {us:10.1f}  {us / (shipped[lp] * 1e6):21.2f}")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
