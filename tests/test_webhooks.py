"""Webhooks: upstream tells the gateway, the gateway tells the client, with the client's id,
query string and auth header, under upstream's delivery rules; the receiver's secret never
shows, and nobody but upstream can end a job through it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import CONFIG, ENGINE
from gateway.products.catalog import Catalog
from gateway.products.transcripts.webhooks import RECEIVER_PATH, receiver_token
from gateway.sim.app import SimConfig
from gateway.vault import Vault
from tests.helpers import TEST_SECRET_KEY, free_port, gateway_config, metric, running_gateway, running_sim
from tests.test_transcripts import get, post, wait_for


class Hook:
    """The client's webhook endpoint: answers from a script of statuses, records every call."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = statuses or [200]
        self.calls: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(
            {"query": dict(request.query), "headers": dict(request.headers), "body": await request.json()}
        )
        status = self.statuses[min(len(self.calls), len(self.statuses)) - 1]
        return web.Response(status=status)


@asynccontextmanager
async def hook_server(hook: Hook) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def with_public_url(sim_cfg: SimConfig, **overrides: Any) -> AsyncIterator[tuple[Any, str, Any]]:
    port = free_port()
    async with running_sim(sim_cfg) as (sim, sim_url):
        config = gateway_config(sim_url, public_url=f"http://127.0.0.1:{port}", **overrides)
        async with running_gateway(config, port=port) as (url, app, registry):
            yield sim, url, (app, registry)


# The test receivers listen on 127.0.0.1: opened deliberately (webhooks go to public addresses only).
ALLOW_LOCAL: dict[str, Any] = {"webhook_allow": ["127.0.0.1/32"]}
FAST_HOOKS: dict[str, Any] = {
    "transcripts": {"webhook_retry_s": 0.05, "poll_refresh_with_webhooks_s": 60, **ALLOW_LOCAL}
}


async def test_upstream_webhook_is_relayed_with_the_clients_id_query_and_header() -> None:
    hook = Hook()
    async with (
        hook_server(hook) as hook_url,
        with_public_url(SimConfig(job_seconds=0.3), **FAST_HOOKS) as (
            sim,
            url,
            (app, registry),
        ),
        aiohttp.ClientSession() as http,
    ):
        body = {
            "audio_url": "https://x/a.mp3",
            "webhook_url": hook_url + "?customer_id=c-123",
            "webhook_auth_header_name": "X-Client-Auth",
            "webhook_auth_header_value": "client-secret",
        }
        job = await post(http, url, body)
        assert job["webhook_url"] == hook_url + "?customer_id=c-123"
        assert job["webhook_auth_header_name"] == "X-Client-Auth" and "webhook_auth_header_value" not in job
        # Upstream was told to call the gateway, not the client; the client's secret stayed here.
        (upstream_job,) = sim.transcripts.jobs.values()
        assert upstream_job.body["webhook_url"].startswith(url + RECEIVER_PATH)
        assert "webhook_auth_header_value" not in upstream_job.body
        await wait_for(lambda: _called(hook))
        call = hook.calls[0]
        assert call["body"] == {"transcript_id": job["id"], "status": "completed"}
        assert call["query"] == {"customer_id": "c-123"}
        assert call["headers"]["X-Client-Auth"] == "client-secret"
        # The client's next poll sees the end: no refresh needed (the webhook said so).
        done = await get(http, url, job["id"])
        assert done["status"] == "completed" and done["text"] and done["id"] == job["id"]
        assert done["webhook_url"] == hook_url + "?customer_id=c-123"
        assert RECEIVER_PATH not in str(done) and receiver_token(
            job["id"], Vault(TEST_SECRET_KEY)
        ) not in str(done)
        # One upstream GET: the duration the ledger bills (the webhook says only "completed").
        assert metric(registry, "aai_gateway_job_refreshes_total") == 1
        assert metric(registry, "aai_gateway_webhook_relays_total", outcome="delivered") == 1


async def _called(hook: Hook, n: int = 1) -> bool:
    return len(hook.calls) >= n


async def test_delivery_retries_then_stops_on_success_or_any_4xx() -> None:
    flaky, refusing = Hook([500, 502, 200]), Hook([404])
    async with (
        hook_server(flaky) as flaky_url,
        hook_server(refusing) as refusing_url,
        with_public_url(SimConfig(job_seconds=0.2), **FAST_HOOKS) as (sim, url, (app, registry)),
        aiohttp.ClientSession() as http,
    ):
        await post(http, url, {"audio_url": "https://x/1.mp3", "webhook_url": flaky_url})
        await post(http, url, {"audio_url": "https://x/2.mp3", "webhook_url": refusing_url})
        await wait_for(lambda: _called(flaky, 3))
        await asyncio.sleep(0.3)
        assert len(flaky.calls) == 3 and len(refusing.calls) == 1
        assert metric(registry, "aai_gateway_webhook_relays_total", outcome="refused") == 1


async def test_forged_callbacks_are_refused() -> None:
    async with with_public_url(SimConfig(job_seconds=5)) as (sim, url, _), aiohttp.ClientSession() as http:
        job = await post(http, url, {"audio_url": "https://x/1.mp3"})
        forged = {"transcript_id": "whatever", "status": "completed"}
        for path in [f"/{job['id']}/not-the-token", f"/{job['id']}/", f"/unknown-job/{'0' * 32}"]:
            async with http.post(url + RECEIVER_PATH + path, json=forged) as r:
                assert r.status == 404
        assert (await get(http, url, job["id"]))["status"] in ("queued", "processing")


async def test_an_early_webhook_is_not_lost() -> None:
    """Upstream's webhook for a job that failed at once can beat the dispatcher's record of
    its upstream id: the job still ends, with that id, and its lease is released."""
    async with (
        with_public_url(SimConfig(job_seconds=5, post_latency_s=1.0)) as (sim, url, (app, _)),
        aiohttp.ClientSession() as http,
    ):
        submitting = asyncio.ensure_future(post(http, url, {"audio_url": "https://x/slow.mp3"}))
        await asyncio.sleep(0.3)  # claimed; upstream has not answered the POST yet
        (job_id,) = await _job_ids(app)
        token = receiver_token(job_id, Vault(TEST_SECRET_KEY))
        (upstream_id,) = sim.transcripts.jobs  # upstream has it; the gateway has not heard back
        sim.transcripts.jobs[upstream_id].status = "error"  # it failed at once
        event = {"transcript_id": upstream_id, "status": "error"}
        async with http.post(url + f"{RECEIVER_PATH}/{job_id}/{token}", json=event) as r:
            assert r.status == 200
        answered = await submitting
        assert answered["id"] == job_id
        ended = await get(http, url, job_id)
        assert ended["status"] == "error" and ended["id"] == job_id
        out, _ = await app[ENGINE].store.usage(Catalog(app[CONFIG].limits).async_jobs)
        assert out == 0  # its lease went back at once


async def _job_ids(app: web.Application) -> list[str]:
    from gateway.app import TRANSCRIPTS

    jobs = app[TRANSCRIPTS].jobs
    return [j for j in await jobs.running(2**62, 10)]


async def test_without_public_url_the_gateway_still_calls_the_clients_webhook() -> None:
    hook = Hook()
    overrides = {"transcripts": {"reconcile_after_s": 0.2, "webhook_retry_s": 0.05, **ALLOW_LOCAL}}
    async with hook_server(hook) as hook_url, running_sim(SimConfig(job_seconds=0.3)) as (sim, sim_url):
        async with (
            running_gateway(gateway_config(sim_url, **overrides)) as (url, _, _),
            aiohttp.ClientSession() as http,
        ):
            job = await post(http, url, {"audio_url": "https://x/1.mp3", "webhook_url": hook_url + "?c=1"})
            (upstream_job,) = sim.transcripts.jobs.values()
            assert "webhook_url" not in upstream_job.body  # upstream would call with its own id
            await wait_for(lambda: _called(hook))  # learnt by the reconciler, nobody polling
            assert hook.calls[0]["body"] == {"transcript_id": job["id"], "status": "completed"}
            assert hook.calls[0]["query"] == {"c": "1"}


async def test_the_receiver_relays_only_what_upstream_sends_checked() -> None:
    """Whoever holds a job's receiver token (it leaked into a log, say) cannot make the
    gateway POST their JSON to the client's webhook: a redacted-audio event is relayed as
    {transcript_id, status, redacted_audio_url} with an https URL, anything else not at all."""
    hook = Hook()
    async with (
        hook_server(hook) as hook_url,
        with_public_url(SimConfig(job_seconds=30), **FAST_HOOKS) as (sim, url, _),
        aiohttp.ClientSession() as http,
    ):
        job = await post(http, url, {"audio_url": "https://x/a.mp3", "webhook_url": hook_url})
        (upstream_id,) = sim.transcripts.jobs
        receiver = url + f"{RECEIVER_PATH}/{job['id']}/{receiver_token(job['id'], Vault(TEST_SECRET_KEY))}"
        forged: list[dict[str, Any]] = [
            {"transcript_id": upstream_id, "status": "processing", "text": "attacker's words"},
            {"transcript_id": upstream_id, "status": "anything", "order": {"amount": 10**6}},
            {"transcript_id": upstream_id, "status": "redacted_audio_ready",
             "redacted_audio_url": "javascript:x"},
            {"transcript_id": upstream_id, "status": "redacted_audio_ready",
             "redacted_audio_url": "http://x/a"},
            {"transcript_id": "another-transcript", "status": "redacted_audio_ready",
             "redacted_audio_url": "https://cdn.example/a.mp3"},
        ]  # fmt: skip
        for event in forged:
            async with http.post(receiver, json=event) as r:
                assert r.status == 200
        real = {
            "transcript_id": upstream_id,
            "status": "redacted_audio_ready",
            "redacted_audio_url": "https://cdn.example/redacted.mp3?sig=1",
            "injected": "<script>",
        }
        async with http.post(receiver, json=real) as r:
            assert r.status == 200
        await wait_for(lambda: _called(hook))
        await asyncio.sleep(0.2)
        assert [c["body"] for c in hook.calls] == [
            {
                "transcript_id": job["id"],
                "status": "redacted_audio_ready",
                "redacted_audio_url": "https://cdn.example/redacted.mp3?sig=1",
            }
        ]


async def test_the_duration_read_that_ends_a_job_goes_ahead_of_clients_in_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job holds a concurrency slot until its duration is read: that GET waits in the
    requests window ahead of clients' requests (priority 99), not behind them; so does the
    job's POST (one step above clients: it took its slot first)."""
    from gateway.admission.engine import AdmissionEngine
    from gateway.products.transcripts.ending import ENDING_PRIORITY

    asked: list[tuple[int, str]] = []
    admit = AdmissionEngine.admit

    async def spy(self: AdmissionEngine, limits: Any, **kw: Any) -> Any:
        asked.append((kw.get("priority", 0), kw.get("group", "")))
        return await admit(self, limits, **kw)

    monkeypatch.setattr(AdmissionEngine, "admit", spy)
    async with (
        with_public_url(SimConfig(job_seconds=0.2), **FAST_HOOKS) as (sim, url, (app, registry)),
        aiohttp.ClientSession() as http,
    ):
        job = await post(http, url, {"audio_url": "https://x/a.mp3"})
        await wait_for(lambda: _ended(sim))
        await wait_for(lambda: _refreshed(registry))
        done = await get(http, url, job["id"])
        assert done["status"] == "completed"
    assert ENDING_PRIORITY == 99
    assert (ENDING_PRIORITY, "rest") in asked, asked  # the duration read
    # The job's POST: one step above clients' requests (0), as it holds a concurrency slot.
    assert [p for p, group in asked if group == "transcripts"] == [1], asked
    assert {p for p, _ in asked} <= {0, 1, ENDING_PRIORITY}, asked


async def _ended(sim: Any) -> bool:
    return any(h["status"] == 200 for h in sim.transcripts.webhook_log)


async def _refreshed(registry: Any) -> bool:
    return metric(registry, "aai_gateway_job_refreshes_total") >= 1


async def test_a_webhook_ended_job_frees_its_slot_before_its_duration_is_read() -> None:
    """Upstream is done with the job when its webhook says so: the concurrency slot is free
    from then on, not once the duration read (slow here: 1.5 s) lands; and it is billed."""
    from gateway.app import CATALOG, LEDGER, STORE
    from gateway.ledger import utc_day

    faults = {"kinds": {"slow": 1}, "paths": ["/v2/transcript/"], "slow_s": 1.5}
    async with (
        with_public_url(SimConfig(job_seconds=0.1, faults=faults), **FAST_HOOKS) as (sim, url, (app, _)),
        aiohttp.ClientSession() as http,
    ):
        store, jobs = app[STORE], app[CATALOG].async_jobs
        today = utc_day(time.time())

        async def billed() -> list[float]:
            return [r.value for r in await app[LEDGER].rows(today, today) if r.metric == "audio_seconds"]

        await post(http, url, {"audio_url": "https://x.test/b.mp3?sim_audio=42"})
        assert (await store.usage(jobs))[0] == 1  # running upstream
        deadline = time.monotonic() + 5
        while (await store.usage(jobs))[0]:
            assert time.monotonic() < deadline, "the slot was never freed"
            await asyncio.sleep(0.02)
        assert await billed() == []  # freed while the duration read was still on its way
        while await billed() != [42.0]:
            assert time.monotonic() < deadline, "never billed"
            await asyncio.sleep(0.05)
        assert [f["kind"] for f in sim.report()["faults"]] == ["slow"]
