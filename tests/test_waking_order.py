"""Waiters are never stranded while capacity is free: Redis's order is the source of truth.

A low-priority T holds the model limit while it waits on a capacity-1 window; a high-priority
H arrives in the same loop turn and lifts T (priority inheritance). A mid-priority V waiting
on the window on the same instance ranks BEHIND the lifted T in the store, but ahead of T's
old score locally. The drain must never stop at V while T, entitled to the free capacity,
is one of ours (issue 9, "Waiters are never stranded while capacity is free").
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission.limits import RANK_MODEL, RANK_WINDOW, window_limit
from gateway.admission.store import AcquireRequest, AcquireResult
from tests.conftest import StoreEnv
from tests.test_engine import before, engines, launch, until

W = 0.3
REQ1 = window_limit("requests", 1, W, 20, rank=RANK_WINDOW)
M = window_limit("llm:m", 1, W, 20, rank=RANK_MODEL)


async def _stranding(env: StoreEnv, *, drop_inheritance: bool) -> None:
    log: list[str] = []
    async with engines(env, 1) as (a,):
        if drop_inheritance:
            # Pub/sub is at-most-once: the inheritance message may never arrive.
            wake = a._on_wake
            a._on_wake = lambda name: None if "\t" in name else wake(name)  # type: ignore[method-assign]
            await a.store.subscribe(a._on_wake)
        await launch(env, a, [REQ1], log, "fill")
        # T's first reply reaches T only after H's acquire has run (as when both are on the
        # wire in one loop turn): the lift lands while T is still on its first acquire.
        h_ran = asyncio.Event()
        inner = a.store.acquire

        async def acquire(request: AcquireRequest) -> AcquireResult:
            result = await inner(request)
            if request.priority == 0 and request.seq == 0 and len(request.limits) == 2:
                await h_ran.wait()
            elif request.priority == 99:
                h_ran.set()
            return result

        a.store.acquire = acquire  # type: ignore[method-assign]
        # T and H in ONE loop turn: H's acquire lifts T while T is still on its first acquire.
        t = asyncio.ensure_future(a.admit([M, REQ1], priority=0, max_wait_s=6.0))
        h = asyncio.ensure_future(a.admit([M, REQ1], priority=99, max_wait_s=3.0))
        t.add_done_callback(lambda _: log.append("T"))
        h.add_done_callback(lambda _: log.append("H"))
        v = await launch(env, a, [REQ1], log, "V", priority=50, max_wait_s=6.0)
        # The window frees after W + guard and T is entitled to it (lifted above V). The
        # capacity's own schedule admits all three within three windows; a stranded T waits
        # for its own timeout, and H gets a 429 while capacity is free.
        await until(env, lambda: "T" in log, within=1.5 * W)
        assert before(log, "T", "V")
        await until(env, lambda: {"H", "V"} <= set(log), within=3 * W)
        assert not t.exception() and not h.exception()
        await v


@pytest.mark.parametrize("drop_inheritance", [False, True], ids=["message", "message-lost"])
async def test_a_lifted_holder_is_not_stranded_behind_a_local_waiter(
    store_env: StoreEnv, drop_inheritance: bool
) -> None:
    await _stranding(store_env, drop_inheritance=drop_inheritance)
