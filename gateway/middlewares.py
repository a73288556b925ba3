"""What every request passes through before a product sees it, and what every answer gets.

Outermost first (the order build_app gives them): ``access_middleware`` (the access dict,
its request id, requests in progress), ``target_middleware`` (a path read one way only, or a
400), ``errors_middleware`` (every error a client sees, rendered here in one place as
``{"error": "..."}``, and counted); identity.py's and spend.py's come after. Two aiohttp hooks
answer in the same shape where no middleware runs: ``json_protocol_errors`` (a request the
parser rejects) and ``expect_continue`` (an Expect header it cannot meet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from yarl import URL

from .errors import GatewayError, StoreUnavailable
from .identity import identity_of
from .logs import ACCESS, REQUEST_ID, access_fields, request_id
from .metrics import Metrics
from .proxy.handler import GROUP, ClientGone
from .usage import Tally

log = logging.getLogger("gateway")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, GatewayError):
        name = type(exc).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
    return "internal_error"


def errors_middleware(
    metrics: Metrics, tally: Tally | None = None
) -> Callable[..., Awaitable[web.StreamResponse]]:
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
            fields = access_fields(request)
            group = fields.setdefault(GROUP, "other")
            if request.path.startswith(("/v1", "/v2", "/v3")):
                metrics.child(metrics.requests, group, outcome).inc()
                if tally is not None:
                    tally.note(identity_of(request), group, outcome, fields.get("wait_ms"))

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
