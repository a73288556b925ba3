"""Upstream misbehaving under the mixed load (issue 13's fault suite): the simulator's fault
hook (gateway/sim/app.py, ``faults``) makes every third request on the chat, upload and
transcript paths answer 503, reset the connection, hang past the gateway's read timeout,
trickle its answer, or cut it short, in turn. The gateway passes upstream's own errors on as
upstream sent them, answers its own (reset: 502, timeout: 504) as JSON, never sends a
transcript twice (an unknown outcome is settled by searching upstream, README "Pre-recorded
transcription"), and charges nothing for an answer it never got. The suite's invariants hold."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.faults.harness import Load, explain, judge, rig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

LOAD_S = 14.0
FAULTS: dict[str, Any] = {
    "kinds": {"5xx": 6, "reset": 6, "hang": 4, "slow": 6, "cut": 6},
    "every": 3,
    "paths": ["/v1/chat/completions", "/v2/upload", "/v2/transcript"],
    "hang_s": 4.0,  # past the gateway's read timeout (2 s)
    "slow_s": 1.0,  # five pieces 0.2 s apart: slow, inside the read timeout
}


async def test_upstream_5xx_resets_timeouts_slow_and_cut_answers_under_load() -> None:
    async with rig(sim={"faults": FAULTS}, upstream={"read_timeout_s": 2.0}) as r:
        load = Load(r, seed=5)
        await load.run(LOAD_S)
        verdict = await judge(r, load)
    print(verdict.summary())
    assert not verdict.failures, explain(verdict)
    applied = Counter(f["kind"] for f in verdict.dump["report"]["faults"])
    assert set(applied) == set(FAULTS["kinds"]), applied  # every kind happened
    seen = {k.split(":")[1] for k in verdict.statuses}
    assert {"502", "504"} <= seen, verdict.statuses  # the gateway's own answers reached clients


@pytest.mark.parametrize("kind", ["5xx", "reset", "cut"])
async def test_a_webhook_ended_transcript_whose_duration_read_fails_is_billed_all_the_same(kind: str) -> None:
    """Upstream's webhook says only ``completed``; the gateway reads the duration upstream
    before ending the job. When that read fails (``kind``), the webhook is answered 503 and
    upstream's retry ends it billed; before, it ended billed nothing, for good (its usage
    event claimed with no amounts)."""
    from gateway.app import LEDGER
    from gateway.ledger import utc_day
    from gateway.sim.app import SimConfig
    from tests.test_webhooks import FAST_HOOKS, with_public_url

    faults = {"kinds": {kind: 1}, "paths": ["/v2/transcript/"]}  # the job's GET, not its POST
    sim_cfg = SimConfig(job_seconds=0.1, webhook_retry_s=0.2, faults=faults)
    async with (
        with_public_url(sim_cfg, **FAST_HOOKS) as (sim, url, (app, _)),
        aiohttp.ClientSession() as http,
    ):
        body = {"audio_url": "https://x.test/a.mp3?sim_audio=42"}
        async with http.post(url + "/v2/transcript", json=body, headers={"Authorization": "k"}) as r:
            assert r.status == 200
        today = utc_day(time.time())
        deadline = time.monotonic() + 10
        while not (rows := [r for r in await app[LEDGER].rows(today, today) if r.metric == "audio_seconds"]):
            assert time.monotonic() < deadline, "the transcript was never billed"
            await asyncio.sleep(0.05)
        assert [r.value for r in rows] == [42.0]
        assert [f["kind"] for f in sim.report()["faults"]] == [kind]  # the read did fail once
        assert [h["status"] for h in sim.transcripts.webhook_log][:2] == [503, 200]


async def test_a_job_whose_post_answer_was_cut_and_whose_webhook_ends_it_is_billed() -> None:
    """The dispatcher's POST created the job upstream but its answer was cut short: the job
    stays claimed, its upstream id unknown, until the search finds it. Upstream's webhook (to
    the job's own receiver, so it names the job for sure) says ``completed`` first, and ends
    it: its usage must still be its audio's duration."""
    from gateway.app import LEDGER
    from gateway.ledger import utc_day
    from gateway.sim.app import SimConfig
    from tests.test_webhooks import FAST_HOOKS, with_public_url

    faults = {"kinds": {"cut": 1}, "paths": ["/v2/transcript"]}  # the first: the dispatcher's POST
    sim_cfg = SimConfig(job_seconds=0.1, faults=faults)
    async with (
        with_public_url(sim_cfg, **FAST_HOOKS) as (sim, url, (app, _)),
        aiohttp.ClientSession() as http,
    ):
        body = {"audio_url": "https://x.test/b.mp3?sim_audio=42"}
        async with http.post(url + "/v2/transcript", json=body, headers={"Authorization": "k"}) as r:
            assert r.status == 200
        deadline = time.monotonic() + 10
        while not sim.transcripts.webhook_log or not sim.transcripts.webhook_log[-1]["status"] == 200:
            assert time.monotonic() < deadline, "upstream's webhook never ended the job"
            await asyncio.sleep(0.05)
        assert [f["kind"] for f in sim.report()["faults"]] == ["cut"]
        today = utc_day(time.time())
        rows = [r.value for r in await app[LEDGER].rows(today, today) if r.metric == "audio_seconds"]
        assert rows == [42.0]
