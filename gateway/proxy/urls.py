"""Absolute URLs in upstream responses that point back at the API, rewritten to the gateway.

The gateway's own base is ``public_url`` when configured, else the request's own scheme and
host: ``https`` when the listener serves TLS (``listen.tls``), ``http`` otherwise.
``X-Forwarded-Proto`` / ``X-Forwarded-Host`` are honoured only when configured as trusted,
and only when they are well formed (``http``/``https``; a host name or address with an
optional port); a Host header that is not one is replaced by the listener's own address.
"""

from __future__ import annotations

import json
import re

from aiohttp import web

_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")


def _first(value: str) -> str:
    return value.split(",")[0].strip()


def _own_host(request: web.Request) -> str:
    host = request.host
    if _HOST.fullmatch(host):
        return host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return "localhost"
    address, port = sockname[:2]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def gateway_base(request: web.Request, *, public_url: str | None, trust_forwarded: bool) -> str:
    if public_url:
        return public_url
    scheme, host = request.scheme, _own_host(request)  # scheme: https on a TLS listener
    if trust_forwarded:
        proto = _first(request.headers.get("X-Forwarded-Proto", "")).lower()
        if proto in ("http", "https"):
            scheme = proto
        forwarded_host = _first(request.headers.get("X-Forwarded-Host", ""))
        if _HOST.fullmatch(forwarded_host):
            host = forwarded_host
    return f"{scheme}://{host}"


def rewrite_page_details(body: bytes, *, api_url: str, base: str) -> bytes:
    """Point ``page_details.*_url`` at the gateway; any other body is returned unchanged."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return body
    details = doc.get("page_details") if isinstance(doc, dict) else None
    if not isinstance(details, dict):
        return body
    changed = False
    for key, value in details.items():
        if key.endswith("_url") and isinstance(value, str) and value.startswith(api_url):
            details[key] = base + value[len(api_url) :]
            changed = True
    return json.dumps(doc).encode() if changed else body
