"""Temporary streaming tokens the gateway issued: until when each can open a session, and
whose key asked for it.

A client may open ``/v3/ws?token=...`` with a token from ``GET /v3/token`` instead of its
key. Upstream refuses a token past its ``expires_in_seconds``, so a session queued in the
gateway must not wait beyond that; and usage must land on the key that asked for the
token. Both come from this book, written when ``/v3/token`` passes through the gateway
(any instance), kept until the token expires. Tokens are stored by fingerprint, never as
they are.

A token the gateway did not issue (fetched from AssemblyAI directly) is read for a JWT
``exp`` claim if it has one; otherwise it waits the usual ``streaming.max_wait_s``.

With Redis and ``redis.on_outage: fail_open``, ``OutageTokenBook`` keeps this instance's
notes too: while Redis is away, a token issued here is noted here (and written to Redis once
it answers, for the time it has left), and a lookup Redis cannot answer is answered from
here (a token issued by another instance is then read like one the gateway did not issue).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from ..admission.keys import Keys
from ..errors import StoreUnavailable


class TokenNote(NamedTuple):
    valid_until: float  # wall-clock seconds
    owner: str  # the issuing key's fingerprint ("" when not known)


class TokenBook(Protocol):
    async def issued(self, fingerprint: str, expires_in_s: float, owner: str) -> None: ...

    async def lookup(self, fingerprint: str) -> TokenNote | None: ...


class MemoryTokenBook:
    """The embedded store's book (one instance)."""

    def __init__(self, *, wall: Callable[[], float] = time.time) -> None:
        self._notes: dict[str, TokenNote] = {}
        self._wall = wall

    async def issued(self, fingerprint: str, expires_in_s: float, owner: str) -> None:
        now = self._wall()
        if len(self._notes) > 10_000:  # tokens live at most 10 minutes: drop the expired
            self._notes = {k: v for k, v in self._notes.items() if v.valid_until > now}
        self._notes[fingerprint] = TokenNote(now + expires_in_s, owner)

    async def lookup(self, fingerprint: str) -> TokenNote | None:
        note = self._notes.get(fingerprint)
        return note if note is not None and note.valid_until > self._wall() else None


class OutageTokenBook:
    """Redis's book, and this instance's own for while Redis is away (see above)."""

    def __init__(self, shared: RedisTokenBook, *, wall: Callable[[], float] = time.time) -> None:
        self._shared = shared
        self._local = MemoryTokenBook(wall=wall)
        self._unwritten: dict[str, TokenNote] = {}
        self._wall = wall

    async def issued(self, fingerprint: str, expires_in_s: float, owner: str) -> None:
        await self._local.issued(fingerprint, expires_in_s, owner)
        try:
            await self._shared.issued(fingerprint, expires_in_s, owner)
        except StoreUnavailable:
            self._unwritten[fingerprint] = TokenNote(self._wall() + expires_in_s, owner)

    async def lookup(self, fingerprint: str) -> TokenNote | None:
        try:
            note = await self._shared.lookup(fingerprint)
        except StoreUnavailable:
            note = None
        return note if note is not None else await self._local.lookup(fingerprint)

    async def flush(self) -> int:
        """Write the notes made while Redis was away, for the time each has left."""
        moved = 0
        for fingerprint, note in list(self._unwritten.items()):
            left = note.valid_until - self._wall()
            try:
                if left > 0:
                    await self._shared.issued(fingerprint, left, note.owner)
            except StoreUnavailable:
                break
            del self._unwritten[fingerprint]
            moved += 1
        return moved


class RedisTokenBook:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, wall: Callable[[], float] = time.time) -> None:
        self._r = client
        self._k = keys
        self._wall = wall

    async def issued(self, fingerprint: str, expires_in_s: float, owner: str) -> None:
        until = self._wall() + expires_in_s
        try:
            await self._r.set(
                self._k.streaming_token(fingerprint), f"{until}|{owner}", px=max(1, int(expires_in_s * 1000))
            )
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed noting a token: {type(exc).__name__}: {exc}") from exc

    async def lookup(self, fingerprint: str) -> TokenNote | None:
        try:
            raw = await self._r.get(self._k.streaming_token(fingerprint))
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise StoreUnavailable(f"redis failed reading a token: {type(exc).__name__}: {exc}") from exc
        if raw is None:
            return None
        until, owner = (raw.decode() if isinstance(raw, bytes) else raw).split("|", 1)
        return TokenNote(float(until), owner)


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (read, not verified: it only bounds a wait), else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (ValueError, UnicodeDecodeError):
        return None
