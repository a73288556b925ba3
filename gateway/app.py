"""The composition root: ``build_app(config, *, store, clock, registry)``.

One listener serves:

    /v2/*       -> upstream.api_url        (REST: transcripts, uploads)
    /v1/*       -> upstream.llm_url        (LLM Gateway)
    /v3/token   -> the streaming host over https;  /v3/ws  the streaming relay
    /metrics    Prometheus text;  /healthz  alive;  /readyz  store reachable, config hash
    POST /admin/v1/reload   re-read the config (bearer token: $AAI_GATEWAY_ADMIN_TOKEN)

Here the parts are made and wired, and the routes laid out; the rest lives beside it:
middlewares.py (every request's way in, and every error a client sees, rendered in one
middleware as ``{"error": "..."}``), backends.py (where each kind of state is kept),
lifecycle.py (start, background tasks, drain, close) and probes.py (/metrics, /healthz,
/readyz). Their names tests and tools use stay importable from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from .admin import AdminApi, require_admin
from .admission.engine import AdmissionEngine
from .admission.fallback import FallbackStore
from .admission.limits import OrderError
from .admission.store import Store
from .backends import (
    make_directory,
    make_job_store,
    make_ledger,
    make_store,
    make_upload_book,
    redis_client,
)
from .clock import Clock, SystemClock
from .config import Config, ConfigError
from .errors import NotFound
from .identity import Auth, identity_middleware, owner_of
from .ledger import Ledger
from .lifecycle import closer_when_draining, drainer, lifecycle_ctx, outage_gauges
from .metrics import Metrics
from .middlewares import (
    InFlight,
    access_middleware,
    error_response,
    errors_middleware,
    expect_continue,
    json_protocol_errors,
    send_request_id,
    target_middleware,
    target_problem,
)
from .probes import probes
from .products import llm, rest, streaming
from .products.catalog import Catalog
from .products.streaming_relay import StreamingRelay
from .products.transcripts.journal import Journal
from .products.transcripts.service import Transcripts
from .products.transcripts.webhooks import RECEIVER_PATH
from .products.uploads import Uploads, upload_route
from .proxy.body import BODY_LIMITS, BodyLimits
from .proxy.forward import Upstream
from .proxy.handler import ProxyHandler
from .reload import RELOAD_PATH, Reloaded, Reloader, ReloadError, admin_reload, apply_logging
from .report import usage_route
from .spend import SpendGuard, spend_middleware
from .status_page import UseHistory, status_routes
from .tls import SERVED_TLS, TlsError, reload_tls
from .usage import Tally, Usage
from .vault import load_vault

# Names that lived here before the split, imported from here by tests, bench and __main__.
__all__ = [
    "CATALOG",
    "CONFIG",
    "ENGINE",
    "HANDLER",
    "LEDGER",
    "METRICS",
    "RELOADER",
    "STORE",
    "TRANSCRIPTS",
    "build_app",
    "error_response",
    "errors_middleware",
    "make_store",
    "redis_client",
    "target_problem",
]

log = logging.getLogger("gateway")

CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
ENGINE: web.AppKey[AdmissionEngine] = web.AppKey("engine", AdmissionEngine)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STORE: web.AppKey[Store] = web.AppKey("store", object)  # type: ignore[arg-type]
TRANSCRIPTS: web.AppKey[Transcripts] = web.AppKey("transcripts", Transcripts)
LEDGER: web.AppKey[Ledger] = web.AppKey("ledger", object)  # type: ignore[arg-type]
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader", Reloader)
HANDLER: web.AppKey[ProxyHandler] = web.AppKey("handler", ProxyHandler)
CATALOG: web.AppKey[Catalog] = web.AppKey("catalog", Catalog)


def build_app(
    config: Config,
    *,
    store: Store | None = None,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    load: Callable[[], Config] | None = None,
    admin_token: str | None = None,
    upstream_key: str | None = None,
) -> web.Application:
    """``load`` re-reads the config for a reload (serve: the file it started with, the same
    environment overrides; default: ``config`` again). ``admin_token`` (default: the
    environment's $AAI_GATEWAY_ADMIN_TOKEN) opens ``POST /admin/v1/reload``; without one that
    path answers 404 like any path the gateway does not serve. ``upstream_key`` (default: the
    environment's ``upstream.api_key_env``) is the account's key, required in managed mode
    (``projects`` configured): ConfigError without it."""
    if config.managed:
        upstream_key = os.environ.get(config.upstream.api_key_env) if upstream_key is None else upstream_key
        if not upstream_key:
            raise ConfigError(
                f"projects are configured (managed mode), so the gateway needs the account's AssemblyAI "
                f"key in ${config.upstream.api_key_env}; it is not set"
            )
    else:
        upstream_key = None
    clock = clock or SystemClock()
    registry = registry if registry is not None else CollectorRegistry()
    metrics = Metrics(registry)
    store = store or make_store(
        config, clock, on_call=lambda op: metrics.child(metrics.store_calls, op).inc()
    )
    if isinstance(store, FallbackStore):
        metrics.on_collect.append(outage_gauges(store, metrics))
    catalog = Catalog(
        config.limits,
        claim_lease_s=2 * config.transcripts.claim_s,
        max_open_sessions=config.streaming.max_open_sessions,
    )
    engine = AdmissionEngine(store, clock, ticket_ttl_ms=config.queue.ticket_ttl_ms, observer=metrics)
    upstream = Upstream(config.upstream, metrics)
    vault = load_vault(
        shared=config.redis.url is not None,
        data_dir=Path(config.transcripts.data_dir),
        derive_from=upstream_key,
    )
    handler = ProxyHandler(
        config, engine=engine, upstream=upstream, metrics=metrics, clock=clock, owner_of=owner_of,
    )  # fmt: skip
    jobs = make_job_store(
        config, store, on_call=lambda op: metrics.child(metrics.store_calls, f"job_{op}").inc()
    )
    journal = None
    if isinstance(store, FallbackStore):  # Redis, fail_open: new jobs wait here while it is away
        journal = Journal(Path(config.transcripts.data_dir) / "journal.db")
    ledger, tokens = make_ledger(config, store)
    usage = Usage(
        ledger, metrics, lambda: reloader.config.pricing, hold_audio_s=config.transcripts.hold_audio_s
    )
    tally = Tally(ledger, engine.instance)
    spend = SpendGuard(
        ledger, lambda: reloader.config, metrics, runtime_cap=lambda name: auth.ring.runtime_caps.get(name)
    )
    usage.on_spend = spend.note
    directory = make_directory(config, store) if config.managed else None
    auth = Auth(config, vault, tokens, upstream_key=upstream_key, directory=directory)
    uploads = Uploads(make_upload_book(config, store))
    transcripts = Transcripts(
        config, jobs=jobs, engine=engine, catalog=catalog, handler=handler, upstream=upstream,
        vault=vault, metrics=metrics, clock=clock, journal=journal, auth=auth, uploads=uploads, usage=usage,
    )  # fmt: skip

    history = UseHistory(store, catalog, clock)  # each limit's use over the last hour (/admin/)

    json_protocol_errors()
    inflight = InFlight()
    app = web.Application(
        middlewares=[
            access_middleware(vault.fingerprint, inflight),
            target_middleware,
            errors_middleware(metrics, tally),
            identity_middleware(auth),
            spend_middleware(spend),
        ],
        # Bodies pass through as the client sent them: decompressing them here once let a
        # gzip body smuggle requests upstream (proxy/body.py inflates what must be read).
        handler_args={"max_field_size": 16384, "auto_decompress": False},
    )
    app.on_response_prepare.append(send_request_id)
    app[BODY_LIMITS] = BodyLimits(config.proxy.client_body_timeout_s, config.proxy.client_body_min_rate)
    app[CONFIG] = config
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[STORE] = store
    app[TRANSCRIPTS] = transcripts
    app[HANDLER] = handler
    app[CATALOG] = catalog
    app[LEDGER] = ledger
    metrics.store_info.labels(store.kind).set(1)
    for limit in catalog.fixed_limits():
        metrics.tokens_capacity.labels(limit.metric_label).set(limit.capacity)

    sessions = StreamingRelay(
        config, engine=engine, catalog=catalog, handler=handler, vault=vault,
        usage=usage, tokens=tokens, metrics=metrics, clock=clock,
    )  # fmt: skip

    sessions.spend, spend.open_spend = spend, sessions.open_spend
    ending: list[asyncio.Task[None]] = []

    app.cleanup_ctx.append(
        lifecycle_ctx(
            config=config, upstream=upstream, engine=engine, transcripts=transcripts, jobs=jobs,
            store=store, catalog=catalog, metrics=metrics, ledger=ledger, tokens=tokens, tally=tally,
            history=history, spend=spend, directory=directory, auth=auth, ending=ending,
        )
    )  # fmt: skip
    app.on_shutdown.append(
        drainer(
            config=config, handler=handler, metrics=metrics, transcripts=transcripts,
            sessions=sessions, engine=engine, inflight=inflight, ending=ending,
        )
    )  # fmt: skip

    app.on_response_prepare.append(closer_when_draining(handler))

    def apply(new: Config) -> list[str]:
        """A reload (gateway/reload.py): refuse (ReloadError) before changing anything, then
        apply in one step. Restart-only keys were refused already."""
        claim_lease_s = 2 * new.transcripts.claim_s
        try:
            Catalog(
                new.limits, claim_lease_s=claim_lease_s, max_open_sessions=new.streaming.max_open_sessions
            )
        except OrderError as exc:
            raise ReloadError(f"limits: {exc}") from None
        notes = []
        served = app.get(SERVED_TLS)
        if served is not None and new.listen.tls is not None:
            try:  # checks the files first: on an error nothing is changed
                notes.append("TLS: " + reload_tls(served, new.listen.tls))
            except TlsError as exc:
                raise ReloadError(str(exc)) from None
        catalog.reload(new.limits, max_open_sessions=new.streaming.max_open_sessions)
        handler.use_config(new)
        auth.use_config(new)
        sessions.use_config(new)
        transcripts.use_config(new)
        moved = engine.retune(catalog.current)
        if moved:
            notes.append(f"{moved} waiting requests moved onto the new limits")
        metrics.tokens_capacity.children.clear()
        for limit in catalog.fixed_limits():
            metrics.tokens_capacity.labels(limit.metric_label).set(limit.capacity)
        if (new.log.level, new.log.format) != (reloader.config.log.level, reloader.config.log.format):
            apply_logging(new.log.level, new.log.format)
        return notes

    def count(outcome: str) -> None:
        metrics.config_reloads.labels(outcome).inc()

    reloader = Reloader(config, load or (lambda: config), apply, count=count)
    app[RELOADER] = reloader
    metrics.running_config(reloader.hash)

    def reloaded(done: Reloaded) -> None:
        metrics.running_config(done.hash)

    reloader.on_change.append(reloaded)
    token = os.environ.get(config.admin.token_env, "") if admin_token is None else admin_token

    async def not_found(request: web.Request) -> web.Response:
        raise NotFound()

    async def webhook(request: web.Request) -> web.Response:
        return await transcripts.webhook(request, request.match_info["id"], request.match_info["token"])

    # Every route answers an Expect header it cannot honour in AssemblyAI's shape too.
    add_route = partial(app.router.add_route, expect_handler=expect_continue)
    add_get = partial(app.router.add_get, expect_handler=expect_continue)
    add_post = partial(app.router.add_post, expect_handler=expect_continue)
    add_delete = partial(app.router.add_delete, expect_handler=expect_continue)
    add_post(RECEIVER_PATH + "/{id}/{token}", webhook)
    for path, view in probes(
        registry=registry, store=store, engine=engine, reloader=reloader, transcripts=transcripts,
        handler=handler,
    ):  # fmt: skip
        add_get(path, view)
    add_post(RELOAD_PATH, admin_reload(reloader, token))
    add_get(
        "/admin/v1/usage", usage_route(lambda: ledger, lambda: reloader.config.pricing, require_admin(token))
    )
    for method, path, route in status_routes(
        token, ledger=lambda: ledger, config=lambda: reloader.config, store=store, catalog=catalog,
        engine=engine, transcripts=transcripts, history=history,
    ):  # fmt: skip
        add_route(method, path, route)
    if directory is not None:
        for method, path, route in AdminApi(auth.ring, directory, lambda: reloader.config, token).routes():
            add_route(method, path, route)

    # Each product classifies against the account's limits, bound here: the proxy knows none.
    rest_plan = partial(rest.plan, catalog=catalog)

    def job_route(serve: Callable[..., Awaitable[web.StreamResponse | None]]) -> Any:
        async def call(request: web.Request) -> web.StreamResponse | None:
            return await serve(request, *request.match_info.values())

        return handler.product(call, fallback=rest_plan, group="rest")

    add_post("/v2/transcript", job_route(transcripts.create))
    add_get("/v2/transcript", job_route(transcripts.list_transcripts))
    add_get("/v2/transcript/{id}", job_route(transcripts.get))
    add_delete("/v2/transcript/{id}", job_route(transcripts.delete))
    add_get("/v2/transcript/{id}/{sub}", job_route(transcripts.sub_resource))
    add_post("/v2/upload", upload_route(handler, uploads, catalog, managed=config.managed))
    if config.managed:
        # Every other /v2 path would reach upstream under the account's key, which sees every
        # project's transcripts (a list at "/v2/transcript/", another method, more segments):
        # managed mode serves upstream's /v2 routes above and nothing else.
        add_route("*", "/v2/{tail:.*}", not_found)
    else:
        add_route("*", "/v2/{tail:.*}", handler.route(rest_plan))
    add_route(
        "*",
        "/v1/{tail:.*}",
        handler.route(partial(llm.plan, catalog=catalog, ids=transcripts, usage=usage), public=llm.PUBLIC),
    )
    add_get("/v3/ws", sessions.handle)
    add_get("/v3/token", sessions.token)
    add_route("*", "/v3/{tail:.*}", handler.route(partial(streaming.plan, catalog=catalog)))
    add_route("*", "/{tail:.*}", not_found)
    return app
