"""Absolute URLs in upstream responses that point back at the API, rewritten to the gateway.

The gateway's own base is ``public_url`` when configured, else the request's own scheme and
host (``X-Forwarded-Proto`` / ``X-Forwarded-Host`` only when configured as trusted).
"""

from __future__ import annotations

import json

from aiohttp import web


def gateway_base(request: web.Request, *, public_url: str | None, trust_forwarded: bool) -> str:
    if public_url:
        return public_url
    scheme, host = request.scheme, request.host
    if trust_forwarded:
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip() or scheme
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
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
