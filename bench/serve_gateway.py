"""Run the gateway for the proxy-overhead benchmark: limits on Redis, set too high to queue.

bench/proxy_overhead.py starts this in its own process. It builds ``gateway.config.Config``
(both upstreams at the fast upstream, ``redis.url`` at the benchmark's private Redis, the
account window at 10,000,000 per 300 s and every model at 10,000,000 per 60 s so no request
ever waits, no access log, log level warning), calls ``gateway.app.build_app(config,
store=...)`` and serves it with ``aiohttp.web.run_app`` as ``aai-gateway serve`` does
(``handler_cancellation=True``).

Choices measured by the benchmark:

    --loop asyncio|uvloop       the event loop (the policy is set before the app runs)
    --parser hiredis|python     the Redis reply parser: hiredis (redis-py's default when it is
                                installed; the client comes from gateway's own make_client) or
                                redis-py's pure-Python RESP2 parser (redis._parsers._AsyncRESP2Parser)

The store is built here (so the parser can be chosen) and counts its own round trips by verb.
On SIGUSR1 it writes them, with the parser and loop actually in use, as JSON to --stats-file.
With --cprofile PATH the process runs under cProfile and dumps the stats there on exit.

For bench/streaming_sessions.py: ``--streaming-upstream ws://...`` points
``upstream.streaming_url`` there and raises ``streaming_sessions`` to 10,000,000 per 60 s;
``--store memory`` runs on the embedded store (no Redis), as ``aai-gateway serve`` does
without ``redis.url``; ``--data-dir`` is where its usage ledger goes.

Run alone:

    python bench/serve_gateway.py --port 8197 --upstream http://127.0.0.1:8199 \\
        --redis redis://127.0.0.1:6390/0 --loop uvloop --parser hiredis
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gateway package

import redis.asyncio as aioredis  # noqa: E402
from aiohttp import web  # noqa: E402
from redis._parsers import _AsyncRESP2Parser  # noqa: E402

from gateway.__main__ import freeze_startup_heap  # noqa: E402
from gateway.admission.keys import Keys  # noqa: E402
from gateway.admission.limits import Limit  # noqa: E402
from gateway.admission.pipelined import PipelinedRedis  # noqa: E402
from gateway.admission.redis_store import RedisStore, make_client  # noqa: E402
from gateway.app import build_app  # noqa: E402
from gateway.config import Config  # noqa: E402
from gateway.vault import generate_key  # noqa: E402

HIGH = 10_000_000


class CountingStore(RedisStore):
    """The product's RedisStore; round trips counted by verb (``usage`` has no on_call hook)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        counts: Counter[str],
        pipelined: PipelinedRedis | None = None,
    ) -> None:
        super().__init__(client, keys, on_call=self._tally, pipelined=pipelined)
        self.counts = counts

    def _tally(self, verb: str) -> None:
        self.counts[verb] += 1

    async def usage(self, limit: Limit) -> tuple[int, int]:
        self.counts["usage"] += 1
        return await super().usage(limit)


def make_config(
    host: str,
    port: int,
    upstream: str,
    redis_url: str | None,
    streaming_upstream: str | None = None,
    data_dir: str | None = None,
) -> Config:
    doc: dict[str, Any] = {
        "listen": {"host": host, "port": port},
        "upstream": {"api_url": upstream, "llm_url": upstream},
        "redis": {"url": redis_url},
        "limits": {
            "plan": "paid",
            "requests": {"limit": HIGH, "window_s": 300},
            "llm_requests": {"limit": HIGH, "window_s": 60},
            "streaming_sessions": {"limit": HIGH, "window_s": 60},
        },
        "log": {"access_log": False, "level": "warning"},
    }
    if streaming_upstream:
        doc["upstream"]["streaming_url"] = streaming_upstream
    if data_dir:
        doc["transcripts"] = {"data_dir": data_dir}
    return Config.model_validate(doc)


def make_python_parser_client(config: Config) -> aioredis.Redis:
    """gateway.admission.redis_store.make_client, but with redis-py's pure-Python RESP2 parser."""
    r = config.redis
    assert r.url is not None
    pool = aioredis.BlockingConnectionPool.from_url(
        r.url,
        max_connections=r.pool_size,
        timeout=r.timeout_ms / 1000,
        socket_timeout=r.timeout_ms / 1000,
        socket_connect_timeout=r.connect_timeout_ms / 1000,
        health_check_interval=10,
        parser_class=_AsyncRESP2Parser,
    )
    return aioredis.Redis.from_pool(pool)


def parser_in_use(client: aioredis.Redis) -> str:
    pool = client.connection_pool
    conns = list(getattr(pool, "_connections", [])) + list(getattr(pool, "_available_connections", []))
    for conn in conns:
        parser = getattr(conn, "_parser", None)
        if parser is not None:
            return type(parser).__name__
    return "unknown (no connection yet)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8197)
    ap.add_argument("--upstream", default="http://127.0.0.1:8199")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument(
        "--parser",
        choices=("pipelined", "hiredis", "python"),
        default="pipelined",
        help="pipelined: the shipped hot path; hiredis/python: scripts through redis-py with that parser",
    )
    ap.add_argument("--store", choices=("redis", "memory"), default="redis")
    ap.add_argument("--streaming-upstream", help="ws://host:port of a streaming upstream")
    ap.add_argument("--data-dir", help="the gateway's data directory (usage ledger, vault)")
    ap.add_argument("--stats-file", help="where SIGUSR1 writes round-trip counts (JSON)")
    ap.add_argument("--cprofile", help="profile the whole process; write pstats here on exit")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    config = make_config(
        args.host,
        args.port,
        args.upstream,
        None if args.store == "memory" else args.redis,
        args.streaming_upstream,
        args.data_dir,
    )
    if args.store == "memory":  # the embedded store, as `aai-gateway serve` builds it
        serve(build_app(config), args)
        return
    # Instances sharing Redis need the deployment's secret key; one gateway alone needs any.
    os.environ.setdefault("AAI_GATEWAY_SECRET_KEY", generate_key())
    r = config.redis
    assert r.url is not None
    pipelined = None
    if args.parser == "pipelined":
        pipelined = PipelinedRedis(r.url, timeout_ms=r.timeout_ms, connect_timeout_ms=r.connect_timeout_ms)
    if args.parser in ("hiredis", "pipelined"):
        client = make_client(
            r.url, timeout_ms=r.timeout_ms, connect_timeout_ms=r.connect_timeout_ms, pool_size=r.pool_size
        )
    else:
        client = make_python_parser_client(config)
    counts: Counter[str] = Counter()
    store = CountingStore(client, Keys(prefix=r.key_prefix, account=config.account), counts, pipelined)
    app = build_app(config, store=store)

    def dump_stats() -> None:
        if not args.stats_file:
            return
        stats: dict[str, Any] = {
            "calls": dict(counts),
            "parser": parser_in_use(client),
            "loop": type(asyncio.get_running_loop()).__module__,
        }
        tmp = Path(args.stats_file + ".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(args.stats_file)

    async def on_startup(app: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_stats)

    app.on_startup.append(on_startup)
    serve(app, args)


def serve(app: web.Application, args: argparse.Namespace) -> None:
    async def freeze(app: web.Application) -> None:
        freeze_startup_heap()  # as `aai-gateway serve` does once started

    app.on_startup.append(freeze)
    profiler = cProfile.Profile() if args.cprofile else None
    if profiler is not None:
        profiler.enable()
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            handler_cancellation=True,
            access_log=None,
            print=None,
            shutdown_timeout=2,
        )
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.cprofile)


if __name__ == "__main__":
    main()
