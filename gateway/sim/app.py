"""The upstream simulator: a faithful stand-in for AssemblyAI, and the judge of every limit.

It serves REST v2, the LLM Gateway and streaming v3 on ONE listener (point the gateway's
``api_url``, ``llm_url`` and ``streaming_url`` all at it), enforces the account limits the
way upstream does (UPSTREAM.md) and records every violation, so tests can assert that the
gateway never caused one, and read each limit's busiest window (capacity actually used).
Here: the app, its middlewares (the account window, faults), streaming v3 and the admin
routes; state.py holds the config and state, rest.py REST v2, llm.py the LLM Gateway.

LLM answers carry token counts drawn from a generator seeded per request (deterministic for
a run, varied between requests); each answer's counts are kept in ``Sim.llm_billed`` (when
an SSE answer's usage chunk was written), so tests compare the gateway's ledger with what
upstream billed, exactly.

Admin endpoints (no auth): ``GET /_sim/report``, ``POST /_sim/reset``, ``POST /_sim/config``
(change limits or flags at run time, e.g. ``{"negative_balance": true}``).

Faults (tests/faults/): ``{"faults": {"kinds": {"5xx": 2, "reset": 1, "hang": 1, "slow": 1,
"cut": 1}, "every": 3, "paths": ["/v1/chat/completions"]}}`` in the config makes every
``every``-th request on those path prefixes (never ``/_sim``, never the WebSocket) misbehave,
the kinds taken in turn until each count is spent: ``5xx`` a 503 and ``reset`` a TCP RST
before the request is handled (nothing ran upstream), ``hang`` no answer for ``hang_s`` then
a close (nothing ran); ``slow`` the real answer trickled over ``slow_s``, ``cut`` the real
answer's first half then a close (the work ran, its answer is lost). ``report()["faults"]``
lists what was applied, with the indexes of the LLM bills whose answers were cut.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from aiohttp import hdrs, web

from . import llm, rest
from .state import AUTH_ERROR, KEY, NEGATIVE_BALANCE, READS, SIM, Sim, SimConfig, error

# Names imported from here by the CLI and the tests.
__all__ = ["KEY", "NEGATIVE_BALANCE", "SIM", "Sim", "SimConfig", "build_sim_app"]


def build_sim_app(sim: Sim | None = None) -> web.Application:
    sim = sim or Sim()

    @web.middleware
    async def account(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authenticate, then count the request against the account window at arrival."""
        path = request.path
        if path.startswith("/_sim"):
            return await handler(request)
        public = request.method == "GET" and path.rstrip("/") == "/v1/models"
        ws_token = path == "/v3/ws" and "token" in request.query
        key = request.headers.get(hdrs.AUTHORIZATION, "")
        if not public and not ws_token and not _valid_key(sim, key):
            return _record(sim, request, error(401, AUTH_ERROR))
        now = time.monotonic()
        counts = path != "/v3/ws" and (sim.config.count_reads or request.method not in READS)
        if counts and not sim.requests.arrive(now):
            sim.recorder.violate("requests", "requests", now, f"{request.method} {path}")
            retry = max(1, int(sim.requests.reset_in(now) + 0.999))
            return _record(sim, request, error(429, "Too Many Requests", {hdrs.RETRY_AFTER: str(retry)}))
        request[KEY] = key
        return _record(sim, request, await handler(request))

    @web.middleware
    async def faults(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        fault = sim.next_fault(request)
        return await handler(request) if fault is None else await _fault(sim, fault, request, handler)

    app = web.Application(middlewares=[faults, account], client_max_size=3 * 1024**3)
    app[SIM] = sim

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await sim.transcripts.close()

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    rest.add_routes(r)
    llm.add_routes(r)
    r.add_get("/v3/token", _token)
    r.add_get("/v3/ws", _ws)
    r.add_get("/_sim/report", _report)
    r.add_post("/_sim/reset", _reset)
    r.add_post("/_sim/config", _configure)
    return app


def _valid_key(sim: Sim, key: str) -> bool:
    if not key:
        return False
    return sim.config.keys is None or key in sim.config.keys


def _record(sim: Sim, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    sim.seen.append(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "status": resp.status,
            "at": time.monotonic(),
            "headers": dict(request.headers),
        }
    )
    return resp


async def _fault(
    sim: Sim,
    fault: dict[str, Any],
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """One misbehaving answer (the module's docstring says which)."""
    kind = fault["kind"]
    transport = request.transport
    assert transport is not None
    if kind == "5xx":
        return error(503, "Service Unavailable (simulated fault)")
    if kind in ("reset", "hang"):
        if kind == "hang":
            await asyncio.sleep(float(sim.config.faults.get("hang_s", 30.0)))
        else:  # SO_LINGER 0: close() sends an RST, not a FIN
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.close()
        return web.Response(status=500)  # never sent: the connection is gone
    billed = len(sim.llm_billed)
    resp = await handler(request)
    body = resp.body if isinstance(resp, web.Response) and not resp.prepared else None
    if not isinstance(body, bytes) or len(body) < 2:
        return resp  # a streamed answer (already sent): left as it is
    if kind == "cut":  # (bills made meanwhile by other requests are theirs: the handler bills last)
        fault["cut_bills"] = [
            i for i in range(billed, len(sim.llm_billed)) if sim.llm_billed[i]["path"] == request.path
        ]
    out = web.StreamResponse(status=resp.status, headers=resp.headers)
    out.content_length = len(body)
    await out.prepare(request)
    if kind == "cut":
        await out.write(body[: len(body) // 2])
        transport.close()  # a FIN mid-body: the answer ends short of its Content-Length
        return out
    pieces = 5
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        await out.write(body[i : i + step])
        await asyncio.sleep(float(sim.config.faults.get("slow_s", 1.0)) / pieces)
    await out.write_eof()
    return out


# -- Streaming v3 -----------------------------------------------------------------------------
async def _token(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    try:
        expires = int(request.query.get("expires_in_seconds", "60"))
    except ValueError:
        expires = 0
    if not 1 <= expires <= 600:
        return error(400, "expires_in_seconds must be between 1 and 600")
    return web.json_response({"token": sim.streaming.issue_token(expires), "expires_in_seconds": expires})


async def _ws(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    token = request.query.get("token")
    if token is not None and not sim.streaming.take_token(token):
        return error(401, AUTH_ERROR)
    return await sim.streaming.handle(request, request.get(KEY, "") or f"token:{token}")


# -- admin ------------------------------------------------------------------------------------
async def _report(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].report())


async def _reset(request: web.Request) -> web.Response:
    request.app[SIM].reset()
    return web.json_response({"status": "reset"})


async def _configure(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    changes = await request.json()
    sim.config = SimConfig.from_dict({**asdict(sim.config), **changes})
    if any(k not in ("negative_balance", "llm_latency_s", "job_seconds", "faults") for k in changes):
        sim.reset()
    elif "faults" in changes:
        sim.arm_faults()
    return web.json_response(asdict(sim.config))
