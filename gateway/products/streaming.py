"""Streaming v3 (/v3/*) over HTTP: temporary tokens.

``GET /v3/token`` goes to the streaming host over HTTPS and takes a token from the account
window. The WebSocket itself (``/v3/ws``) is relayed by streaming_relay.py.
"""

from __future__ import annotations

from aiohttp import web

from ..config import Config
from ..errors import NotFound
from ..proxy.plan import Plan
from .catalog import Catalog

TOKEN = "/v3/token"
WS = "/v3/ws"


def http_base(streaming_url: str) -> str:
    """wss://host -> https://host (ws:// -> http://, for the simulator)."""
    if streaming_url.startswith("wss://"):
        return "https://" + streaming_url[len("wss://") :]
    return "http://" + streaming_url[len("ws://") :]


async def plan(request: web.Request, cfg: Config, catalog: Catalog) -> Plan:
    path = request.path.rstrip("/")
    if path != TOKEN:
        raise NotFound()
    window = catalog.account_window("token", request.method)
    return Plan("token", http_base(cfg.upstream.streaming_url), window, cfg.queue.max_wait_s, b"")
