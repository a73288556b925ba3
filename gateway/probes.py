"""The gateway's own endpoints for whoever runs it: ``/metrics`` (Prometheus text),
``/healthz`` (the process answers) and ``/readyz`` (it should get traffic: the store answers,
not draining; with the config's hash, so a rollout can see which config each instance runs).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .admission.engine import AdmissionEngine
from .admission.fallback import FallbackStore
from .admission.store import Store
from .errors import StoreUnavailable
from .products.transcripts.service import Transcripts
from .proxy.handler import ProxyHandler
from .reload import Reloader

View = Callable[[web.Request], Awaitable[web.Response]]


def probes(
    *,
    registry: CollectorRegistry,
    store: Store,
    engine: AdmissionEngine,
    reloader: Reloader,
    transcripts: Transcripts,
    handler: ProxyHandler,
) -> list[tuple[str, View]]:
    """``(path, view)`` for each GET endpoint."""

    async def metrics_view(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        detail: dict[str, object] = {"store": store.kind, "instance": engine.instance, "config": "loaded"}
        detail["config_hash"] = reloader.hash
        if store.kind == "memory":
            detail["note"] = "embedded store: limits hold for this ONE instance only"
        if transcripts.dispatcher.paused:
            detail["dispatch"] = f"paused: {transcripts.dispatcher.pause_reason}"
        if handler.draining:  # load balancers: send nothing more here
            return web.json_response({"error": "shutting down", **detail}, status=503)
        if isinstance(store, FallbackStore) and store.degraded:  # redis.on_outage: fail_open
            lasted = time.monotonic() - store.outage.since
            detail["store_state"] = (
                f"degraded for {lasted:.0f}s: Redis unreachable, admitting locally within this "
                f"instance's share (1/{store.instances} of every limit)"
            )
            return web.json_response({"status": "ready", **detail})
        try:
            await store.ping()
        except StoreUnavailable as exc:
            return web.json_response(
                {"error": "store unreachable", **detail, "reason": exc.detail}, status=503
            )
        return web.json_response({"status": "ready", **detail})

    return [("/metrics", metrics_view), ("/healthz", healthz), ("/readyz", readyz)]
