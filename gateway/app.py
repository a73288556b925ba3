"""The composition root: ``build_app(config, *, store, clock, registry)``.

One listener serves:

    /v2/*       -> upstream.api_url        (REST: transcripts, uploads)
    /v1/*       -> upstream.llm_url        (LLM Gateway)
    /v3/token   -> the streaming host over https;  /v3/ws -> 501 until the streaming relay
    /metrics    Prometheus text;  /healthz  alive;  /readyz  store reachable, config hash
    POST /admin/v1/reload   re-read the config (bearer token: $AAI_GATEWAY_ADMIN_TOKEN)

Every error a client sees is rendered here, in one middleware, as ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from yarl import URL

from .admission.engine import AdmissionEngine
from .admission.fallback import FallbackStore, heartbeat
from .admission.health import supervise
from .admission.keys import Keys
from .admission.limits import OrderError
from .admission.memory import MemoryStore
from .admission.redis_store import RedisStore
from .admission.store import Store
from .admission.topology import connect
from .clock import Clock, SystemClock
from .config import Config, ConfigError
from .errors import GatewayError, NotFound, StoreUnavailable
from .identity import Auth, identity_middleware
from .ledger import Ledger, OutageLedger, RedisLedger, SqliteLedger
from .logs import ACCESS, REQUEST_ID, access_fields, request_id
from .metrics import Metrics
from .products import llm, rest, streaming
from .products.catalog import Catalog
from .products.streaming_relay import StreamingRelay
from .products.streaming_tokens import MemoryTokenBook, OutageTokenBook, RedisTokenBook, TokenBook
from .products.transcripts.jobs import JobStore
from .products.transcripts.journal import Journal
from .products.transcripts.redis_jobs import RedisJobStore
from .products.transcripts.service import Transcripts
from .products.transcripts.sqlite_jobs import SqliteJobStore
from .products.transcripts.webhooks import RECEIVER_PATH
from .products.uploads import MemoryUploadBook, RedisUploadBook, UploadBook, Uploads, upload_route
from .proxy.body import BODY_LIMITS, BodyLimits
from .proxy.forward import Upstream
from .proxy.handler import GROUP, ClientGone, ProxyHandler
from .reload import (
    RELOAD_PATH,
    Reloaded,
    Reloader,
    ReloadError,
    admin_reload,
    apply_logging,
)
from .tls import SERVED_TLS, TlsError, reload_tls
from .vault import load_vault

log = logging.getLogger("gateway")

CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
ENGINE: web.AppKey[AdmissionEngine] = web.AppKey("engine", AdmissionEngine)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
STORE: web.AppKey[Store] = web.AppKey("store", object)  # type: ignore[arg-type]
TRANSCRIPTS: web.AppKey[Transcripts] = web.AppKey("transcripts", Transcripts)
LEDGER: web.AppKey[Ledger] = web.AppKey("ledger", object)  # type: ignore[arg-type]
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader", Reloader)
HANDLER: web.AppKey[ProxyHandler] = web.AppKey("handler", ProxyHandler)

SAMPLE_EVERY_S = 5.0
WRITE_BACK_EVERY_S = 0.5  # usage and token notes kept during a Redis outage: offered again


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        name = type(exc).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return "internal_error"


def errors_middleware(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        outcome = "ok"
        try:
            return await handler(request)
        except GatewayError as exc:
            outcome = _outcome(exc)
            if isinstance(exc, StoreUnavailable):
                metrics.store_errors.labels("admission").inc()
                log.warning("store unavailable: %s", exc.detail)
            return error_response(exc.status, exc.message, exc.headers)
        except web.HTTPException as exc:
            outcome = "http_" + str(exc.status)
            if exc.status < 400:
                raise
            text = " ".join((exc.text or "").split())  # aiohttp's own detail, when it gave one
            return error_response(
                exc.status, text if text and not text.startswith(str(exc.status)) else exc.reason
            )
        except (ClientGone, asyncio.CancelledError, ConnectionResetError):
            outcome = "client_gone"
            raise
        except Exception:
            outcome = "internal_error"
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "Internal gateway error")
        finally:
            group = access_fields(request).setdefault(GROUP, "other")
            if request.path.startswith(("/v1", "/v2", "/v3")):
                metrics.child(metrics.requests, group, outcome).inc()

    return middleware


class InFlight:
    """Requests in progress (streaming sessions included), so a graceful shutdown can wait
    for them itself, within its grace, before aiohttp cancels what is left."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None  # made when someone waits

    def done(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def settle(self, within_s: float) -> bool:
        """Wait until no request is in progress, at most ``within_s``; whether none is."""
        if self.count == 0:
            return True
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within_s)
        return self.count == 0


def access_middleware(
    fingerprint: Callable[[str], str], inflight: InFlight | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Outermost: the request's access dict (gateway/logs.py), with its request id and the
    fingerprint of its key, before anything else can answer; every product notes into it.
    Counts the requests in progress (``inflight``)."""
    count = inflight or InFlight()

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        fields = request[ACCESS] = {"request_id": request_id(request.headers.get(REQUEST_ID))}
        key = request.headers.get(hdrs.AUTHORIZATION)
        if key:
            fields["key"] = fingerprint(key)[:16]
        count.count += 1
        try:
            return await handler(request)
        finally:
            count.done()

    return middleware


async def send_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Every answer names its request id (an upstream's own id, when it sent one, is kept as
    X-Upstream-Request-Id)."""
    rid = access_fields(request)["request_id"]
    theirs = response.headers.get(REQUEST_ID)
    if theirs is not None and theirs != rid:
        response.headers["X-Upstream-Request-Id"] = theirs
    response.headers[REQUEST_ID] = rid


def json_protocol_errors() -> None:
    """Requests aiohttp cannot parse (a bad request line, Content-Length with
    Transfer-Encoding, an oversized header...) are answered by aiohttp itself, before any
    middleware, in text/plain. Give them AssemblyAI's shape too: ``RequestHandler.handle_error``
    is the only place aiohttp offers, so it is wrapped, once per process. The connection is
    closed after the answer, as aiohttp does."""
    original = RequestHandler.handle_error
    if getattr(original, "aai_json", False):
        return

    def handle_error(
        self: RequestHandler,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        original(self, request, status, exc, message)  # logs; raises if an answer began
        detail = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        if isinstance(exc, HttpProcessingError) and status < 500 and exc.message:
            first = str(exc.message).splitlines()[0][:200]
            detail = f"{detail}: {''.join(c if c.isprintable() else '?' for c in first)}"
        resp = error_response(status, detail, {REQUEST_ID: access_fields(request)["request_id"]})
        resp.force_close()
        return resp

    handle_error.aai_json = True  # type: ignore[attr-defined]
    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's default Expect handling, but a JSON 417 for an expectation it cannot meet
    (it runs before any middleware, so the errors middleware never sees its refusal)."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return error_response(417, "Unsupported Expect header: only 100-continue is understood")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer proper has not begun
    return None


def target_problem(path: str) -> str | None:
    """Why a request path (raw, without its query) may not be routed, or None.

    Routing (here) and forwarding (upstream) must read a path the same way, so a path another
    server could read differently is refused rather than normalised: dot segments in any
    spelling (``..``, ``%2e%2e``, ``%2E.``), empty segments (``//``), encoded slashes and
    backslashes (``%2F``, ``%5C``), backslashes, and NUL or other control characters. No SDK
    sends any of these (curl and browsers remove dot segments before sending). The middleware
    also refuses a path that, read without its ``;parameters`` or trailing slash (as some
    servers read it), would have been routed elsewhere (``POST /v2/transcript/``).
    """
    if "%" not in path and "/." not in path and "//" not in path and path.isprintable():
        return "a backslash" if "\\" in path else None  # the common case, decided at once
    if "\\" in path:
        return "a backslash"
    segments = path.split("/")
    for i, segment in enumerate(segments[1:], start=1):
        decoded = unquote_to_bytes(segment)
        if decoded in (b".", b".."):
            return "a dot segment"
        if not segment and i < len(segments) - 1:
            return "an empty segment (//)"
        if b"/" in decoded or b"\\" in decoded:
            return "an encoded slash or backslash"
        if any(b < 0x20 or b == 0x7F for b in decoded):
            return "a control character"
    return None


@web.middleware
async def target_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Check the request target before anything else runs (nothing is charged for a refusal).

    An absolute-form target (``GET http://host/v2/x HTTP/1.1``, RFC 9112 section 3.2.2,
    which servers must accept) is served by its path and query: aiohttp routed it by its
    path, and the request is passed on with that origin-form target, so what is forwarded
    is what was routed.
    """
    raw = request.raw_path
    absolute = not raw.startswith("/")
    if absolute and not raw[:8].lower().startswith(("http://", "https://")):
        return error_response(400, "The request target must be a path (or an absolute http URL)")
    target = request.rel_url.raw_path_qs if absolute else raw
    path = target.partition("?")[0]
    problem = target_problem(path)
    if problem is not None:
        return error_response(400, f"The request path is not allowed: it has {problem}")
    if ";" in path or (path.endswith("/") and path != "/"):
        # A server that drops ;parameters or a trailing slash would read another path.
        lenient = "/".join(segment.partition(";")[0] for segment in path.split("/")).rstrip("/") or "/"
        other = await request.app.router.resolve(request.clone(rel_url=URL(lenient, encoded=True)))
        if other.route.resource is not request.match_info.route.resource:
            why = "without its ;parameters or trailing slash it names another route"
            return error_response(400, f"The request path is not allowed: {why}")
    if absolute:
        request = request.clone(rel_url=URL(target, encoded=True))
    return await handler(request)


def make_store(config: Config, clock: Clock, on_call: Callable[[str], None] | None = None) -> Store:
    if config.redis.url is None:
        return MemoryStore(clock)
    keys = Keys(prefix=config.redis.key_prefix, account=config.account)
    conns = connect(config.redis, keys)  # one server, a Cluster or Sentinel's primary
    client = conns.client
    shared = RedisStore(
        client, keys, sharded_pubsub=config.redis.sharded, pipelined=conns.pipelined, on_call=on_call,
        subscriber=conns.subscriber,
    )  # fmt: skip
    if config.redis.on_outage == "fail_closed":
        return shared
    return FallbackStore(shared, clock, beat=heartbeat(client, keys))


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
        metrics.on_collect.append(_outage_gauges(store, metrics))
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
        config, catalog=catalog, engine=engine, upstream=upstream, metrics=metrics, clock=clock,
    )  # fmt: skip
    jobs = make_job_store(
        config, store, on_call=lambda op: metrics.child(metrics.store_calls, f"job_{op}").inc()
    )
    journal = None
    if isinstance(store, FallbackStore):  # Redis, fail_open: new jobs wait here while it is away
        journal = Journal(Path(config.transcripts.data_dir) / "journal.db")
    ledger, tokens = make_ledger(config, store)
    auth = Auth(config, vault, tokens, upstream_key=upstream_key)
    uploads = Uploads(make_upload_book(config, store))
    transcripts = Transcripts(
        config, jobs=jobs, engine=engine, catalog=catalog, handler=handler, upstream=upstream,
        vault=vault, metrics=metrics, clock=clock, journal=journal, auth=auth, uploads=uploads,
    )  # fmt: skip

    json_protocol_errors()
    inflight = InFlight()
    app = web.Application(
        middlewares=[
            access_middleware(vault.fingerprint, inflight),
            target_middleware,
            errors_middleware(metrics),
            identity_middleware(auth),
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
    app[LEDGER] = ledger
    metrics.store_info.labels(store.kind).set(1)
    for limit in catalog.fixed_limits():
        metrics.tokens_capacity.labels(limit.metric_label).set(limit.capacity)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await upstream.start()
        await engine.start()
        await transcripts.start()
        sampler = supervise("metrics-sampler", lambda: _sample(store, catalog, metrics, transcripts))
        tasks = [sampler]
        if isinstance(ledger, OutageLedger) and isinstance(tokens, OutageTokenBook):
            tasks.append(supervise("outage-write-back", lambda: _write_back(ledger, tokens)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for task in ending:
            await _bounded("streaming sessions", task, config.streaming.terminate_wait_s + 3)
        # Each step is bounded: a connection stuck in a dead peer must not hold up shutdown.
        await _bounded("transcripts", transcripts.close())
        await _bounded("engine", engine.close())
        await _bounded("jobs", jobs.close())
        await _bounded("ledger", ledger.close())
        await _bounded("store", store.close())
        await _bounded("upstream", upstream.close())
        closer = getattr(redis_client(store), "aclose", None)
        if closer is not None:
            await _bounded("redis client", closer())

    app.cleanup_ctx.append(lifecycle)
    sessions = StreamingRelay(
        config, engine=engine, catalog=catalog, handler=handler, vault=vault,
        ledger=ledger, tokens=tokens, metrics=metrics, clock=clock,
    )  # fmt: skip

    ending: list[asyncio.Task[None]] = []

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

    app.on_shutdown.append(drain)

    async def close_when_draining(request: web.BaseRequest, response: web.StreamResponse) -> None:
        """While draining, every answer says ``Connection: close``: the client's next request
        opens a new connection, which the balancer sends to another instance."""
        if handler.draining and response.status != 101:
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"  # (aiohttp wrote its own before this hook)

    app.on_response_prepare.append(close_when_draining)

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
    add_get("/metrics", metrics_view)
    add_get("/healthz", healthz)
    add_get("/readyz", readyz)
    add_post(RELOAD_PATH, admin_reload(reloader, token))

    def job_route(serve: Callable[..., Awaitable[web.StreamResponse | None]]) -> Any:
        async def call(request: web.Request) -> web.StreamResponse | None:
            return await serve(request, *request.match_info.values())

        return handler.product(call, fallback=rest.plan, group="rest")

    add_post("/v2/transcript", job_route(transcripts.create))
    add_get("/v2/transcript", job_route(transcripts.list_transcripts))
    add_get("/v2/transcript/{id}", job_route(transcripts.get))
    add_delete("/v2/transcript/{id}", job_route(transcripts.delete))
    add_get("/v2/transcript/{id}/{sub}", job_route(transcripts.sub_resource))
    add_post("/v2/upload", upload_route(handler, uploads, managed=config.managed))
    add_route("*", "/v2/{tail:.*}", handler.route(rest.plan))
    add_route("*", "/v1/{tail:.*}", handler.route(partial(llm.plan, ids=transcripts), public=llm.PUBLIC))
    add_get("/v3/ws", sessions.handle)
    add_get("/v3/token", sessions.token)
    add_route("*", "/v3/{tail:.*}", handler.route(streaming.plan))
    add_route("*", "/{tail:.*}", not_found)
    return app


async def _bounded(what: str, step: Awaitable[Any], seconds: float = 5.0) -> None:
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        log.warning("shutdown: closing the %s took over %.0fs; moving on", what, seconds)
    except Exception as exc:
        log.warning("shutdown: closing the %s failed: %s", what, exc)


def redis_client(store: Store) -> Any:
    """The shared store's redis-py client (jobs, usage, tokens live beside the limits), or
    None for the embedded store. Through a FallbackStore: its primary's."""
    inner = store.primary if isinstance(store, FallbackStore) else store
    return getattr(inner, "_client", None)


def make_job_store(config: Config, store: Store, on_call: Callable[[str], None] | None = None) -> JobStore:
    """Jobs live beside the limits: in Redis when it is shared, else in a local sqlite file."""
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        keys = Keys(prefix=config.redis.key_prefix, account=config.account)
        return RedisJobStore(client, keys, on_call=on_call)
    return SqliteJobStore(Path(config.transcripts.data_dir) / "jobs.db")


def make_ledger(config: Config, store: Store) -> tuple[Ledger, TokenBook]:
    """Usage and streaming tokens live beside the jobs: Redis when shared, else local.
    With ``on_outage: fail_open``, what cannot reach Redis waits here until it answers."""
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        keys = Keys(prefix=config.redis.key_prefix, account=config.account)
        ledger, tokens = RedisLedger(client, keys), RedisTokenBook(client, keys)
        if isinstance(store, FallbackStore):
            pending = Path(config.transcripts.data_dir) / "usage-pending.db"
            return OutageLedger(ledger, pending), OutageTokenBook(tokens)
        return ledger, tokens
    return SqliteLedger(Path(config.transcripts.data_dir) / "usage.db"), MemoryTokenBook()


async def _write_back(ledger: OutageLedger, tokens: OutageTokenBook) -> None:
    """Usage and token notes kept while Redis was away go into it once it answers."""
    while True:
        await asyncio.sleep(WRITE_BACK_EVERY_S)
        if len(ledger):
            await ledger.flush()
        await tokens.flush()


def make_upload_book(config: Config, store: Store) -> UploadBook:
    """Who made each upload (managed mode): beside the jobs, Redis when shared, else here."""
    retention_s = config.transcripts.retention_days * 86400
    client = redis_client(store)
    if config.redis.url is not None and client is not None:
        return RedisUploadBook(
            client, Keys(prefix=config.redis.key_prefix, account=config.account), retention_s
        )
    return MemoryUploadBook(retention_s)


def _outage_gauges(store: FallbackStore, metrics: Metrics) -> Callable[[], None]:
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
