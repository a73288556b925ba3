"""Async transcription through the gateway, with the simulator as the judge.

Jobs beyond the account's concurrency wait in the gateway (durably) and are submitted in
order as leases free; upstream never throttles one, and never has more in flight than the
limit. Polls are coalesced; a queued job can be cancelled; a job upstream refuses ends in
error with upstream's message; a negative balance pauses dispatching without losing a job.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp

from gateway.sim.app import Sim, SimConfig
from tests.conftest import REDIS_URL, redis_client
from tests.helpers import gateway_config, metric, running_gateway, running_sim

KEY = {"Authorization": "job-key"}
# One concurrency lease, and jobs refreshed from upstream often (short simulated jobs).
FAST: dict[str, Any] = {
    "limits": {"async_concurrency": 1},
    "transcripts": {"poll_refresh_s": 0.1, "reconcile_after_s": 0.2},
}


@asynccontextmanager
async def gateways(
    sim_config: SimConfig, n: int = 1, *, redis: bool = False, data_dir: str | None = None, **overrides: Any
) -> AsyncIterator[tuple[Sim, list[tuple[str, Any]]]]:
    """The simulator and ``n`` gateways in front of it (sharing one Redis when ``redis``)."""
    prefix = "tx" + uuid.uuid4().hex[:8]
    async with running_sim(sim_config) as (sim, sim_url), AsyncExitStack() as stack:
        if redis:
            await (await redis_client()).aclose()
            overrides = {**overrides, "redis": {"url": REDIS_URL, "key_prefix": prefix}}
        if data_dir is not None:
            overrides = {
                **overrides,
                "transcripts": {**overrides.get("transcripts", {}), "data_dir": data_dir},
            }
        running = []
        for _ in range(n):
            url, app, registry = await stack.enter_async_context(
                running_gateway(gateway_config(sim_url, **overrides))
            )
            running.append((url, registry))
        try:
            yield sim, running
        finally:
            if redis:
                client = await redis_client()
                async for key in client.scan_iter(match=f"{prefix}:*"):
                    await client.delete(key)
                await client.aclose()


async def wait_for(check: Any, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    async with http.post(url + "/v2/transcript", json=body, headers={**KEY, **headers}) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def get(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    async with http.get(url + f"/v2/transcript/{job_id}", headers=KEY) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


SDK_SCRIPT = textwrap.dedent(
    """
    import json, sys, assemblyai as aai
    from concurrent.futures import ThreadPoolExecutor
    aai.settings.polling_interval = 0.1
    n = int(sys.argv[1])
    def one(i):
        t = aai.Transcriber().transcribe(f"https://example.com/{i}.mp3?sim_seconds=0.4")
        return [t.id, str(t.status.value), t.text]
    with ThreadPoolExecutor(n) as pool:
        print("RESULT " + json.dumps(list(pool.map(one, range(n)))))
    """
)


async def sdk_transcribe(url: str, n: int) -> list[list[str]]:
    import json

    env = {**os.environ, "ASSEMBLYAI_BASE_URL": url, "ASSEMBLYAI_API_KEY": "job-key"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SDK_SCRIPT, str(n), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return json.loads(stdout.decode().split("RESULT ")[1])  # type: ignore[no-any-return]


async def test_many_sdk_transcriptions_through_two_instances_never_throttled() -> None:
    """4x the concurrency limit through two instances on one Redis: all complete, in order,
    and upstream never throttles a job nor runs more than the limit at once."""
    limit = 3
    overrides = {"limits": {"async_concurrency": limit}, "transcripts": {"poll_refresh_s": 0.2}}
    async with gateways(SimConfig(async_concurrency=limit), 2, redis=True, **overrides) as (sim, gws):
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(sdk_transcribe(url, 6) for url, _ in gws))
        elapsed = loop.time() - started
    # 12 jobs of 0.4 s, 3 at a time: 1.6 s of upstream work; allow the SDK's start-up and polling.
    assert elapsed < 12, elapsed
    done = [r for batch in results for r in batch]
    assert len(done) == 12 and all(status == "completed" and text for _, status, text in done)
    assert len({job_id for job_id, _, _ in done}) == 12
    assert sim.recorder.violations == []  # no throttled job, no window exceeded
    assert sim.transcripts.submitted == 12 and sim.transcripts.max_running == limit  # used, never exceeded
    upstream_ids = set(sim.transcripts.jobs)
    assert not upstream_ids & {job_id for job_id, _, _ in done}  # clients only ever saw gateway ids


async def test_queued_jobs_survive_a_restart_of_the_embedded_store() -> None:
    data_dir = tempfile.mkdtemp(prefix="aai-gw-restart-")
    sim_cfg = SimConfig(async_concurrency=1, job_seconds=0.6)
    async with running_sim(sim_cfg) as (sim, sim_url), aiohttp.ClientSession() as http:
        config = gateway_config(
            sim_url,
            limits={"async_concurrency": 1},
            transcripts={"data_dir": data_dir, "poll_refresh_s": 0.1},
        )
        async with running_gateway(config) as (url, _, _):
            jobs = [await post(http, url, {"audio_url": f"https://x/{i}.mp3"}) for i in range(3)]
            assert [j["status"] for j in jobs] == ["processing", "queued", "queued"]  # upstream's, then ours
            assert sim.transcripts.submitted == 1
        # The gateway is gone; its queue is in the sqlite file. A new one picks it up.
        async with running_gateway(config) as (url, _, _):

            async def all_done() -> bool:
                return all([(await get(http, url, j["id"]))["status"] == "completed" for j in jobs])

            await wait_for(all_done, within=15)
    assert sim.transcripts.submitted == 3 and sim.transcripts.max_running == 1
    assert sim.recorder.violations == []


async def test_deleting_a_queued_job_cancels_it() -> None:
    async with (
        gateways(SimConfig(async_concurrency=1, job_seconds=0.8), **FAST) as (
            sim,
            gws,
        ),
        aiohttp.ClientSession() as http,
    ):
        url = gws[0][0]
        first = await post(http, url, {"audio_url": "https://x/1.mp3"})
        second = await post(http, url, {"audio_url": "https://x/2.mp3"})
        async with http.delete(url + f"/v2/transcript/{second['id']}", headers=KEY) as r:
            assert r.status == 200
            cancelled = await r.json()
        assert cancelled["id"] == second["id"] and cancelled["status"] == "error"
        assert "never submitted" in cancelled["error"]
        await wait_for(lambda: _status(http, url, first["id"], "completed"))
        await asyncio.sleep(0.3)
        assert sim.transcripts.submitted == 1  # the cancelled job never went upstream
        assert (await get(http, url, second["id"]))["status"] == "error"


async def _status(http: aiohttp.ClientSession, url: str, job_id: str, want: str) -> bool:
    return (await get(http, url, job_id))["status"] == want


async def test_a_job_upstream_refuses_at_dispatch_ends_in_error_and_frees_its_lease() -> None:
    async with (
        gateways(SimConfig(async_concurrency=1, job_seconds=0.5), **FAST) as (
            sim,
            gws,
        ),
        aiohttp.ClientSession() as http,
    ):
        url = gws[0][0]
        first = await post(http, url, {"audio_url": "https://x/1.mp3"})
        bad = await post(http, url, {"audio_url": "https://x/2.mp3", "speech_model": "no-such-model"})
        third = await post(http, url, {"audio_url": "https://x/3.mp3"})
        assert bad["status"] == "queued"  # nobody could tell yet
        await wait_for(lambda: _status(http, url, bad["id"], "error"))
        refused = await get(http, url, bad["id"])
        assert "Invalid speech_model" in refused["error"]
        await wait_for(lambda: _status(http, url, third["id"], "completed"))
        assert (await get(http, url, first["id"]))["status"] == "completed"
        assert sim.recorder.violations == []


async def test_a_bad_body_is_refused_at_once_and_nothing_is_kept() -> None:
    async with gateways(SimConfig()) as (sim, gws), aiohttp.ClientSession() as http:
        url = gws[0][0]
        for body, text in [({}, "audio_url"), ({"audio_url": ""}, "audio_url"), ([1], "JSON object")]:
            async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
                assert r.status == 400 and text in (await r.json())["error"]
        async with http.post(url + "/v2/transcript", data=b"{oops", headers=KEY) as r:
            assert r.status == 400
        assert sim.transcripts.submitted == 0 and sim.seen == []


async def test_negative_balance_pauses_dispatch_and_loses_nothing() -> None:
    overrides = {
        "limits": {"async_concurrency": 2},
        "transcripts": {"balance_retry_s": 0.3, "poll_refresh_s": 0.1},
    }
    async with (
        gateways(SimConfig(async_concurrency=2, negative_balance=True), **overrides) as (
            sim,
            gws,
        ),
        aiohttp.ClientSession() as http,
    ):
        url = gws[0][0]
        # The first is refused upstream: kept, not lost (the client hears "queued").
        jobs = [await post(http, url, {"audio_url": f"https://x/{i}.mp3"}) for i in range(3)]
        async with http.get(url + "/readyz") as r:
            assert "paused" in (await r.json()).get("dispatch", "")
        await asyncio.sleep(0.5)
        assert all([(await get(http, url, j["id"]))["status"] == "queued" for j in jobs])
        sim.config.negative_balance = False  # topped up

        async def all_done() -> bool:
            return all([(await get(http, url, j["id"]))["status"] == "completed" for j in jobs])

        await wait_for(all_done, within=15)
        assert sim.transcripts.submitted == 3


async def test_polls_are_coalesced() -> None:
    """Ten clients polling one running job every 50 ms cost upstream one GET per refresh
    interval, not one per poll."""
    overrides = {"transcripts": {"poll_refresh_s": 0.5}}
    async with (
        gateways(SimConfig(job_seconds=3.0), **overrides) as (sim, gws),
        aiohttp.ClientSession() as http,
    ):
        url, registry = gws[0]
        job = await post(http, url, {"audio_url": "https://x/1.mp3"})

        async def poller() -> None:
            for _ in range(400):  # polls every 50 ms, like an impatient client
                if (await get(http, url, job["id"]))["status"] == "completed":
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the job never completed")

        await asyncio.gather(*(poller() for _ in range(10)))
        polls = metric(registry, "aai_gateway_job_polls_total")
        refreshes = metric(registry, "aai_gateway_job_refreshes_total")
        upstream_gets = sum(1 for x in sim.seen if x["method"] == "GET")
        # While the job ran: one upstream GET per refresh interval, whatever the pollers did.
        # Once it ended, each poller's next GET fetched upstream's complete answer once.
        assert polls > 100 and refreshes <= 3.0 / 0.5 + 2
        assert refreshes <= upstream_gets <= refreshes + 10
        assert upstream_gets / polls < 0.05, (upstream_gets, polls)


async def test_idempotency_key_returns_the_same_job() -> None:
    async with gateways(SimConfig()) as (sim, gws), aiohttp.ClientSession() as http:
        url = gws[0][0]
        a = await post(http, url, {"audio_url": "https://x/1.mp3"}, **{"Idempotency-Key": "retry-7"})
        b = await post(http, url, {"audio_url": "https://x/1.mp3"}, **{"Idempotency-Key": "retry-7"})
        c = await post(http, url, {"audio_url": "https://x/1.mp3"}, **{"Idempotency-Key": "retry-8"})
        assert a["id"] == b["id"] != c["id"]
        assert sim.transcripts.submitted == 2


async def test_another_key_cannot_see_a_job() -> None:
    async with gateways(SimConfig()) as (sim, gws), aiohttp.ClientSession() as http:
        url = gws[0][0]
        job = await post(http, url, {"audio_url": "https://x/1.mp3"})
        async with http.get(url + f"/v2/transcript/{job['id']}", headers={"Authorization": "other-key"}) as r:
            assert r.status == 404 and (await r.json()) == {"error": "Transcript not found"}


async def test_llm_bodies_name_transcripts_by_the_gateways_id() -> None:
    async with gateways(SimConfig(job_seconds=0.2), **FAST) as (sim, gws), aiohttp.ClientSession() as http:
        url = gws[0][0]
        job = await post(http, url, {"audio_url": "https://x/1.mp3"})
        queued = await post(http, url, {"audio_url": "https://x/2.mp3"})  # one lease: this one waits
        ask = {"transcript_id": queued["id"], "speech_understanding": {"request": {}}}
        async with http.post(url + "/v1/understanding", json=ask, headers=KEY) as r:
            assert r.status == 400 and "still queued in the gateway" in (await r.json())["error"]
        await wait_for(lambda: _status(http, url, job["id"], "completed"))
        ask["transcript_id"] = job["id"]
        async with http.post(url + "/v1/understanding", json=ask, headers=KEY) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["speech_understanding"]["response"]["transcript_id"] == job["id"]
        chat = {"model": "gpt-5", "messages": [], "transcript_id": job["id"]}
        async with http.post(url + "/v1/chat/completions", json=chat, headers=KEY) as r:
            assert r.status == 200


async def test_a_failed_job_frees_its_lease_at_once() -> None:
    async with (
        gateways(SimConfig(async_concurrency=1), **FAST) as (sim, gws),
        aiohttp.ClientSession() as http,
    ):
        url = gws[0][0]
        failing = await post(http, url, {"audio_url": "https://x/bad.mp3?sim_seconds=0.2&sim_fail=1"})
        waiting = await post(http, url, {"audio_url": "https://x/good.mp3?sim_seconds=0.2"})
        assert waiting["status"] == "queued"
        await wait_for(lambda: _status(http, url, waiting["id"], "completed"))
        failed = await get(http, url, failing["id"])
        assert failed["status"] == "error" and "Simulated failure" in failed["error"]
        assert sim.transcripts.max_running == 1 and sim.recorder.violations == []


async def test_trusted_priority_goes_first() -> None:
    overrides = {**FAST, "transcripts": {**FAST["transcripts"], "trust_priority_header": True}}
    async with (
        gateways(SimConfig(async_concurrency=1, job_seconds=0.3), **overrides) as (sim, gws),
        aiohttp.ClientSession() as http,
    ):
        url = gws[0][0]
        first = await post(http, url, {"audio_url": "https://x/first.mp3"})
        low = [await post(http, url, {"audio_url": f"https://x/low-{i}.mp3"}) for i in range(3)]
        high = await post(http, url, {"audio_url": "https://x/high.mp3"}, **{"X-AAI-Gateway-Priority": "90"})
        everyone = [first, *low, high]

        async def all_done() -> bool:
            return all([(await get(http, url, j["id"]))["status"] == "completed" for j in everyone])

        await wait_for(all_done, within=20)
        order = [job.body["audio_url"].rsplit("/", 1)[1] for job in sim.transcripts.jobs.values()]
        assert order == ["first.mp3", "high.mp3", "low-0.mp3", "low-1.mp3", "low-2.mp3"]
        async with http.post(
            url + "/v2/transcript",
            json={"audio_url": "https://x/y"},
            headers={**KEY, "X-AAI-Gateway-Priority": "x"},
        ) as r:
            assert r.status == 400 and "Priority" in (await r.json())["error"]


async def test_a_job_queued_too_long_ends_in_error() -> None:
    overrides = {**FAST, "transcripts": {**FAST["transcripts"], "max_queue_age_s": 0.5}}
    async with (
        gateways(SimConfig(async_concurrency=1, job_seconds=2.0), **overrides) as (sim, gws),
        aiohttp.ClientSession() as http,
    ):
        url = gws[0][0]
        await post(http, url, {"audio_url": "https://x/1.mp3"})
        stale = await post(http, url, {"audio_url": "https://x/2.mp3"})
        await wait_for(lambda: _status(http, url, stale["id"], "error"), within=5)
        assert "Queued in the gateway for more than" in (await get(http, url, stale["id"]))["error"]
        assert sim.transcripts.submitted == 1
