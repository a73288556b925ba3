"""Clocks: the one source of time for Python-side logic.

Limit decisions are never made with an instance's clock: the Redis scripts read Redis's
``TIME`` and the embedded store reads the clock it is given. Python code only uses a clock
to *schedule* (how long to wait before asking the store again, when a client's max wait is
over), so tests can move time instead of sleeping.

``now()`` is in seconds on a monotonic scale; ``now_ms()`` is an integer in milliseconds
and is what the embedded store stamps leases with.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""

    def now_ms(self) -> int:
        """Whole milliseconds on the same scale (what store scripts compare)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class SystemClock:
    """The system's monotonic clock: production time."""

    def now(self) -> float:
        return time.monotonic()

    def now_ms(self) -> int:
        return int(time.monotonic() * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that moves only when told to: ``await clock.advance(0.5)``.

    Sleepers whose time has come are woken in deadline order, and the event loop is given
    a few turns after each wake so that the woken tasks run before ``advance`` returns.
    """

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.listeners: list[object] = []

    def now(self) -> float:
        return self._now

    def now_ms(self) -> int:
        return int(round(self._now * 1000))

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    async def advance(self, seconds: float, *, turns: int = 20) -> None:
        """Move time forward, waking each sleeper at its own deadline, in order."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            self._on_move()
            if not fut.done():
                fut.set_result(None)
            await settle(turns)
        self._now = target
        self._on_move()
        await settle(turns)

    def _on_move(self) -> None:
        for listener in self.listeners:
            listener(self._now)  # type: ignore[operator]

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now:.3f}, sleepers={len(self._sleepers)})"


async def settle(turns: int = 20) -> None:
    """Give the event loop ``turns`` iterations, so ready callbacks and tasks run."""
    for _ in range(turns):
        await asyncio.sleep(0)
