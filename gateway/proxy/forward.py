"""Forwarding to upstream: one ClientSession per app, streamed bodies both ways.

- The connection pool is unbounded, so an admitted request never waits for a connection
  (that wait would push its arrival upstream past the guard, ADMISSION.md I1); the delay from
  admission to the request's headers leaving is measured by a client trace.
- Hop-by-hop headers are dropped both ways; everything else, ``Authorization`` included, is
  forwarded unchanged. Bodies stream (uploads reach 2.2 GB, LLM answers may be SSE) except
  the small JSON bodies the gateway had to read, which it forwards from memory.
- aiohttp client errors are translated here, in one place: a failed connect is
  ``BadGateway`` with ``never_left=True`` (the caller refunds the window lease), a connect
  timeout likewise, a read timeout ``GatewayTimeout``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import Upstream as UpstreamConfig
from ..errors import BadGateway, GatewayTimeout
from ..metrics import Metrics

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
REQUEST_DROP = HOP_BY_HOP | {hdrs.HOST.lower(), "x-aai-gateway-priority"}


class NeverLeft(BadGateway):
    """The request provably never reached upstream: its window lease may be refunded."""

    never_left = True


# (admitted at, histogram) for the request this task is sending: read by _TimedRequest.
_SENDING: contextvars.ContextVar[tuple[float, Any] | None] = contextvars.ContextVar(
    "aai_sending", default=None
)


class _TimedRequest(aiohttp.ClientRequest):
    """Observes admission -> send: ``send`` runs once the connection is ready, right before
    the request's headers are written, in the task that issued the request."""

    async def send(self, conn: Any) -> aiohttp.ClientResponse:
        sending = _SENDING.get()
        if sending is not None:
            sending[1].observe(max(0.0, time.perf_counter() - sending[0]))
        return await super().send(conn)


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
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # never make an admitted request wait for a connection
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._cfg.connect_timeout_s, sock_read=self._cfg.read_timeout_s
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            request_class=_TimedRequest,
            skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

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
    ) -> aiohttp.ClientResponse:
        """Send one request; return the response with its body unread (the caller releases it).
        ``timeout_s`` bounds the whole exchange (a dispatch must end within its claim)."""
        m = self._metrics
        _SENDING.set((admitted_at, m.admission_to_send))
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if timeout_s is not None:
            extra["timeout"] = aiohttp.ClientTimeout(total=timeout_s, connect=self._cfg.connect_timeout_s)
        try:
            resp = await self.session.request(
                method, url, headers=headers, data=data, allow_redirects=False, **extra
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc) from exc
        m.child(m.upstream_latency, group).observe(time.perf_counter() - started)
        m.child(m.upstream_status, group, str(resp.status)).inc()
        return resp


def translate(exc: BaseException) -> Exception:
    """The client error an aiohttp failure becomes (the one place they are mapped)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return NeverLeft("Timed out connecting to the upstream API")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return NeverLeft("Could not connect to the upstream API")
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return GatewayTimeout()
    if isinstance(exc, aiohttp.ClientPayloadError):
        return BadGateway("The upstream API's response was cut short")
    return BadGateway(f"Upstream request failed ({type(exc).__name__})")


async def relay(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str],
    rewrite: Callable[[bytes], bytes] | None = None,
    rewrite_cap: int = 4 * 1024 * 1024,
) -> web.StreamResponse:
    """Send upstream's response to the client: status, headers and a streamed body.

    A small body of known length (most API answers) is read and sent with the headers in one
    write; anything else streams. With ``rewrite``, a JSON body (within ``rewrite_cap``) is
    read, rewritten and sent whole.
    """
    length = resp.content_length
    if rewrite is not None and (length or 0) <= rewrite_cap and not resp.headers.get(hdrs.CONTENT_ENCODING):
        if resp.content_type == "application/json":
            headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
            headers.update(extra_headers)
            body = rewrite(await resp.read())
            return web.Response(status=resp.status, reason=resp.reason, body=body, headers=headers)
    if length is not None and length <= WHOLE_BODY_BYTES and request.method != hdrs.METH_HEAD:
        headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
        headers.update(extra_headers)
        return web.Response(status=resp.status, reason=resp.reason, body=await resp.read(), headers=headers)

    headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
    headers.update(extra_headers)
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
    if length is not None:
        out.content_length = length
    await out.prepare(request)
    async for chunk in resp.content.iter_any():
        await out.write(chunk)
    await out.write_eof()
    return out
