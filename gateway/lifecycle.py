"""The app's life around its requests: what starts with it, what runs beside it, how it ends.

``lifecycle`` (aiohttp's cleanup_ctx) starts the parts that hold connections and the
supervised background tasks (gauges sampled, outage notes written back, request counts,
the status page's history, spend caps, the key ring), and closes everything in order, each
step bounded. ``drain`` (on_shutdown, SIGTERM) hands waiting requests back and ends
streaming sessions; ``close_when_draining`` tells every client to reconnect elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from .admission.engine import AdmissionEngine
from .admission.fallback import FallbackStore
from .admission.health import stop_tasks, supervise
from .admission.store import Store
from .backends import redis_client
from .config import Config
from .directory import Directory
from .errors import StoreUnavailable
from .identity import Auth
from .ledger import Ledger, OutageLedger
from .metrics import Metrics
from .middlewares import InFlight
from .products.catalog import Catalog
from .products.streaming_relay import StreamingRelay
from .products.streaming_tokens import OutageTokenBook, TokenBook
from .products.transcripts.jobs import JobStore
from .products.transcripts.service import Transcripts
from .proxy.forward import Upstream
from .proxy.handler import ProxyHandler
from .spend import SpendGuard
from .status_page import UseHistory
from .usage import Tally

log = logging.getLogger("gateway")

SAMPLE_EVERY_S = 5.0
WRITE_BACK_EVERY_S = 0.5  # usage and token notes kept during a Redis outage: offered again


def lifecycle_ctx(
    *,
    config: Config,
    upstream: Upstream,
    engine: AdmissionEngine,
    transcripts: Transcripts,
    jobs: JobStore,
    store: Store,
    catalog: Catalog,
    metrics: Metrics,
    ledger: Ledger,
    tokens: TokenBook,
    tally: Tally,
    history: UseHistory,
    spend: SpendGuard,
    directory: Directory | None,
    auth: Auth,
    ending: list[asyncio.Task[None]],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The cleanup_ctx: start, yield while serving, close. ``ending``: the tasks ``drain``
    started (streaming sessions terminating), awaited before the rest closes."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await upstream.start()
        await engine.start()
        await transcripts.start()
        sampler = supervise("metrics-sampler", lambda: _sample(store, catalog, metrics, transcripts))
        tasks = [sampler]
        if isinstance(ledger, OutageLedger) and isinstance(tokens, OutageTokenBook):
            tasks.append(supervise("outage-write-back", lambda: _write_back(ledger, tokens)))
        tasks.append(supervise("usage-tally", tally.run))
        tasks.append(supervise("status-history", history.run))
        with contextlib.suppress(StoreUnavailable):  # else the loop below keeps trying
            await spend.refresh()
        tasks.append(supervise("spend-caps", spend.run))
        if directory is not None:
            with contextlib.suppress(StoreUnavailable):  # else the loop below keeps trying
                await auth.ring.refresh()
            tasks.append(supervise("keys", auth.ring.run))
        yield
        # Again until each ends: a store call in progress can swallow one cancellation.
        await stop_tasks(*tasks)
        for task in ending:
            await _bounded("streaming sessions", task, config.streaming.terminate_wait_s + 3)
        # Each step is bounded: a connection stuck in a dead peer must not hold up shutdown.
        await _bounded("transcripts", transcripts.close())
        await _bounded("engine", engine.close())
        await _bounded("jobs", jobs.close())
        await _bounded("request counts", tally.flush())
        await _bounded("ledger", ledger.close())
        if directory is not None:
            await _bounded("keys' last use", auth.ring.write_use())
            await _bounded("directory", directory.close())
        await _bounded("store", store.close())
        await _bounded("upstream", upstream.close())
        closer = getattr(redis_client(store), "aclose", None)
        if closer is not None:
            await _bounded("redis client", closer())

    return lifecycle


def drainer(
    *,
    config: Config,
    handler: ProxyHandler,
    metrics: Metrics,
    transcripts: Transcripts,
    sessions: StreamingRelay,
    engine: AdmissionEngine,
    inflight: InFlight,
    ending: list[asyncio.Task[None]],
) -> Callable[[web.Application], Awaitable[None]]:
    """The on_shutdown hook; the task ending streaming sessions goes into ``ending``."""

    async def drain(app: web.Application) -> None:
        """SIGTERM, once the listener stopped accepting and idle connections were closed
        (aiohttp's on_shutdown): admitted requests go on; waiting ones are handed back (429 +
        Retry-After, errors.ShuttingDown) and new ones wait no more; queued transcripts stay
        queued in the store for the other instances; every streaming session is terminated
        upstream and closed with 1013. Then up to shutdown_grace_s for the requests in
        progress to end; aiohttp cancels what is left (the runner's shutdown_timeout)."""
        started = asyncio.get_running_loop().time()
        handler.draining = True
        metrics.draining.set(1)
        log.info("shutting down: waiting requests handed back, streaming sessions terminated")
        transcripts.drain()
        ending.append(asyncio.create_task(sessions.shutdown()))  # awaited by the cleanup below
        await engine.close()  # every waiter here is refused: the handler answers 429
        left = config.shutdown_grace_s - (asyncio.get_running_loop().time() - started)
        if not await inflight.settle(max(0.0, left)):
            log.warning(
                "shutting down: %d requests still in progress after shutdown_grace_s (%gs): cut",
                inflight.count,
                config.shutdown_grace_s,
            )

    return drain


def closer_when_draining(
    handler: ProxyHandler,
) -> Callable[[web.BaseRequest, web.StreamResponse], Awaitable[None]]:
    async def close_when_draining(request: web.BaseRequest, response: web.StreamResponse) -> None:
        """While draining, every answer says ``Connection: close``: the client's next request
        opens a new connection, which the balancer sends to another instance."""
        if handler.draining and response.status != 101:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"  # (aiohttp wrote its own before this hook)

    return close_when_draining


async def _bounded(what: str, step: Awaitable[Any], seconds: float = 5.0) -> None:
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("shutdown: closing the %s took over %.0fs; moving on", what, seconds)
    except Exception as exc:
        log.warning("shutdown: closing the %s failed: %s", what, exc)


async def _write_back(ledger: OutageLedger, tokens: OutageTokenBook) -> None:
    """Usage and token notes kept while Redis was away go into it once it answers."""
    while True:
        await asyncio.sleep(WRITE_BACK_EVERY_S)
        if len(ledger):
            await ledger.flush()
        await tokens.flush()


def outage_gauges(store: FallbackStore, metrics: Metrics) -> Callable[[], None]:
    """The Redis-outage gauges, read at each scrape."""

    def update() -> None:
        outage = store.outage
        metrics.store_degraded.set(1 if outage.degraded else 0)
        lasted = time.monotonic() - outage.since if outage.degraded else outage.last_s
        metrics.store_outage_seconds.set(lasted)
        metrics.store_outages.set(outage.count)
        metrics.store_instances.set(store.instances)

    return update


async def _sample(store: Store, catalog: Catalog, metrics: Metrics, transcripts: Transcripts) -> None:
    """Keep the tokens-in-use gauges true while no traffic updates them."""
    while True:
        await asyncio.sleep(SAMPLE_EVERY_S)
        try:
            counts = await transcripts.jobs.counts()
            metrics.jobs_queued.set(counts.get("queued", 0))
            metrics.jobs_running.set(counts.get("running", 0))
            metrics.dispatch_paused.set(1 if transcripts.dispatcher.paused else 0)
        except StoreUnavailable:
            metrics.store_errors.labels("jobs").inc()
        for limit in catalog.fixed_limits():
            try:
                out, _ = await store.usage(limit)
            except StoreUnavailable:
                metrics.store_errors.labels("usage").inc()
                break
            metrics.tokens_in_use.labels(limit.metric_label).set(out)
