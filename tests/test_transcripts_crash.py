"""kill -9 an instance holding queued jobs, one of them mid-dispatch: the survivor submits the
queued ones, the interrupted dispatch is reconciled (found upstream and adopted, not sent
twice), the restarted instance joins in, and every job completes exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter

import aiohttp
import pytest

from gateway.sim.app import Sim, SimConfig
from tests.conftest import REDIS_URL, redis_client
from tests.helpers import running_sim, start_gateway_process
from tests.test_transcripts import KEY

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_an_instance_lost_mid_dispatch_every_job_completes_exactly_once(how: str) -> None:
    """``kill``: kill -9, then restart it. ``stop``: SIGSTOP it past its claim, then resume it
    (it comes back to find its job adopted by another instance)."""
    await (await redis_client()).aclose()
    prefix = "crash" + uuid.uuid4().hex[:8]
    sim_cfg = SimConfig(async_concurrency=2, job_seconds=2.0)
    async with running_sim(sim_cfg) as (sim, sim_url):
        raw = {
            "upstream": {"api_url": sim_url, "llm_url": sim_url, "streaming_url": "ws" + sim_url[4:]},
            "redis": {"url": REDIS_URL, "key_prefix": prefix},
            "limits": {"async_concurrency": 2},
            "transcripts": {"claim_s": 3, "reconcile_after_s": 0.5, "poll_refresh_s": 0.2},
            "log": {"level": "warning", "access_log": False},
        }
        a, b = start_gateway_process(raw), start_gateway_process(raw)
        restarted = None
        try:
            for g in (a, b):
                await g.ready("/readyz")
            async with aiohttp.ClientSession() as http:
                post_first = asyncio.ensure_future(_post(http, a.url, 0))  # dispatched at once by A
                await asyncio.sleep(0.2)
                ids = [await _post(http, a.url, i) for i in range(1, 6)]  # queued
                await asyncio.sleep(0.3)
                assert sim.transcripts.submitted == 2  # job 0's POST reached upstream, unanswered; job 1 runs
                if how == "kill":
                    os.kill(a.proc.pid, signal.SIGKILL)  # mid-dispatch, holding a claim
                    a.proc.wait()
                    post_first.cancel()
                    restarted = start_gateway_process(raw)
                    await restarted.ready("/readyz")
                else:
                    os.kill(a.proc.pid, signal.SIGSTOP)  # frozen mid-dispatch, holding a claim
                    await asyncio.sleep(5)  # past its claim (3 s): the reconciler takes over
                    os.kill(a.proc.pid, signal.SIGCONT)
                    restarted = a
                    post_first.cancel()  # its answer no longer matters to this test
                deadline = asyncio.get_running_loop().time() + 40
                while True:
                    statuses = [await _status(http, (b, restarted)[i % 2].url, j) for i, j in enumerate(ids)]
                    first = await _state_of(prefix, sim, "https://example.com/crash-0.mp3?sim_post_seconds=2")
                    if all(s == "completed" for s in statuses) and first == "ended":
                        break
                    assert asyncio.get_running_loop().time() < deadline, (statuses, first, b.output()[-2000:])
                    await asyncio.sleep(0.2)
        finally:
            for p in {a, b, restarted}:
                if p is not None:
                    p.kill()
            client = await redis_client()
            async for key in client.scan_iter(match=f"{prefix}:*"):
                await client.delete(key)
            await client.aclose()
    audio = Counter(job.body["audio_url"].split("?")[0] for job in sim.transcripts.jobs.values())
    assert sorted(audio.values()) == [1] * 6, audio  # every job submitted exactly once
    assert sim.recorder.violations == [] and sim.transcripts.max_running <= 2


async def _post(http: aiohttp.ClientSession, url: str, i: int) -> str:
    # Upstream takes 2 s to answer the first POST: long enough to kill its dispatcher mid-POST.
    slow = "?sim_post_seconds=2" if i == 0 else ""
    body = {"audio_url": f"https://example.com/crash-{i}.mp3{slow}"}
    async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


async def _status(http: aiohttp.ClientSession, url: str, job_id: str) -> str:
    async with http.get(url + f"/v2/transcript/{job_id}", headers=KEY) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["status"])


async def _state_of(prefix: str, sim: Sim, audio_url: str) -> str:
    """The gateway's record of the job whose client never heard back (A died mid-POST),
    found through upstream's id for it (the gateway keeps no body once a job is submitted)."""
    upstream = [i for i, job in sim.transcripts.jobs.items() if job.body.get("audio_url") == audio_url]
    client = await redis_client()
    try:
        for upstream_id in upstream:
            async for key in client.scan_iter(match=f"{prefix}:*:upid:{upstream_id}"):
                job_id = (await client.get(key) or b"").decode()
                base = key.decode()[: -len(f":upid:{upstream_id}")]
                state = await client.hget(f"{base}:job:{job_id}", "state")
                if state:
                    return str(state.decode())
        return "missing"
    finally:
        await client.aclose()
