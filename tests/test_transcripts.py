"""Async transcription through the gateway, with the simulator as the judge.

Jobs beyond the account's concurrency wait in the gateway (durably) and are submitted in
order as leases free; upstream never throttles one, and never has more in flight than the
limit. Polls are coalesced; a queued job can be cancelled; a job upstream refuses ends in
error with upstream's message; a negative balance pauses dispatching without losing a job.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.sim.app import Sim, SimConfig
from tests.conftest import REDIS_URL, redis_client
from tests.helpers import gateway_config, metric, running_gateway, running_sim, sim_and_gateway

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


# -- what the gateway keeps: only what a job needs --------------------------------------------


async def stored_bytes(app: Any) -> bytes:
    """Everything the job store holds, raw: every Redis key's value under the gateway's
    prefix, or the sqlite file with its write-ahead log."""
    from gateway.app import CONFIG

    cfg = app[CONFIG]
    if cfg.redis.url is None:
        folder = Path(cfg.transcripts.data_dir)
        return b"".join(p.read_bytes() for p in sorted(folder.glob("jobs.db*")))  # noqa: ASYNC240
    client = await redis_client()
    out = b""
    try:
        async for key in client.scan_iter(match=f"{cfg.redis.key_prefix}:*"):
            kind = (await client.type(key)).decode()
            if kind == "hash":
                out += b"".join(k + v for k, v in (await client.hgetall(key)).items())
            elif kind == "string":
                out += await client.get(key) or b""
            elif kind == "zset":
                out += b"".join(await client.zrange(key, 0, -1))
    finally:
        await client.aclose()
    return out


async def stored_history(app: Any) -> bytes:
    """sqlite's write-ahead log: earlier versions of pages (a running job's body) stay in it
    until a checkpoint; what a job keeps is judged without it."""
    from gateway.app import CONFIG

    cfg = app[CONFIG]
    wal = Path(cfg.transcripts.data_dir) / "jobs.db-wal"
    return wal.read_bytes() if cfg.redis.url is None and wal.exists() else b"\x00" * 0


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_a_job_ended_through_a_poll_keeps_no_transcript(store: str) -> None:
    from gateway.app import TRANSCRIPTS

    async with (
        sim_and_gateway(SimConfig(job_seconds=0.2), store=store, **FAST) as (sim, url, app),
        aiohttp.ClientSession() as http,
    ):
        job = await post(http, url, {"audio_url": "https://x/private-audio.mp3", "punctuate": True})
        await wait_for(lambda: _status(http, url, job["id"], "completed"))
        done = await get(http, url, job["id"])
        assert done["text"].startswith("Simulated transcript")  # the client gets it, from upstream
        kept = await app[TRANSCRIPTS].jobs.get(job["id"])
        assert kept.body == {} and kept.cred is None
        assert set(kept.snapshot) <= {"id", "status", "error", "audio_duration"}
        raw = await stored_bytes(app)
        assert b"Simulated transcript" not in raw  # never written, not even to the sqlite log
        assert b"private-audio" not in raw.replace(await stored_history(app), b"")


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_delete_purges_what_the_gateway_kept(store: str) -> None:
    from gateway.app import TRANSCRIPTS

    async with (
        sim_and_gateway(SimConfig(job_seconds=0.2), store=store, **FAST) as (sim, url, app),
        aiohttp.ClientSession() as http,
    ):
        body = {"audio_url": "https://x/a.mp3", "webhook_url": "https://hooks.example.com/private-hook"}
        job = await post(http, url, body)
        await wait_for(lambda: _status(http, url, job["id"], "completed"))
        async with http.delete(url + f"/v2/transcript/{job['id']}", headers=KEY) as r:
            assert r.status == 200
            deleted = await r.json()
        assert deleted["id"] == job["id"] and deleted["text"] == "Deleted by user."
        kept = await app[TRANSCRIPTS].jobs.get(job["id"])
        assert kept.snapshot == {"id": kept.upstream_id, "status": "completed"} and kept.extra == {}
        assert b"private-hook" not in await stored_bytes(app)
        again = await get(http, url, job["id"])  # still the client's id, upstream's deleted view
        assert again["id"] == job["id"] and again["webhook_url"] is None


async def test_the_embedded_stores_files_are_private() -> None:
    from gateway.app import CONFIG

    async with (
        sim_and_gateway(SimConfig(job_seconds=0.1)) as (sim, url, app),
        aiohttp.ClientSession() as http,
    ):
        await post(http, url, {"audio_url": "https://x/a.mp3"})
        folder = Path(app[CONFIG].transcripts.data_dir)
        files = sorted(folder.glob("*.db*"))  # noqa: ASYNC240
        assert {"jobs.db", "ledger.db"} <= {p.name for p in files}
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o600" for p in files}


async def test_a_job_upstream_forgot_is_settled_not_left_processing() -> None:
    """The demo restarted its simulator: upstream answers 404 for a running job. The
    reconciler ends it in error at once, frees its lease and tells its webhook."""
    from gateway.app import CONFIG, ENGINE
    from gateway.products.catalog import Catalog
    from tests.test_webhooks import Hook, hook_server

    hook = Hook()
    overrides = {
        "limits": {"async_concurrency": 1},
        "transcripts": {"reconcile_after_s": 0.2, "poll_refresh_s": 60, "webhook_allow": ["127.0.0.1"]},
    }
    async with (
        hook_server(hook) as hook_url,
        sim_and_gateway(SimConfig(job_seconds=30), **overrides) as (sim, url, app),
        aiohttp.ClientSession() as http,
    ):
        job = await post(http, url, {"audio_url": "https://x/a.mp3", "webhook_url": hook_url})
        waiting = await post(http, url, {"audio_url": "https://x/b.mp3"})
        assert waiting["status"] == "queued"
        sim.transcripts.jobs.clear()  # upstream forgot it

        async def told() -> bool:
            return len(hook.calls) == 1

        await wait_for(told, within=5)
        assert hook.calls[0]["body"] == {"transcript_id": job["id"], "status": "error"}
        ended = await get(http, url, job["id"])  # from the gateway, not upstream's 404
        assert ended["status"] == "error" and "no longer knows" in ended["error"]
        await wait_for(lambda: _status(http, url, waiting["id"], "processing"), within=5)  # its lease went
        out, _ = await app[ENGINE].store.usage(Catalog(app[CONFIG].limits).async_jobs)
        assert out == 1


async def test_the_transcript_list_carries_ratelimit_headers() -> None:
    async with sim_and_gateway(SimConfig()) as (sim, url, app), aiohttp.ClientSession() as http:
        await post(http, url, {"audio_url": "https://x/a.mp3"})
        async with http.get(url + "/v2/transcript?limit=5", headers=KEY) as r:
            assert r.status == 200
            listed = r.headers
            assert len((await r.json())["transcripts"]) == 1
        async with http.get(url + "/v2/transcript/some-upstream-id", headers=KEY) as r:
            other = r.headers  # another GET on an admitted route, for comparison
        assert "RateLimit" in listed and listed["RateLimit-Policy"] == other["RateLimit-Policy"]


async def test_a_json_body_without_its_content_type_is_read_as_json() -> None:
    """curl -d '{...}' sends application/x-www-form-urlencoded; the SDKs' raw clients may send
    none: upstream reads the body as JSON either way, and so does the gateway."""
    async with sim_and_gateway(SimConfig()) as (sim, url, app), aiohttp.ClientSession() as http:
        raw = json.dumps({"audio_url": "https://x/a.mp3"}).encode()
        for content_type in ["application/x-www-form-urlencoded", "text/plain", None]:
            headers = {**KEY, **({"Content-Type": content_type} if content_type else {})}
            async with http.post(url + "/v2/transcript", data=raw, headers=headers) as r:
                assert r.status == 200, (content_type, await r.text())
                assert (await r.json())["status"] in ("queued", "processing")
        assert sim.transcripts.submitted == 3


async def test_a_gzipped_transcript_request_is_read() -> None:
    async with sim_and_gateway(SimConfig()) as (sim, url, app), aiohttp.ClientSession() as http:
        raw = gzip.compress(json.dumps({"audio_url": "https://x/zipped.mp3"}).encode())
        headers = {**KEY, "Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with http.post(url + "/v2/transcript", data=raw, headers=headers) as r:
            assert r.status == 200, await r.text()
        (upstream_job,) = sim.transcripts.jobs.values()
        assert upstream_job.body["audio_url"] == "https://x/zipped.mp3"
