"""Uploads belong to the project that made them (managed mode), as upstream scopes them.

Every upload goes upstream under the account's key, so upstream cannot tell the projects
apart: the gateway does. ``POST /v2/upload`` is forwarded as before (streamed, never held)
and the ``upload_url`` upstream answers is noted with its owner; ``POST /v2/transcript`` with
an ``audio_url`` noted for another owner is refused as upstream refuses it, 403
``Cannot access uploaded file``, without calling upstream. A URL never noted (not an upload
through the gateway) is left to upstream.

Notes are kept ``transcripts.retention_days`` (upload URLs are random: knowing one is the only
way to use it; the note only stops another project that learnt it). Kept by the SHA-256 of
the URL, never the URL. Two books: Redis (shared), and memory (the embedded store, one
instance: a restart forgets, and a forgotten upload is left to upstream). While Redis is away
a note cannot be written or read: the upload works, and its URL counts as never noted.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import redis.asyncio as aioredis
from aiohttp import web
from redis import exceptions as redis_errors

from ..admission.keys import Keys
from ..config import Config
from ..errors import Forbidden, StoreUnavailable
from ..identity import owner_of
from ..proxy.handler import ProxyHandler
from ..proxy.plan import Plan
from . import rest
from .catalog import Catalog

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

UPLOAD_FORBIDDEN = "Cannot access uploaded file"


class UploadBook(Protocol):
    async def noted(self, url: str, owner: str) -> None: ...

    async def owner(self, url: str) -> str | None: ...


def _digest(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


class MemoryUploadBook:
    def __init__(self, retention_s: float, *, wall: Callable[[], float] = time.time) -> None:
        self._notes: dict[str, tuple[str, float]] = {}
        self._retention_s = retention_s
        self._wall = wall

    async def noted(self, url: str, owner: str) -> None:
        now = self._wall()
        if len(self._notes) > 100_000:
            self._notes = {k: v for k, v in self._notes.items() if v[1] > now}
        self._notes[_digest(url)] = (owner, now + self._retention_s)

    async def owner(self, url: str) -> str | None:
        note = self._notes.get(_digest(url))
        return note[0] if note is not None and note[1] > self._wall() else None


class RedisUploadBook:
    def __init__(self, client: aioredis.Redis, keys: Keys, retention_s: float) -> None:
        self._r = client
        self._k = keys
        self._ttl_ms = max(1, int(retention_s * 1000))

    async def noted(self, url: str, owner: str) -> None:
        try:
            await self._r.set(self._k.upload(_digest(url)), owner, px=self._ttl_ms)
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed noting an upload: {type(exc).__name__}: {exc}") from exc

    async def owner(self, url: str) -> str | None:
        try:
            raw = await self._r.get(self._k.upload(_digest(url)))
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed reading an upload: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)


class Uploads:
    """What the products ask: note an upload's owner; check a transcript's ``audio_url``."""

    def __init__(self, book: UploadBook) -> None:
        self._book = book

    def capture(self, owner: str, found: list[str]) -> Callable[[Any], Any]:
        """A response rewrite (``Plan.rewrite``, proxy/plan.py) that keeps the ``upload_url`` it
        sees in ``found``."""

        def rewrite(doc: Any) -> Any:
            if isinstance(doc, dict) and isinstance(doc.get("upload_url"), str) and owner:
                found.append(doc["upload_url"])
            return doc

        return rewrite

    async def note(self, urls: list[str], owner: str) -> None:
        for url in urls:
            try:
                await self._book.noted(url, owner)
            except StoreUnavailable as exc:
                log.warning("uploads: Redis unavailable; an upload's project was not noted: %s", exc.detail)

    async def check(self, audio_url: str, owner: str) -> None:
        """Forbidden when ``audio_url`` is an upload another owner made."""
        try:
            made_by = await self._book.owner(audio_url.strip())
        except StoreUnavailable as exc:
            log.warning("uploads: Redis unavailable; an audio_url's project not checked: %s", exc.detail)
            return
        if made_by is not None and made_by != owner:
            raise Forbidden(UPLOAD_FORBIDDEN)


def upload_route(handler: ProxyHandler, uploads: Uploads, catalog: Catalog, *, managed: bool) -> Handler:
    """``POST /v2/upload``: forwarded like any REST request (streamed); in managed mode the
    ``upload_url`` in upstream's answer is noted as the caller's project's."""
    plan = partial(rest.plan, catalog=catalog)
    forward = handler.route(plan)

    async def handle(request: web.Request) -> web.StreamResponse:
        owner = owner_of(request)
        if not managed or not owner:
            return await forward(request)
        found: list[str] = []

        async def planner(request: web.Request, cfg: Config) -> Plan:
            # Read, whatever the answer's framing: an upload_url passed on unread would be
            # noted for nobody, so open to every project (upstream hears one account key).
            return (await plan(request, cfg))._replace(rewrite=uploads.capture(owner, found), must_read=True)

        resp = await handler.route(planner)(request)
        if 200 <= resp.status < 300:  # an error answer's upload_url is no upload
            await uploads.note(found, owner)
        return resp

    return handle
