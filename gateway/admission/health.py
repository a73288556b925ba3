"""Background tasks that cannot die silently, and the housekeeping figures metrics export.

Every long-lived task of the admission engine and its store (the engine's housekeeping
loop, the wake-up subscription) runs under ``supervise``: a task that ends (an exception,
a return, or a CancelledError that nobody asked for: an awaited shared future cancelled by
someone else) is logged and restarted after a backoff (0.1 s doubling to 5 s, reset after a
minute of health). Only cancelling the supervising task itself (shutdown) stops it.

Their liveness (1 running, 0 between a death and its restart) and restart counts live here,
process-wide, keyed by task name; metrics.py exports them as
``aai_gateway_background_alive{task}`` and ``aai_gateway_background_restarts_total{task}``.
``LEASES_NOT_RESTORED`` counts lease restorations refused because the limit was full
(``aai_gateway_leases_not_restored_total{limit}``; see Store.renew's ``restore``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .limits import Limit

log = logging.getLogger(__name__)

ALIVE: dict[str, int] = {}  # task name -> number of live instances of it (engines in one process)
RESTARTS: dict[str, int] = {}  # task name -> restarts since the process started
LEASES_NOT_RESTORED: dict[str, int] = {}  # limit metric label -> restorations refused (full)

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
HEALTHY_S = 60.0


def supervise(
    name: str,
    factory: Callable[[], Coroutine[Any, Any, None]],
    *,
    backoff_s: float = BACKOFF_MIN_S,
    sleep: Callable[[float], Coroutine[Any, Any, None]] = asyncio.sleep,
) -> asyncio.Task[None]:
    """Run ``factory()`` as task ``name`` for good: restart it whenever it ends (see above).
    Cancel the returned task to stop it."""
    return asyncio.create_task(_run(name, factory, backoff_s, sleep), name=name)


def renewed(ticket: str, limit: Limit, outcome: int) -> bool:
    """renew.lua's answer (both stores): whether the lease is live; a restoration is logged,
    one refused because the limit is full is logged and counted."""
    if outcome == -1:
        LEASES_NOT_RESTORED[limit.metric_label] = LEASES_NOT_RESTORED.get(limit.metric_label, 0) + 1
        log.warning(
            "lease %s on %s was lost (a Redis failover?) and cannot be restored: the limit is full, "
            "so the account runs over its %d for now; retried at the next renewal",
            ticket,
            limit.name,
            limit.capacity,
        )
    elif outcome == 2:
        log.info("lease %s on %s was missing and has been restored", ticket, limit.name)
    return outcome > 0


async def _run(
    name: str,
    factory: Callable[[], Coroutine[Any, Any, None]],
    backoff_s: float,
    sleep: Callable[[float], Coroutine[Any, Any, None]],
) -> None:
    me = asyncio.current_task()
    assert me is not None
    RESTARTS.setdefault(name, 0)
    delay = backoff_s
    alive = False
    try:
        while True:
            ALIVE[name] = ALIVE.get(name, 0) + 1
            alive = True
            started = time.monotonic()
            try:
                await factory()
            except asyncio.CancelledError:
                if me.cancelling():
                    raise  # our own cancellation: shutdown, not a death
                log.error(
                    "background task %s was cancelled from within (a shared future it awaited was "
                    "cancelled); restarting in %.1fs",
                    name,
                    delay,
                )
            except Exception:
                log.exception("background task %s failed; restarting in %.1fs", name, delay)
            else:
                log.error("background task %s returned; restarting in %.1fs", name, delay)
            ALIVE[name] -= 1
            alive = False
            RESTARTS[name] = RESTARTS.get(name, 0) + 1
            if time.monotonic() - started >= HEALTHY_S:
                delay = backoff_s
            await sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
    finally:
        if alive:
            ALIVE[name] -= 1
