"""Forwarding to upstream: one connection pool per app (http1.py), streamed bodies both ways.

- Idle connections are pooled per client identity (``send(identity=...)``, a fingerprint of
  the client's key): a confused upstream can at worst mislead the client it was talking to.
- The connection pool is unbounded, so an admitted request never waits for a connection
  (that wait would push its arrival upstream past the guard, ADMISSION.md I1); the delay from
  admission to the request's head leaving is measured.
- Hop-by-hop headers are dropped both ways; everything else, ``Authorization`` included, is
  forwarded unchanged. Bodies stream (uploads reach 2.2 GB, LLM answers may be SSE) except
  the small JSON bodies the gateway had to read, which it forwards from memory.
- A product may read an answer as it passes (``Tap``: an LLM answer's usage): the relay
  feeds it each chunk after writing it to the client and tells it, in a task of its own,
  when the answer ended; the bytes the client gets are upstream's, never re-encoded.
- Client errors are translated here, in one place: a failed connect (or connect timeout) is
  ``NeverLeft``, a ``BadGateway`` with ``never_left=True`` (the caller refunds the window
  lease), a read timeout ``GatewayTimeout``, a body cut short or a lost connection
  ``BadGateway``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..admission.engine import Grant
from ..config import Upstream as UpstreamConfig
from ..errors import BadGateway, BadRequest, GatewayTimeout
from ..metrics import Metrics
from .http1 import Connection, InvalidHead, NeverLeft, PayloadError, Pool, Response, StaleConnection

log = logging.getLogger(__name__)

# Bodies up to this size (with a Content-Length) are sent whole: one write with the headers.
WHOLE_BODY_BYTES = 64 * 1024

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        "Keep-Alive",
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        "Trailers",
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
    )
)
# Never forwarded upstream: set by the client library for the hop, or the gateway's own.
# (Expect: the gateway's server already answered the client's 100-continue.)
REQUEST_DROP = HOP_BY_HOP | {hdrs.HOST.lower(), hdrs.EXPECT.lower(), "x-aai-gateway-priority"}
__all__ = [
    "Connection",
    "Tap",
    "guard_s",
    "NeverLeft",
    "readable_accept_encoding",
    "Unsendable",
    "Upstream",
    "relay",
    "request_headers",
    "response_headers",
    "translate",
]


def guard_s(grant: Grant | None) -> float:
    """How long after admission a request may still arrive upstream (ADMISSION.md I1): the
    smallest guard of the windows it took. A concurrency lease has none: it counts until
    released. Past it, a request not yet sent gives its tokens back and is admitted again."""
    if grant is None:
        return float("inf")
    guards = [(limit.lease_ms - limit.window_ms) / 1000 for limit in grant.limits if limit.window_ms]
    return min(guards) if guards else float("inf")


class Tap(Protocol):
    """Reads an answer as the relay passes it to the client (a product's business: what it
    used). ``feed`` is called with each chunk once it was written: it must be quick, keep
    what it needs (bounded) and never raise. ``done`` is called once, in a task of its own,
    when upstream's answer has all passed (``complete``) or could not (upstream cut it
    short, the client left): it may record; an error there is logged, never the client's."""

    def feed(self, chunk: bytes) -> None: ...

    async def done(self, complete: bool) -> None: ...


# The codings a Tap can read (gzip, deflate); asked of upstream when an answer is tapped.
READABLE_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})


def readable_accept_encoding(headers: CIMultiDict[str]) -> None:
    """Keep only the codings a Tap can read in ``Accept-Encoding`` (q-values kept); none
    left: the header goes (an uncompressed answer)."""
    values = headers.popall(hdrs.ACCEPT_ENCODING, [])
    kept = [
        part.strip()
        for value in values
        for part in value.split(",")
        if part.split(";")[0].strip().lower() in READABLE_CODINGS
    ]
    if kept:
        headers[hdrs.ACCEPT_ENCODING] = ", ".join(kept)


class StaleUpstream(BadGateway):
    """A reused upstream connection failed before any answer (``http1.StaleConnection``):
    the proxy sends a safe request again, once, on a new connection (handler.py)."""


class Unsendable(BadRequest):
    """A request HTTP/1.1 cannot carry (control characters in its path or headers): never
    sent, so its window lease may be refunded."""

    never_left = True


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get(hdrs.CONNECTION, "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(incoming: Mapping[str, str], *, keep_length: bool) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(incoming)  # a C copy; then drop what must not pass
    for name in (*REQUEST_DROP, *_connection_tokens(incoming)):
        out.popall(name, None)
    if not keep_length:
        out.popall(hdrs.CONTENT_LENGTH, None)
    return out


def response_headers(incoming: CIMultiDictProxy[str], *, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(incoming)  # a C copy; then drop what must not pass
    for name in (*HOP_BY_HOP, *_connection_tokens(incoming), *drop):
        out.popall(name, None)
    return out


class Upstream:
    """The one upstream HTTP client of an app."""

    def __init__(self, cfg: UpstreamConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._pool: Pool | None = None

    async def start(self) -> None:
        cfg = self._cfg
        self._pool = Pool(connect_timeout_s=cfg.connect_timeout_s, read_timeout_s=cfg.read_timeout_s)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # A connection in hand before admission ends, so an admitted request leaves at once
    # (ADMISSION.md I1: a cold connect after admission would push its arrival past the guard).
    def idle(self, url: URL, identity: str = "") -> Connection | None:
        assert self._pool is not None, "Upstream.start() was not awaited"
        return self._pool.idle(url, identity)

    async def connect(self, url: URL, identity: str = "") -> Connection:
        """``NeverLeft`` when no connection could be made."""
        assert self._pool is not None, "Upstream.start() was not awaited"
        return await self._pool.connect(url, identity)

    def sound(self, conn: Connection) -> bool:
        assert self._pool is not None, "Upstream.start() was not awaited"
        return self._pool.sound(conn)

    def give_back(self, conn: Connection) -> None:
        if self._pool is not None:
            self._pool.give_back(conn)

    async def send(
        self,
        method: str,
        url: URL,
        *,
        headers: CIMultiDict[str],
        data: Any,
        group: str,
        admitted_at: float,
        timeout_s: float | None = None,
        identity: str = "",
        conn: Connection | None = None,
    ) -> Response:
        """Send one request; return the response with its body unread (the caller releases it).
        ``timeout_s`` bounds the whole exchange (a dispatch must end within its claim).
        ``identity`` (a fingerprint of the client's key) picks the connection pool: an idle
        upstream connection is never shared between two identities."""
        assert self._pool is not None, "Upstream.start() was not awaited"
        m = self._metrics
        started = time.perf_counter()

        def sending() -> None:
            m.admission_to_send.observe(max(0.0, time.perf_counter() - admitted_at))

        try:
            resp = await self._pool.request(
                method, url, headers, data, timeout_s=timeout_s, on_send=sending, identity=identity, conn=conn
            )
        except NeverLeft:
            raise
        except InvalidHead as exc:
            raise Unsendable(str(exc)) from exc
        except StaleConnection as exc:
            raise StaleUpstream(f"Upstream request failed ({ConnectionError.__name__})") from exc
        except (OSError, TimeoutError) as exc:
            raise translate(exc) from exc
        m.child(m.upstream_latency, group).observe(time.perf_counter() - started)
        m.child(m.upstream_status, group, str(resp.status)).inc()
        return resp


def translate(exc: BaseException) -> Exception:
    """The client error an upstream failure becomes (the one place they are mapped);
    http1.py raises NeverLeft itself when no connection could be made."""
    if isinstance(exc, NeverLeft):
        return exc
    if isinstance(exc, TimeoutError):
        return GatewayTimeout()
    if isinstance(exc, PayloadError):
        return BadGateway("The upstream API's response was cut short")
    return BadGateway(f"Upstream request failed ({type(exc).__name__})")


async def relay(
    request: web.Request,
    resp: Response,
    *,
    extra_headers: Mapping[str, str],
    rewrite: Callable[[bytes], bytes] | None = None,
    rewrite_cap: int = 4 * 1024 * 1024,
    required: bool = False,
    tap: Tap | None = None,
) -> web.StreamResponse:
    """Send upstream's response to the client: status, headers and a streamed body.

    A small body of known length (most API answers) is read and sent with the headers in one
    write; anything else streams. With ``rewrite``, a JSON body (within ``rewrite_cap``, read
    no further than that even when its length is not given) is read, rewritten and sent
    whole. ``required``: a 2xx JSON answer the rewrite could not read is a BadGateway.
    ``tap``: fed upstream's bytes as they pass (before any rewrite), told when they ended.
    """
    if tap is None:
        return await _relay(request, resp, extra_headers, rewrite, rewrite_cap, required, None)
    try:
        out = await _relay(request, resp, extra_headers, rewrite, rewrite_cap, required, tap)
    except BaseException:
        _tap_done(tap, complete=False)
        raise
    _tap_done(tap, complete=True)
    return out


_ending: set[asyncio.Task[None]] = set()  # taps' ``done`` still running (held: never collected)


def _tap_done(tap: Tap, *, complete: bool) -> None:
    """The tap's ``done``, in a task of its own: the client's answer never waits for it (a
    whole answer is sent once the handler returns) and it runs to its end even when the
    client left (aiohttp then cancels the handler); an error is logged."""
    task = asyncio.ensure_future(tap.done(complete))
    _ending.add(task)
    task.add_done_callback(_tap_ended)


def _tap_ended(task: asyncio.Task[None]) -> None:
    _ending.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("reading an answer as it passed failed at its end", exc_info=exc)


async def _relay(
    request: web.Request,
    resp: Response,
    extra_headers: Mapping[str, str],
    rewrite: Callable[[bytes], bytes] | None,
    rewrite_cap: int,
    required: bool,
    tap: Tap | None,
) -> web.StreamResponse:
    length = resp.content_length
    head = b""  # what was read of a body found over the cap: sent first
    json_answer = resp.content_type == "application/json"
    if rewrite is not None and (length or 0) <= rewrite_cap and not resp.headers.get(hdrs.CONTENT_ENCODING):
        if json_answer:
            head, whole = await _read_upto(resp, rewrite_cap)
            if whole:
                headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
                headers.update(extra_headers)
                if tap is not None:
                    tap.feed(head)
                return web.Response(
                    status=resp.status, reason=resp.reason, body=rewrite(head), headers=headers
                )
    if required and rewrite is not None and json_answer and 200 <= resp.status < 300:
        raise BadGateway("The upstream API's answer could not be read (compressed or too large)")
    if not head and length is not None and length <= WHOLE_BODY_BYTES and request.method != hdrs.METH_HEAD:
        headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
        headers.update(extra_headers)
        body = await resp.read()
        if tap is not None:
            tap.feed(body)
        return web.Response(status=resp.status, reason=resp.reason, body=body, headers=headers)

    headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
    headers.update(extra_headers)
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if length is not None:
        out.content_length = length
    await out.prepare(request)
    if head:
        await out.write(head)
        if tap is not None:
            tap.feed(head)
    if tap is None:
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
    else:
        async for chunk in resp.content.iter_any():
            await out.write(chunk)
            tap.feed(chunk)  # after the write: the client never waits for the reading
    await out.write_eof()
    return out


async def _read_upto(resp: Response, cap: int) -> tuple[bytes, bool]:
    """The body, and True; or, once it passes ``cap`` bytes, what was read so far and False
    (a body of unknown length is never held whole past the cap)."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks), False
    return b"".join(chunks), True
