"""Client request bodies: as the client sent them, counted, and bounded in time.

- Bytes pass through as they came: the server does not decompress (``auto_decompress`` is
  off in app.py), so a body goes upstream with its own ``Content-Encoding``. A body the
  gateway must read (a JSON document) is inflated only to be read (``inflate``), within the
  size cap counted on the inflated bytes, and forwarded as it was received.
- Every body read from the client is counted against its ``Content-Length``; a body that
  ends short (the client vanished, or lied) or runs long raises ``BadRequest`` from the
  iterator, so an upstream exchange it was feeding is aborted (the upstream client discards
  the connection on any exception while sending) and never pooled.
- Time, as Apache's mod_reqtimeout (``body=30,MinRate=500``): a body may take
  ``client_body_timeout_s`` plus one second per ``client_body_min_rate`` bytes received,
  counted only while the gateway waits for the client (not while upstream is slow to read);
  a slower trickle raises ``RequestTimeout`` (408).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiMapping

from ..errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType


@dataclass(frozen=True, slots=True)
class BodyLimits:
    timeout_s: float = 30.0  # proxy.client_body_timeout_s
    min_rate: int = 500  # proxy.client_body_min_rate: bytes a second that earn one more second


BODY_LIMITS: web.AppKey[BodyLimits] = web.AppKey("body_limits", BodyLimits)
DEFAULT_LIMITS = BodyLimits()


def limits_for(request: web.Request) -> BodyLimits:
    return request.config_dict.get(BODY_LIMITS, DEFAULT_LIMITS)


class ClientBody:
    """``request.content`` as the upstream client's body stream (``iter_any``): counted
    against the declared length and bounded in time. Iterate it once."""

    def __init__(self, request: web.Request, limits: BodyLimits | None = None) -> None:
        self._content = request.content
        self._declared = request.content_length  # None: chunked
        self._limits = limits or limits_for(request)
        self.received = 0

    async def iter_any(self) -> AsyncIterator[bytes]:
        content, declared, limits = self._content, self._declared, self._limits
        loop = asyncio.get_running_loop()
        waited = 0.0
        while True:
            try:
                chunk = content.read_nowait()  # what already arrived: no timer needed
                if not chunk and not content.at_eof():
                    left = limits.timeout_s - waited
                    if limits.min_rate:
                        left += self.received / limits.min_rate
                    if left <= 0:
                        raise RequestTimeout()
                    started = loop.time()
                    try:
                        async with asyncio.timeout(left):
                            chunk = await content.readany()
                    except TimeoutError:
                        raise RequestTimeout() from None
                    finally:
                        waited += loop.time() - started
            except (OSError, RequestPayloadError, HttpProcessingError) as exc:
                # The client's connection was lost, or its chunked framing was malformed.
                raise BadRequest(
                    f"The request body was cut short or malformed ({type(exc).__name__})"
                ) from None
            if not chunk:
                break
            self.received += len(chunk)
            if declared is not None and self.received > declared:
                raise BadRequest("The request body is longer than its Content-Length")
            yield chunk
        if declared is not None and self.received != declared:
            raise BadRequest("The request body ended before its Content-Length")


async def read_whole(request: web.Request, cap: int) -> bytes:
    """The raw body (as sent), refusing (413) more than ``cap`` bytes of it."""
    if not request.can_read_body:
        return b""
    if request.content_length is not None and request.content_length > cap:
        raise PayloadTooLarge(f"Request body is larger than the gateway's limit of {cap} bytes")
    buf = bytearray()
    async for chunk in ClientBody(request).iter_any():
        buf += chunk
        if len(buf) > cap:
            raise PayloadTooLarge(f"Request body is larger than the gateway's limit of {cap} bytes")
    return bytes(buf)


def codings(headers: MultiMapping[str]) -> list[str]:
    """The body's content codings, in the order they were applied (``identity`` dropped)."""
    values = headers.getall(hdrs.CONTENT_ENCODING, [])
    out = [c.strip().lower() for v in values for c in v.split(",")]
    return [c for c in out if c and c != "identity"]


def inflate(data: bytes, applied: list[str], cap: int) -> bytes:
    """``data`` with ``applied`` codings undone (last first), each result within ``cap``
    bytes (413 beyond: a zip bomb); 415 for a coding the gateway cannot read, 400 for
    corrupt data."""
    for coding in reversed(applied):
        if coding in ("gzip", "x-gzip"):
            data = _zlib(data, 16 + zlib.MAX_WBITS, cap, members=True)
        elif coding == "deflate":  # zlib-wrapped as RFC 9110 says; raw deflate as some send it
            try:
                data = _zlib(data, zlib.MAX_WBITS, cap, members=False)
            except BadRequest:
                data = _zlib(data, -zlib.MAX_WBITS, cap, members=False)
        else:
            raise UnsupportedMediaType(
                "The gateway must read this request body and cannot decode its Content-Encoding "
                f"{coding[:40]!r}; send it as gzip, deflate or uncompressed"
            )
    return data


def _zlib(data: bytes, wbits: int, cap: int, *, members: bool) -> bytes:
    out = bytearray()
    while True:
        d = zlib.decompressobj(wbits)
        try:
            out += d.decompress(data, cap + 1 - len(out))  # never more than one byte past the cap
        except zlib.error:
            raise BadRequest("The request body is not valid compressed data") from None
        if len(out) > cap:
            raise PayloadTooLarge(
                f"Request body is larger than the gateway's limit of {cap} bytes (inflated)"
            )
        if not d.eof:
            raise BadRequest("The request body's compressed data is cut short")
        data = d.unused_data
        if not data:
            return bytes(out)
        if not members:
            raise BadRequest("The request body has data after its compressed stream")
