"""Pre-recorded transcription and the rest of REST v2 (/v2/*).

In this version every /v2 request takes a token from the account window (when its route
group and method count). JSON bodies are held (as sent, compressed or not) so an upstream 429
can be retried; uploads (``POST /v2/upload``, up to 2.2 GB) always stream and are never
retried. The transcript list's ``page_details.*_url`` point back at the API: rewritten to
the gateway.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from ..config import Config
from ..proxy.plan import Plan
from .bodies import hold
from .catalog import Catalog

UPLOAD = "/v2/upload"
TRANSCRIPTS = "/v2/transcript"


async def plan(request: web.Request, cfg: Config, catalog: Catalog) -> Plan:
    method, path = request.method, request.path.rstrip("/")
    window = catalog.account_window("rest", method)
    # Uploads always stream, whatever their content type.
    body = None if path == UPLOAD else await hold(request, cfg.proxy.max_json_body_bytes)
    rewrite = method == hdrs.METH_GET and path == TRANSCRIPTS
    return Plan("rest", cfg.upstream.api_url, window, cfg.queue.max_wait_s, body, rewrite_urls=rewrite)
