"""The baseline of the proxy-overhead benchmark: a bare aiohttp pass-through proxy.

What the gateway does minus everything that makes it a gateway: one ClientSession with an
unbounded pool (``TCPConnector(limit=0)``, as the gateway's), every request forwarded with
its method, path and query, headers (hop-by-hop ones dropped) and body (streamed), and the
response streamed back. No admission, no Redis, no metrics, no body reading, no access log.

bench/proxy_overhead.py starts it in its own process, on the same event loop as the gateway
variant it is compared with. Run alone:

    python bench/bare_proxy.py --port 8198 --upstream http://127.0.0.1:8199 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import hdrs, web

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        "Keep-Alive",
        hdrs.PROXY_AUTHENTICATE,
        hdrs.PROXY_AUTHORIZATION,
        hdrs.TE,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
    )
)
REQUEST_DROP = HOP_BY_HOP | {hdrs.HOST.lower()}
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    upstream = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=(hdrs.USER_AGENT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE),
        )
        yield
        await app[SESSION].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in REQUEST_DROP}
        data = request.content if request.can_read_body else None
        async with request.app[SESSION].request(
            request.method, upstream + request.raw_path, headers=headers, data=data, allow_redirects=False
        ) as resp:
            out_headers = {
                k: v
                for k, v in resp.headers.items()
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
            }
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=out_headers)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8198)
    parser.add_argument("--upstream", default="http://127.0.0.1:8199")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
