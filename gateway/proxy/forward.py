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

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from ..config import Upstream as UpstreamConfig
from ..errors import BadGateway, GatewayTimeout
from ..metrics import Metrics

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


def _connection_tokens(headers: Mapping[str, str]) -> set[str]:
    value = headers.get(hdrs.CONNECTION, "")
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def request_headers(incoming: Mapping[str, str], *, keep_length: bool) -> CIMultiDict[str]:
    drop = REQUEST_DROP | _connection_tokens(incoming)
    if not keep_length:
        drop = drop | {hdrs.CONTENT_LENGTH.lower()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in _items(incoming):
        if name.lower() not in drop:
            out.add(name, value)
    return out


def response_headers(incoming: CIMultiDictProxy[str], *, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    skip = HOP_BY_HOP | _connection_tokens(incoming) | {d.lower() for d in drop}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in skip:
            out.add(name, value)
    return out


def _items(headers: Mapping[str, str]) -> Iterable[tuple[str, str]]:
    items = getattr(headers, "items", None)
    return items() if items is not None else ()


class Upstream:
    """The one upstream HTTP client of an app."""

    def __init__(self, cfg: UpstreamConfig, metrics: Metrics) -> None:
        self._cfg = cfg
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(self._on_headers_sent)
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
            trace_configs=[trace],
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

    async def _on_headers_sent(
        self,
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceRequestHeadersSentParams,
    ) -> None:
        admitted_at = (ctx.trace_request_ctx or {}).get("admitted_at")
        if admitted_at is not None:
            self._metrics.admission_to_send.observe(max(0.0, time.perf_counter() - admitted_at))

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: CIMultiDict[str],
        data: Any,
        group: str,
        admitted_at: float,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request; yield the response with its body still unread."""
        started = time.perf_counter()
        try:
            async with self.session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                trace_request_ctx={"admitted_at": admitted_at},
            ) as resp:
                self._metrics.upstream_latency.labels(group).observe(time.perf_counter() - started)
                self._metrics.upstream_status.labels(group, str(resp.status)).inc()
                yield resp
        except aiohttp.ConnectionTimeoutError as exc:
            raise NeverLeft("Timed out connecting to the upstream API") from exc
        except aiohttp.ClientConnectorError as exc:
            raise NeverLeft("Could not connect to the upstream API") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise GatewayTimeout() from exc
        except aiohttp.ClientPayloadError as exc:
            raise BadGateway("The upstream API's response was cut short") from exc
        except aiohttp.ClientError as exc:
            raise BadGateway(f"Upstream request failed ({type(exc).__name__})") from exc


async def relay(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str],
    rewrite: Callable[[bytes], bytes] | None = None,
    rewrite_cap: int = 4 * 1024 * 1024,
) -> web.StreamResponse:
    """Send upstream's response to the client: status, headers and a streamed body.

    With ``rewrite``, a JSON body (within ``rewrite_cap``) is read, rewritten and sent whole.
    """
    length = resp.content_length
    is_json = resp.content_type == "application/json"
    if (
        rewrite is not None
        and is_json
        and not resp.headers.get(hdrs.CONTENT_ENCODING)
        and (length or 0) <= rewrite_cap
    ):
        body = rewrite(await resp.read())
        headers = response_headers(resp.headers, drop=(hdrs.CONTENT_LENGTH,))
        headers.update(extra_headers)
        return web.Response(status=resp.status, reason=resp.reason, body=body, headers=headers)

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
