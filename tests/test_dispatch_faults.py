"""A transcript is never submitted twice (issue 9, section 1): a dispatch POST whose outcome is
unknown (a slow upstream past the claim, a connection dropped after the request was written, a
5xx from a proxy that lost upstream's answer) is settled by searching upstream for the job, not
by submitting it again; only a POST that provably never left (the connect failed) is requeued.

Each test runs the real simulator (wrapped, where it must misbehave, by a middleware in front
of its own handler) and a gateway on the embedded store and on a real Redis.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.sim.app import KEY as SIM_KEY
from gateway.sim.app import SIM, Sim, SimConfig, build_sim_app
from tests.conftest import REDIS_URL, redis_client
from tests.helpers import delete_prefix, free_port, gateway_config, metric, running_gateway

KEY = {"Authorization": "job-key"}
# claim_s 2 (a POST may take ~1.6 s of it); the periodic sweep is far away (30 s), so only the
# dispatcher's own settling can resolve an unknown outcome within these tests' deadlines.
OVERRIDES: dict[str, Any] = {
    "limits": {"async_concurrency": 2},
    "transcripts": {"claim_s": 2, "reconcile_after_s": 30, "poll_refresh_s": 0.1},
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

pytestmark = pytest.mark.parametrize("store", ["embedded", "redis"])


def faulty(mode: str, times: int = 1, *, then_others: int = 0) -> Any:
    """A middleware in front of the simulator's own handlers: the first ``times`` job POSTs
    are created upstream, then answered with ``mode`` ("503") or not at all ("drop": the
    connection is closed after upstream read the whole request and created the job).
    ``then_others``: that many other transcripts are created upstream right after it (a busy
    account: the job is no longer on the list's first page)."""
    left = [times]

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path != "/v2/transcript" or left[0] <= 0:
            return await handler(request)
        left[0] -= 1
        await handler(request)  # the simulator creates the job
        for i in range(then_others):
            request.app[SIM].transcripts.create(
                request[SIM_KEY], {"audio_url": f"https://example.com/o{i}.mp3"}
            )
        if mode == "503":
            return web.json_response({"error": "Service Unavailable"}, status=503)
        assert request.transport is not None
        request.transport.abort()  # the answer is lost
        return web.Response(status=500)

    return middleware


@asynccontextmanager
async def upstream(
    sim: Sim, *, middleware: Any = None, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """The simulator, on ``sock`` when given one (bound, not yet listening: connections to it
    are refused until now, and no other server can take its port meanwhile)."""
    app = build_sim_app(sim)
    if middleware is not None:
        app.middlewares.append(middleware)
    if sock is None:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            yield str(server.make_url("")).rstrip("/")
        finally:
            await server.close()
        return
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def gateway(sim_url: str, store: str, *, public: bool = False) -> AsyncIterator[tuple[str, Any]]:
    overrides = dict(OVERRIDES)
    port = free_port() if public else None
    if public:
        overrides["public_url"] = f"http://127.0.0.1:{port}"
    prefix = "df" + uuid.uuid4().hex[:8]
    if store == "redis":
        await (await redis_client()).aclose()
        overrides["redis"] = {"url": REDIS_URL, "key_prefix": prefix}
    try:
        async with running_gateway(gateway_config(sim_url, **overrides), port=port) as (url, _app, registry):
            yield url, registry
    finally:
        if store == "redis":
            await delete_prefix(prefix)


async def submit(http: aiohttp.ClientSession, url: str, audio_url: str) -> str:
    async with http.post(url + "/v2/transcript", json={"audio_url": audio_url}, headers=KEY) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


async def completes(http: aiohttp.ClientSession, url: str, job_id: str, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    status = ""
    while status != "completed":
        assert loop.time() < deadline, f"job {job_id} still {status!r}"
        await asyncio.sleep(0.1)
        async with http.get(url + f"/v2/transcript/{job_id}", headers=KEY) as r:
            assert r.status == 200, await r.text()
            status = str((await r.json())["status"])
        assert status != "error", f"job {job_id} ended in error"


def upstream_jobs(sim: Sim, audio_url: str) -> int:
    return sum(1 for job in sim.transcripts.jobs.values() if job.body.get("audio_url") == audio_url)


async def test_a_slow_post_past_the_claim_is_submitted_once(store: str) -> None:
    """Upstream answers the POST after 2 s, the claim is 2 s: the POST times out, the job is
    found upstream by the search once the claim lapsed, adopted, and completes. (Before: it
    was requeued and POSTed again and again, one upstream job per attempt.)"""
    sim = Sim(SimConfig(async_concurrency=2, job_seconds=0.3))
    audio = "https://example.com/slow.mp3?sim_post_seconds=2"
    async with upstream(sim) as sim_url, gateway(sim_url, store) as (url, registry):
        async with aiohttp.ClientSession() as http:
            job_id = await submit(http, url, audio)
            await completes(http, url, job_id, within=12)
            await asyncio.sleep(0.5)  # a resubmission, had there been one, would have arrived
        assert metric(registry, "aai_gateway_dispatch_unknown_total", cause="timeout") == 1
    assert upstream_jobs(sim, audio) == 1
    assert sim.recorder.violations == []


@pytest.mark.parametrize("mode", ["drop", "503"])
async def test_an_answer_lost_after_upstream_created_the_job_is_not_submitted_again(
    store: str, mode: str
) -> None:
    """The connection drops after the request was written, or a proxy answers 503 for a POST
    that created the job: one upstream job, adopted, and the client's job completes."""
    sim = Sim(SimConfig(async_concurrency=2, job_seconds=0.3))
    audio = f"https://example.com/{mode}.mp3"
    async with upstream(sim, middleware=faulty(mode)) as sim_url, gateway(sim_url, store) as (url, registry):
        async with aiohttp.ClientSession() as http:
            job_id = await submit(http, url, audio)
            await completes(http, url, job_id, within=12)
            await asyncio.sleep(0.5)
        cause = "5xx" if mode == "503" else "lost"
        assert metric(registry, "aai_gateway_dispatch_unknown_total", cause=cause) == 1
    assert upstream_jobs(sim, audio) == 1


async def test_a_failed_connect_is_requeued_and_submitted_once_upstream_is_back(store: str) -> None:
    """Nothing left the gateway (connection refused): the job is requeued at once, without a
    search, and submitted exactly once when upstream comes back."""
    sim = Sim(SimConfig(async_concurrency=2, job_seconds=0.3))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: every connect is refused
    port = sock.getsockname()[1]
    audio = "https://example.com/refused.mp3"
    async with gateway(f"http://127.0.0.1:{port}", store) as (url, registry):
        async with aiohttp.ClientSession() as http:
            job_id = await submit(http, url, audio)
            async with http.get(url + f"/v2/transcript/{job_id}", headers=KEY) as r:
                assert (await r.json())["status"] == "queued"
            await asyncio.sleep(0.3)
            async with upstream(sim, sock=sock):
                await completes(http, url, job_id, within=10)
                await asyncio.sleep(0.3)
        assert metric(registry, "aai_gateway_dispatch_unknown_total", cause="lost") == 0
    assert upstream_jobs(sim, audio) == 1


async def test_the_marker_tells_apart_two_jobs_of_the_same_audio(store: str) -> None:
    """Two jobs of the same audio, both POSTs answered 503 after upstream created them: the
    search finds two candidates for each. With ``public_url`` set, each POST named the job's
    own webhook receiver, which upstream keeps: each job adopts its own transcript (without
    the marker, both were undecidable and ended in error)."""
    # Jobs run 4 s upstream: their webhooks come after the search (at the claim's end, ~2.4 s).
    sim = Sim(SimConfig(async_concurrency=2, job_seconds=4))
    audio = "https://example.com/twice.mp3"
    async with (
        upstream(sim, middleware=faulty("503", times=2)) as sim_url,
        gateway(sim_url, store, public=True) as (url, _registry),
        aiohttp.ClientSession() as http,
    ):
        ids = await asyncio.gather(submit(http, url, audio), submit(http, url, audio))
        await asyncio.gather(*(completes(http, url, job_id, within=12) for job_id in ids))
        assert len(set(ids)) == 2
    assert upstream_jobs(sim, audio) == 2


async def test_the_search_reads_back_past_a_busy_first_page(store: str) -> None:
    """150 other transcripts were created upstream right after the job's: the search pages
    back (``before_id``) until it passes the claim's start, finds the job and adopts it
    (reading only the newest 100, it used to requeue it: a second upstream job)."""
    sim = Sim(SimConfig(async_concurrency=500, job_seconds=0.3))
    audio = "https://example.com/busy.mp3"
    async with (
        upstream(sim, middleware=faulty("503", then_others=150)) as sim_url,
        gateway(sim_url, store) as (url, _registry),
        aiohttp.ClientSession() as http,
    ):
        job_id = await submit(http, url, audio)
        await completes(http, url, job_id, within=12)
        await asyncio.sleep(0.5)
    assert upstream_jobs(sim, audio) == 1
