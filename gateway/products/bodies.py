"""Reading the bodies a product must hold to classify a request (the ``Plan`` itself, what
the proxy forwards, lives with the proxy: gateway/proxy/plan.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import BadRequest
from ..proxy.body import codings, inflate, read_whole

JSON_TYPES = ("application/json",)


@dataclass(frozen=True, slots=True)
class Held:
    """A body the gateway read whole: ``raw`` as the client sent it (what is forwarded) and
    its content codings; ``decoded`` is what the gateway parses."""

    raw: bytes
    codings: tuple[str, ...] = ()

    def decoded(self, cap: int) -> bytes:
        """The body inflated (gzip, deflate), within ``cap`` inflated bytes (413 beyond);
        415 for a coding the gateway cannot read, 400 for corrupt data."""
        return inflate(self.raw, list(self.codings), cap) if self.codings else self.raw


async def read_held(request: web.Request, cap: int) -> Held:
    """Read a body the gateway must hold, whatever its content type: at most ``cap`` bytes
    as sent (413), within the client body timeout (408)."""
    return Held(await read_whole(request, cap), tuple(codings(request.headers)))


async def hold(request: web.Request, cap: int) -> bytes | None:
    """The body to forward when the gateway holds it: a JSON body (as sent, capped), b"" for
    none, None to stream."""
    if not request.can_read_body:
        return b""
    if request.content_type in JSON_TYPES:
        return await read_whole(request, cap)
    return None


async def held_body(request: web.Request, cap: int) -> bytes | None:
    """A JSON body to parse (inflated, capped), b"" for none, None for another content type."""
    if not request.can_read_body:
        return b""
    if request.content_type in JSON_TYPES:
        return (await read_held(request, cap)).decoded(cap)
    return None


async def read_object(request: web.Request, cap: int) -> dict[str, Any]:
    """The body as a JSON object, whatever its Content-Type (curl sends JSON as form data by
    default), inflated and capped; a clear 400 when it is not one."""
    return parse_object((await read_held(request, cap)).decoded(cap))


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a clear 400."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("Request body must be a JSON object")
    return value
