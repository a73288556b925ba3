"""Streaming v3 (/v3/*): temporary tokens now; the WebSocket relay comes with its own work.

``GET /v3/token`` goes to the streaming host over HTTPS and takes a token from the account
window. ``/v3/ws`` answers a clear 501 until the streaming relay exists.
"""

from __future__ import annotations

from aiohttp import web

from ..config import Config
from ..errors import NotFound, NotImplementedYet
from .catalog import Catalog
from .plan import Plan

TOKEN = "/v3/token"
WS = "/v3/ws"


def http_base(streaming_url: str) -> str:
    """wss://host -> https://host (ws:// -> http://, for the simulator)."""
    if streaming_url.startswith("wss://"):
        return "https://" + streaming_url[len("wss://") :]
    return "http://" + streaming_url[len("ws://") :]


async def plan(request: web.Request, cfg: Config, catalog: Catalog) -> Plan:
    path = request.path.rstrip("/")
    if path == WS:
        raise NotImplementedYet(
            "Streaming through the gateway (/v3/ws) is not available yet; connect the streaming client to "
            "AssemblyAI directly for now"
        )
    if path != TOKEN:
        raise NotFound()
    window = catalog.account_window("token", request.method)
    return Plan("token", http_base(cfg.upstream.streaming_url), window, cfg.queue.max_wait_s, b"")
