"""The request path, top to bottom:

    identify (identity.py's middleware) -> route (a key is present) -> classify (the
    product's plan: upstream, limits, body) -> admit (the engine; may wait) -> forward
    (stream to upstream and back) -> observe (status, retries) -> release (refund a lease
    for work that never left)

An upstream 429 that still gets through (another user of the account, a limit set above the
real one) is retried after upstream's Retry-After (X-RateLimit-Reset on the LLM Gateway),
within the request's max wait and with NEW leases, when the gateway still holds the body.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..admission.engine import AdmissionEngine, Grant
from ..clock import Clock
from ..config import Config
from ..errors import RateLimited, ShuttingDown, StoreUnavailable, Unauthorized
from ..logs import note_access
from ..metrics import Metrics
from .body import ClientBody
from .forward import (
    Connection,
    NeverLeft,
    StaleUpstream,
    Unsendable,
    Upstream,
    readable_accept_encoding,
    relay,
    request_headers,
    translate,
)
from .headers import admitted_headers, refused_headers
from .http1 import Response
from .plan import Plan
from .urls import gateway_base, rewrite_page_details

log = logging.getLogger(__name__)

GROUP = "group"  # the access dict's route group (logs.note_access): shared by clones of the request

# A product's classifier (gateway/products/): the request and the running config in, the
# Plan out. What else it needs (the account's limits) it brings bound: the proxy knows none
# of it.
Planner = Callable[[web.Request, Config], Awaitable[Plan]]


# The queue share of requests that carry no key (GET /v1/models).
ANONYMOUS = "anonymous"


def _guard_s(grant: Grant) -> float:
    """How long after admission the request may still arrive upstream: the smallest guard
    of the windows it took (a concurrency lease has none: it counts until released)."""
    guards = [(limit.lease_ms - limit.window_ms) / 1000 for limit in grant.limits if limit.window_ms]
    return min(guards) if guards else float("inf")


class Fetched(NamedTuple):
    """An answer the gateway read itself, and the RateLimit headers of its admission."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    rate_headers: dict[str, str]


class ClientGone(Exception):
    """The client left while its request waited; nothing was forwarded or charged."""


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def upstream_retry_delay(headers: Mapping[str, str], default: float = 1.0) -> float:
    """Seconds upstream asks us to wait: Retry-After (seconds or a date), else X-RateLimit-Reset."""
    value = headers.get(hdrs.RETRY_AFTER)
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (ValueError, TypeError):  # neither seconds nor a date: ignored
                when = None
            if when is not None:
                return max(0.0, when.timestamp() - time.time())
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset))
        except ValueError:
            pass
    return default


# Requests that change nothing upstream: sent again after a stale connection (RFC 9110 9.2.2).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ProxyHandler:
    def __init__(
        self,
        cfg: Config,
        *,
        engine: AdmissionEngine,
        upstream: Upstream,
        metrics: Metrics,
        clock: Clock,
        owner_of: Callable[[web.Request], str],
    ) -> None:
        """``owner_of``: whose request it is (identity.py's, as its middleware set it): the
        share of the queue it waits in, and the upstream connections it may reuse."""
        self._cfg = cfg
        # SIGTERM: admissions no longer wait (a request admitted at once still goes), and a
        # waiter the engine hands back is answered 429 with Retry-After (errors.ShuttingDown).
        self.draining = False
        self._engine = engine
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock
        self._owner_of = owner_of

    def use_config(self, cfg: Config) -> None:
        """A reloaded config (gateway/reload.py): queue and proxy settings apply from the next
        request on."""
        self._cfg = cfg

    def route(
        self, planner: Planner, *, public: frozenset[tuple[str, str]] = frozenset()
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if (
                hdrs.AUTHORIZATION not in request.headers
                and (request.method, request.path.rstrip("/")) not in public
            ):
                raise Unauthorized()
            plan = await planner(request, self._cfg)
            note_access(request, group=plan.group)
            return await self.forward(request, plan)

        return handle

    def product(
        self,
        serve: Callable[[web.Request], Awaitable[web.StreamResponse | None]],
        *,
        fallback: Planner,
        group: str,
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A route a product serves itself (transcript jobs); when it declines (None: not one
        of its ids), the request is forwarded like any other."""
        forward = self.route(fallback)

        async def handle(request: web.Request) -> web.StreamResponse:
            if hdrs.AUTHORIZATION not in request.headers:
                raise Unauthorized()
            note_access(request, group=group)
            served = await serve(request)
            return served if served is not None else await forward(request)

        return handle

    async def forward(self, request: web.Request, plan: Plan) -> web.StreamResponse:
        """Admit, send upstream and relay the answer to the client (streamed)."""
        path = plan.path or request.raw_path  # as the client sent it: encoded, query untouched
        headers = request_headers(request.headers, keep_length=plan.body is None)
        if plan.own_body:  # the gateway's own JSON, not the client's (maybe compressed) bytes
            headers.popall(hdrs.CONTENT_ENCODING, None)
        if plan.rewrite is not None or plan.rewrite_urls:  # an answer the gateway must read: plain
            headers.popall(hdrs.ACCEPT_ENCODING, None)
        elif plan.tap is not None:  # an answer read as it passes: in a coding it can read
            readable_accept_encoding(headers)
        resp, grant = await self._exchange(
            plan, request.method, path, headers, self._data(request, plan), request
        )
        try:
            extra = admitted_headers(grant.limits, grant.states) if grant else {}
            return await relay(
                request,
                resp,
                extra_headers=extra,
                rewrite=self._rewriter(request, plan),
                required=plan.must_read,
                tap=plan.tap(resp.status, resp.headers) if plan.tap is not None else None,
            )
        except (OSError, TimeoutError) as exc:  # a lost connection either way
            raise translate(exc) from exc
        finally:
            resp.release()

    async def fetch(
        self, plan: Plan, method: str, path: str, headers: Mapping[str, str]
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """Admit, send upstream and read a small answer: for the gateway's own calls
        (refreshing a transcript, say) rather than relaying one to a client."""
        fetched = await self.fetch_admitted(plan, method, path, headers, for_client=False)
        return fetched.status, fetched.headers, fetched.body

    async def fetch_admitted(
        self,
        plan: Plan,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        for_client: bool = True,
        owner: str = "",
    ) -> Fetched:
        """``fetch``, with the RateLimit headers of the admission: for an answer the gateway
        reads and then gives a client (the transcript list, whose ids it rewrites), whose
        wait counts against its key's share of the queue (``for_client``). The gateway's own
        calls (refreshes, the reconciler) are bounded by its jobs and take no share.
        ``owner``: whose share (identity.py), and whose upstream connections."""
        resp, grant = await self._exchange(
            plan, method, path, CIMultiDict(headers), plan.body or None, None, shared=for_client, owner=owner
        )
        try:
            body = await resp.read()
        except (OSError, TimeoutError) as exc:  # a lost connection either way
            raise translate(exc) from exc
        finally:
            resp.release()
        rate = admitted_headers(grant.limits, grant.states) if grant else {}
        return Fetched(resp.status, resp.headers, body, rate)

    async def _exchange(
        self,
        plan: Plan,
        method: str,
        path: str,
        headers: CIMultiDict[str],
        data: object,
        request: web.Request | None,
        *,
        shared: bool = True,
        owner: str | None = None,
    ) -> tuple[Response, Grant | None]:
        """One admitted upstream exchange, retrying an upstream 429 within the max wait when
        the body can be sent again. Returns the response unread (the caller releases it)."""
        deadline = self._clock.now() + plan.max_wait_s
        retries = 0
        resent = False  # a safe request sent again after a stale connection (once)
        url = URL(plan.base_url + path, encoded=True)
        # Who the request is for: the upstream pool never shares idle connections between
        # owners, and a client waits within its owner's share of the queue.
        identity = owner if owner is not None else (self._owner_of(request) if request is not None else "")
        held: Connection | None = None  # made ready while a token was given back (below)
        waited_s = upstream_s = 0.0  # for the access line, over every attempt
        while True:
            asked_at = time.perf_counter()
            try:
                grant = await self._admit(plan, deadline, (identity or ANONYMOUS) if shared else "")
            except BaseException:
                self._give_back(held)
                raise
            finally:
                waited_s += time.perf_counter() - asked_at
                note_access(request, wait_ms=round(waited_s * 1000, 1))
            admitted_at = time.perf_counter()
            if grant is not None:
                note_access(request, limits=[limit.name for limit in grant.limits])
            if request is not None and client_gone(request):
                await self._refund(grant)
                self._give_back(held)
                raise ClientGone()
            conn, held = (held if held is not None and self._upstream.sound(held) else None), None
            conn = conn or self._upstream.idle(url, identity)
            if conn is None:
                # A cold connection. The token is only good for the guard after admission
                # (upstream counts arrivals, ADMISSION.md I1): if connecting took longer, the
                # token goes back unused and the request is admitted again, connection in hand.
                try:
                    conn = await self._upstream.connect(url, identity)
                except BaseException:  # no connection, or the client left: nothing was sent
                    await self._refund(grant)
                    raise
                if grant is not None and time.perf_counter() - admitted_at > _guard_s(grant):
                    await self._refund(grant)
                    held = conn
                    log.info("connecting outlasted the guard: %s %s admitted again", method, url.path)
                    continue
            sent_at = time.perf_counter()
            try:
                resp = await self._upstream.send(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    group=plan.group,
                    admitted_at=admitted_at,
                    identity=identity,
                    conn=conn,
                )
            except (NeverLeft, Unsendable):
                self._give_back(conn)
                await self._refund(grant)
                raise
            except StaleUpstream:
                # The keep-alive race: upstream closed the reused connection as the request
                # was written. A safe request goes again on a new connection, once, admitted
                # again: its first token is kept (it most likely never arrived, not provably).
                if resent or method not in SAFE_METHODS or not isinstance(data, bytes | None):
                    raise
                resent = True
                self._metrics.child(self._metrics.upstream_resent, plan.group).inc()
                log.info("upstream closed a reused connection before answering %s %s: sent again",
                         method, url.path)  # fmt: skip
                continue
            finally:
                upstream_s += time.perf_counter() - sent_at
                note_access(request, upstream_ms=round(upstream_s * 1000, 1))
            if resp.status == 429 and self._may_retry(plan, retries):
                delay = upstream_retry_delay(resp.headers)
                if self._clock.now() + delay < deadline:
                    resp.release()
                    retries += 1
                    self._metrics.child(self._metrics.upstream_retries, plan.group).inc()
                    log.info("upstream answered 429 on %s %s; retrying in %.2fs", method, url.path, delay)
                    await self._clock.sleep(delay)
                    continue
            return resp, grant

    async def _admit(self, plan: Plan, deadline: float, owner: str) -> Grant | None:
        if not plan.limits:
            return None
        try:
            return await self._engine.admit(
                plan.limits,
                # Draining: no new wait (an upstream 429's retry included); the engine wakes no one.
                max_wait_s=0.0 if self.draining else max(0.0, deadline - self._clock.now()),
                max_depth=self._cfg.queue.max_depth,
                priority=plan.priority,
                group=plan.group,
                owner=owner,
                max_owner_depth=self._cfg.queue.depth_per_key if owner else None,
            )
        except RateLimited as exc:
            if self.draining:
                raise ShuttingDown() from None
            limit = next(limit for limit in plan.limits if limit.name == exc.limit)
            exc.headers.update(refused_headers(limit, exc.retry_after_s))
            raise
        except StoreUnavailable:
            if self.draining:  # the engine closed: its waiters are handed back
                raise ShuttingDown() from None
            raise

    def _give_back(self, conn: Connection | None) -> None:
        if conn is not None:
            self._upstream.give_back(conn)

    async def _refund(self, grant: Grant | None) -> None:
        """Give back leases for a request that provably never left the gateway."""
        if grant is not None:
            await self._engine.release(grant)

    def _may_retry(self, plan: Plan, retries: int) -> bool:
        return (
            plan.retryable
            and self._cfg.proxy.retry_upstream_429
            and retries < self._cfg.proxy.max_upstream_retries
        )

    @staticmethod
    def _data(request: web.Request, plan: Plan) -> object:
        if plan.body is None:
            # Streamed, never held in memory: counted against its Content-Length and bounded in
            # time; a mismatch or a stall raises from the stream, which aborts the upstream
            # exchange (the connection is discarded, never pooled). Bytes may have reached
            # upstream by then, so the window token is not refunded.
            return ClientBody(request)
        return plan.body or None

    def _rewriter(self, request: web.Request, plan: Plan) -> Callable[[bytes], bytes] | None:
        if not plan.rewrite_urls and plan.rewrite is None:
            return None
        base = gateway_base(
            request, public_url=self._cfg.public_url, trust_forwarded=self._cfg.proxy.trust_forwarded_headers
        )
        api_url, change = plan.base_url, plan.rewrite

        def rewrite(body: bytes) -> bytes:
            if change is not None:
                try:
                    body = json.dumps(change(json.loads(body))).encode()
                except (UnicodeDecodeError, json.JSONDecodeError):
                    pass  # not JSON after all: passed on as it is
            if plan.rewrite_urls:
                body = rewrite_page_details(body, api_url=api_url, base=base)
            return body

        return rewrite
