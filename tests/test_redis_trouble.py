"""Redis trouble: a private redis-server that the tests kill and restart.

While Redis is unreachable the gateway answers 503 at once with a JSON error, charges
nothing and /readyz fails; when Redis comes back the gateway recovers by itself, and
requests that were waiting keep their turn ahead of newer arrivals.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.app import LEDGER, TRANSCRIPTS
from gateway.ledger import OutageLedger, utc_day
from gateway.products.transcripts.ids import new_job_id
from gateway.sim.app import SimConfig
from tests.helpers import free_port, metric, stack

KEY = {"Authorization": "k"}


class PrivateRedis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (CI needs it)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: ASYNC220 (a fast fork; the readiness wait is async)
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(100):
                try:
                    await client.ping()
                    return
                except Exception:
                    await asyncio.sleep(0.05)
            raise RuntimeError("private redis-server did not start")
        finally:
            await client.aclose()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@asynccontextmanager
async def private_redis() -> AsyncIterator[PrivateRedis]:
    r = PrivateRedis()
    await r.start()
    try:
        yield r
    finally:
        r.kill()


async def test_fail_closed_redis_down_means_503_at_once_and_recovery_after() -> None:
    async with (
        private_redis() as redis,
        stack(redis={"url": redis.url, "on_outage": "fail_closed"}) as s,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(s.url + "/v2/transcript/a", headers=KEY) as r:
            assert r.status == 404  # reached the simulator
        redis.kill()
        for _ in range(5):
            t0 = time.monotonic()
            async with http.get(s.url + "/v2/transcript/b", headers=KEY) as r:
                assert r.status == 503
                body = await r.json()
                assert set(body) == {"error"} and "nothing was charged" in body["error"]
            assert time.monotonic() - t0 < 1.0
        async with http.get(s.url + "/readyz") as r:
            assert r.status == 503 and (await r.json())["store"] == "redis"
        assert [x["path"] for x in s.sim.seen] == ["/v2/transcript/a"]

        await redis.start()  # same port, empty
        deadline = time.monotonic() + 5
        while True:
            async with http.get(s.url + "/v2/transcript/c", headers=KEY) as r:
                if r.status == 404:
                    break
            assert time.monotonic() < deadline, "the gateway did not recover"
            await asyncio.sleep(0.1)
        async with http.get(s.url + "/readyz") as r:
            assert r.status == 200


async def test_waiters_keep_their_turn_across_a_redis_restart() -> None:
    limits = {"requests": {"limit": 2, "window_s": 2.0}}
    sim_cfg = SimConfig(requests_limit=100)
    async with (
        private_redis() as redis,
        stack(sim_cfg, redis={"url": redis.url}, limits=limits, queue={"max_wait_s": 20}) as s,
        aiohttp.ClientSession() as http,
    ):

        async def get(name: str) -> int:
            async with http.get(s.url + f"/v2/transcript/{name}", headers=KEY) as r:
                return r.status

        first = [asyncio.ensure_future(get(f"fill{i}")) for i in range(2)]
        await asyncio.sleep(0.2)
        old = []
        for i in range(4):
            old.append(asyncio.ensure_future(get(f"old{i}")))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        redis.kill()
        await asyncio.sleep(0.3)
        await redis.start()  # every lease and queue entry is gone; the waiters are not
        await asyncio.sleep(1.5)  # the instance resubscribes and re-queues its waiters
        new = [asyncio.ensure_future(get(f"new{i}")) for i in range(2)]
        statuses = await asyncio.gather(*first, *old, *new)
        assert all(st == 404 for st in statuses), statuses
        order = [x["path"].rsplit("/", 1)[1] for x in s.sim.seen]
        olds = [order.index(f"old{i}") for i in range(4)]
        assert olds == sorted(olds), order  # the old waiters in their order...
        assert max(olds) < min(order.index(f"new{i}") for i in range(2)), order  # ...before newer arrivals


async def test_fail_open_redis_down_keeps_serving_and_readyz_says_degraded() -> None:
    """redis.on_outage: fail_open (the default): nobody gets a 503 because Redis died; the
    instance admits locally within its share until Redis returns, then switches back."""
    async with (
        private_redis() as redis,
        stack(redis={"url": redis.url}) as s,
        aiohttp.ClientSession() as http,
    ):
        # Jobs, usage and tokens live in Redis beside the limits, through the fallback too.
        assert type(s.app[TRANSCRIPTS].jobs).__name__ == "RedisJobStore"
        async with http.get(s.url + "/v2/transcript/a", headers=KEY) as r:
            assert r.status == 404  # reached the simulator
        redis.kill()
        for i in range(5):
            async with http.get(s.url + f"/v2/transcript/b{i}", headers=KEY) as r:
                assert r.status == 404, await r.text()  # still reaches the simulator
        async with http.get(s.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["store_state"].startswith("degraded"), body
        assert metric(s.registry, "aai_gateway_store_degraded") == 1
        assert metric(s.registry, "aai_gateway_store_outages") == 1
        await redis.start()  # same port, empty
        deadline = time.monotonic() + 8
        while True:
            async with http.get(s.url + "/readyz") as r:
                if "store_state" not in await r.json():
                    break
            assert time.monotonic() < deadline, "the gateway did not switch back to Redis"
            await asyncio.sleep(0.1)
        async with http.get(s.url + "/v2/transcript/c", headers=KEY) as r:
            assert r.status == 404
        assert metric(s.registry, "aai_gateway_store_degraded") == 0
        assert metric(s.registry, "aai_gateway_store_outage_seconds") > 0


async def test_fail_open_a_transcript_submitted_while_redis_is_down_is_kept_and_runs_once() -> None:
    """New submissions while Redis is away wait in a local journal (answered as queued, their
    id pollable), then move into Redis in order when it returns and run once each."""
    async with (
        private_redis() as redis,
        stack(SimConfig(job_seconds=0.2), redis={"url": redis.url}, transcripts={"poll_refresh_s": 0.1}) as s,
        aiohttp.ClientSession() as http,
    ):

        async def status(job_id: str) -> tuple[int, str]:
            async with http.get(f"{s.url}/v2/transcript/{job_id}", headers=KEY) as r:
                return r.status, str((await r.json()).get("status"))

        redis.kill()
        ids = []
        for i in range(3):
            body = {"audio_url": f"https://example.com/{i}.mp3"}
            headers = {**KEY, "Idempotency-Key": f"k{i}"}
            async with http.post(s.url + "/v2/transcript", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                doc = await r.json()
                assert doc["status"] == "queued"
                ids.append(doc["id"])
        async with http.post(
            s.url + "/v2/transcript", json={"audio_url": "x"}, headers={**KEY, "Idempotency-Key": "k0"}
        ) as r:
            assert (await r.json())["id"] == ids[0]  # the same key again: the same job
        assert [await status(i) for i in ids] == [(200, "queued")] * 3
        await redis.start()  # same port, empty
        deadline = time.monotonic() + 15
        while [await status(i) for i in ids] != [(200, "completed")] * 3:
            assert time.monotonic() < deadline, [await status(i) for i in ids]
            await asyncio.sleep(0.1)
        assert len(s.app[TRANSCRIPTS].journal or []) == 0
        jobs = [await s.app[TRANSCRIPTS].jobs.get(i) for i in ids]
        seqs = [job.seq for job in jobs if job is not None]
        assert len(seqs) == 3 and seqs == sorted(seqs)  # queued in Redis in the order they came
    assert s.sim.report()["transcript_posts"] == 3  # each once


async def test_fail_open_polling_a_job_from_before_the_outage_keeps_working() -> None:
    """A job whose record is in Redis: while Redis is away, this instance answers from the
    last record it saw, refreshed from upstream as usual (the real document once it ends);
    another key still gets 404; an id it never saw is answered `queued` (the SDK waits on)."""
    async with (
        private_redis() as redis,
        stack(SimConfig(job_seconds=0.6), redis={"url": redis.url}, transcripts={"poll_refresh_s": 0.1}) as s,
        aiohttp.ClientSession() as http,
    ):
        body = {"audio_url": "https://example.com/a.mp3"}
        async with http.post(s.url + "/v2/transcript", json=body, headers=KEY) as r:
            job_id = (await r.json())["id"]
        redis.kill()
        deadline = time.monotonic() + 10
        while True:
            async with http.get(f"{s.url}/v2/transcript/{job_id}", headers=KEY) as r:
                assert r.status == 200, await r.text()
                doc = await r.json()
            assert doc["id"] == job_id
            if doc["status"] == "completed":
                break
            assert doc["status"] in ("queued", "processing"), doc
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.1)
        assert doc["text"], doc  # upstream's document, under the client's id
        async with http.get(f"{s.url}/v2/transcript/{job_id}", headers={"Authorization": "other"}) as r:
            assert r.status == 404  # ownership holds on the copy too
        unseen = new_job_id()  # a well-formed gateway id this instance never saw
        async with http.get(f"{s.url}/v2/transcript/{unseen}", headers=KEY) as r:
            assert r.status == 200 and (await r.json())["status"] == "queued"
        async with http.get(s.url + "/v2/transcript?limit=5", headers=KEY) as r:
            listed = await r.json()
            assert r.status == 200 and job_id in [t["id"] for t in listed["transcripts"]], listed
        assert metric(s.registry, "aai_gateway_store_degraded") == 1
    assert s.sim.report()["transcript_posts"] == 1


async def test_fail_open_tokens_and_streaming_usage_survive_the_outage() -> None:
    """While Redis is away a temporary token is issued and noted here (its session billed to
    the key that asked for it), and a session's usage waits in a local file until Redis is
    back, then is recorded once."""
    async with (
        private_redis() as redis,
        stack(redis={"url": redis.url}) as s,
        aiohttp.ClientSession() as http,
    ):
        ledger = s.app[LEDGER]
        assert isinstance(ledger, OutageLedger)

        async def token() -> str:
            async with http.get(s.url + "/v3/token?expires_in_seconds=60", headers=KEY) as r:
                assert r.status == 200, await r.text()
                return str((await r.json())["token"])

        async def session(token: str) -> None:
            ws_url = s.url.replace("http", "ws") + f"/v3/ws?sample_rate=16000&token={token}"
            async with http.ws_connect(ws_url) as ws:
                assert json.loads((await ws.receive()).data)["type"] == "Begin"
                await ws.send_bytes(b"\0\0" * 1600)
                await ws.send_str(json.dumps({"type": "Terminate"}))
                async for _ in ws:
                    pass

        # One of each first: limits not heard of within the last second count as full.
        await session(await token())
        today = utc_day(time.time())
        deadline = time.monotonic() + 5
        while not await ledger.rows(today, today):  # recorded in Redis (which comes back empty)
            assert time.monotonic() < deadline, "the first session's usage was not recorded"
            await asyncio.sleep(0.02)
        redis.kill()
        await session(await token())
        deadline = time.monotonic() + 5
        while len(ledger) != 1:
            assert time.monotonic() < deadline, "the session's usage was not kept"
            await asyncio.sleep(0.05)
        await redis.start()  # same port, empty
        owner = s.app[TRANSCRIPTS]._vault.fingerprint(KEY["Authorization"])[:16]
        deadline = time.monotonic() + 8
        while len(ledger):
            assert time.monotonic() < deadline, "the kept usage did not reach Redis"
            await asyncio.sleep(0.1)
        rows = await ledger.rows(today, today)
        usage = {(r.key, r.metric): r.value for r in rows if r.product == "streaming"}
        assert usage[(owner, "sessions")] == 1, usage  # the token's issuer, once (Redis came back empty)
        assert await ledger.flush() == 0  # nothing left to add twice
