"""What a request needs: which upstream, which limits, how long it may wait, its body."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from aiohttp import web

from ..admission.limits import Limit
from ..errors import BadRequest, PayloadTooLarge

JSON_TYPES = ("application/json",)


class Plan(NamedTuple):
    """The classification of one request, made before admission.

    ``body`` is the request body when the gateway had to read it (a JSON body: it can be
    forwarded again after an upstream 429); ``None`` means stream it from the client (an
    upload), in which case an upstream 429 is passed back, not retried.
    """

    group: str  # route group: rest | llm | token (metrics label, requests.route_groups)
    base_url: str  # upstream base URL; the request's raw path and query are appended
    limits: Sequence[Limit] = ()
    max_wait_s: float = 25.0
    body: bytes | None = None
    rewrite_urls: bool = False  # JSON responses may carry absolute URLs back to the API
    path: str | None = None  # the upstream path and query, when not the client's own
    rewrite: Callable[[Any], Any] | None = None  # applied to a JSON response document

    @property
    def retryable(self) -> bool:
        return self.body is not None


async def held_body(request: web.Request, cap: int) -> bytes | None:
    """The body the gateway holds: a JSON body (read, capped), b"" for none, None to stream."""
    if not request.can_read_body:
        return b""
    if request.content_type in JSON_TYPES:
        return await read_capped(request, cap)
    return None


async def read_capped(request: web.Request, cap: int) -> bytes:
    """Read a body the gateway must hold, refusing (413) anything over ``cap`` bytes."""
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"Request body is larger than the gateway's limit of {cap} bytes")
    buf = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > cap:
            raise PayloadTooLarge(f"Request body is larger than the gateway's limit of {cap} bytes")
    return bytes(buf)


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a clear 400."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("Request body must be a JSON object")
    return value
