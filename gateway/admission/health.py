"""Background tasks that cannot die silently, and the housekeeping figures metrics export.

Every long-lived task of the admission engine and its store (the engine's housekeeping
loop, the wake-up subscription) runs under ``supervise``: a task that ends (an exception,
a return, or a CancelledError that nobody asked for: an awaited shared future cancelled by
someone else) is logged and restarted after a backoff (0.1 s doubling to 5 s, reset after a
minute of health). Only cancelling the supervising task itself (shutdown) stops it.

Their liveness (1 running, 0 between a death and its restart) and restart counts live here,
process-wide, keyed by task name; metrics.py exports them as
``aai_gateway_background_alive{task}`` and ``aai_gateway_background_restarts_total{task}``.
``RESTORED_OVER`` counts lost leases restored beyond their limit's capacity
(``aai_gateway_leases_restored_over_total{limit}``; see Store.renew's ``create``).
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
RESTORED_OVER: dict[str, int] = {}  # limit metric label -> leases restored beyond the capacity

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


async def stop_tasks(*tasks: asyncio.Task[Any] | None, every_s: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again every ``every_s``:
    Python 3.11's ``wait_for`` (asyncio's and the libraries') can swallow a cancellation that
    races its result, and a loop that then goes on would hold up shutdown for ever. What a
    task ended with is not raised here."""
    for task in tasks:
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=every_s)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: never "exception was never retrieved"


async def keep_reading(what: str, read: Callable[[], Coroutine[Any, Any, None]], every_s: float) -> None:
    """Call ``read()`` every ``every_s``, for good. While the store is away (StoreUnavailable)
    the last view it made stays in force: said once when it starts failing, once when it
    answers again."""
    from ..errors import StoreUnavailable

    failing = False
    while True:
        try:
            await read()
            if failing:
                log.info("%s: the store answers again", what)
            failing = False
        except StoreUnavailable as exc:
            if not failing:
                log.warning("%s: the store is unreadable; the last view stays in force: %s", what, exc.detail)
            failing = True
        await asyncio.sleep(every_s)


def renewed(ticket: str, limit: Limit, outcome: int) -> bool:
    """renew.lua's answer (both stores): whether the lease is live. A restoration is logged;
    one that puts the limit over its capacity is logged louder and counted."""
    if outcome == 3:
        RESTORED_OVER[limit.metric_label] = RESTORED_OVER.get(limit.metric_label, 0) + 1
        log.warning(
            "lease %s on %s was lost (a Redis failover?) while its work kept running, and its slot "
            "was taken meanwhile: restored, the account runs over its %d until work ends",
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
