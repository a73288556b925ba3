"""Clients that vanish under load (issue 13's fault suite): uploads whose socket is reset half-way
through the body, chat requests that hang up while they wait for admission (or while upstream
answers), streaming sessions that hang up while they wait, and sessions whose TCP connection is
shut after Begin without Terminate or a close frame. Sessions open at once are capped
(``streaming.max_open_sessions``), so each session holds a lease the gateway must give back.
The suite's invariants hold: every lease and waiting ticket returns (the store ends empty),
every upstream session the gateway opened ends with Terminate, nothing is charged that did not
run, and the other clients are served."""

from __future__ import annotations

import pytest

from tests.faults.harness import Load, Rates, explain, judge, rig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

LOAD_S = 14.0


async def test_clients_vanishing_mid_upload_mid_queue_and_mid_stream() -> None:
    async with rig(streaming={"max_open_sessions": 3}) as r:
        load = Load(r, rates=Rates(upload=1.0, session=1.5), hostile=True, seed=6)
        await load.run(LOAD_S)
        verdict = await judge(r, load)
    print(verdict.summary())
    assert not verdict.failures, explain(verdict)
    fates = {s.fate for s in load.sessions if s.begun} | {s.fate for s in load.sessions if not s.begun}
    assert {"vanish", "terminate"} <= fates, [(s.fate, s.begun, s.outcome) for s in load.sessions]
    assert verdict.statuses["dropped:dropped"] >= 10, verdict.statuses  # uploads and waiters gone
