"""Hostile clients against the transcript routes: the job store cannot be filled with bad
keys and big bodies, a request upstream refused leaves nothing behind, and one key's job id
is no cursor into another key's list.

Bodies are sent over raw sockets (asyncio.open_connection): a 5 MiB body the gateway refuses
early must not depend on a client library's manners.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.app import CONFIG, TRANSCRIPTS
from gateway.sim.app import SimConfig
from tests.conftest import redis_client
from tests.helpers import sim_and_gateway

GOOD = "good-key"
MIB = 1024 * 1024


def gateway(store: str, sim_config: SimConfig, **overrides: Any) -> Any:
    return sim_and_gateway(sim_config, store=store, **overrides)


async def raw_post(url: str, key: str, body: bytes, *, chunked: bool = False) -> tuple[int, bytes]:
    """POST /v2/transcript over a raw socket; the status and body of the answer. The body is
    written while the answer may already be on its way (a refusal before the body is read)."""
    u = URL(url)
    assert u.host is not None and u.port is not None
    reader, writer = await asyncio.open_connection(u.host, u.port)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    head = (
        f"POST /v2/transcript HTTP/1.1\r\nHost: {u.host}\r\nAuthorization: {key}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode())

    async def send_body() -> None:
        try:
            for i in range(0, len(body), 64 * 1024):
                piece = body[i : i + 64 * 1024]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the gateway answered and closed before taking it all: as it should

    sending = asyncio.ensure_future(send_body())
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        sending.cancel()
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload


def padded(size: int, audio_url: str = "https://x/a.mp3") -> bytes:
    """A transcript request of about ``size`` bytes (a large custom field)."""
    return json.dumps({"audio_url": audio_url, "custom_spelling": "x" * max(0, size - 60)}).encode()


async def store_size(app: Any) -> tuple[int, int]:
    """(records, bytes) the job store holds: its Redis keys (jobs, their indexes, idempotency
    keys) and their memory, or the sqlite jobs and idempotency rows and their data."""
    cfg = app[CONFIG]
    if cfg.redis.url is None:
        db = sqlite3.connect(Path(cfg.transcripts.data_dir) / "jobs.db")
        try:
            rows, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM jobs").fetchone()
            idem = db.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0]
        finally:
            db.close()
        return int(rows) + int(idem), int(size)
    client = await redis_client()
    count = size = 0
    try:
        async for key in client.scan_iter(match=f"{cfg.redis.key_prefix}:*"):
            if not any(part in key for part in (b":job:", b":jobs:", b":upid:", b":idem:")):
                continue  # admission's own keys (window leases, short tombstones) expire by themselves
            count += 1
            size += int(await client.memory_usage(key) or 0)
    finally:
        await client.aclose()
    return count, size


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_bad_keys_with_big_bodies_do_not_grow_the_job_store(store: str) -> None:
    """Three 5 MiB bodies with bad keys (declared, and chunked) are refused (413) before
    anything is stored; under the cap, upstream refuses the bad key at once (401): the client
    gets upstream's answer and the gateway keeps nothing."""
    async with gateway(store, SimConfig(keys=[GOOD])) as (sim, url, app):
        before = await store_size(app)
        for i in range(3):
            status, payload = await raw_post(url, f"bad-key-{i}", padded(5 * MIB), chunked=i == 2)
            assert status == 413, payload
            assert "error" in json.loads(payload)
        assert await store_size(app) == before
        for i in range(3):
            status, payload = await raw_post(url, f"bad-key-{i}", padded(60 * 1024))
            assert status == 401, payload
        assert sim.transcripts.submitted == 0
        assert await store_size(app) == before  # nothing kept for a refused request
        status, payload = await raw_post(url, GOOD, padded(1024))
        assert status == 200 and json.loads(payload)["status"] in ("queued", "processing")


async def test_a_refused_request_leaves_its_idempotency_key_free() -> None:
    async with gateway("redis", SimConfig(keys=[GOOD])) as (sim, url, app), aiohttp.ClientSession() as http:
        for key, want in [("bad-key", 401), ("bad-key", 401)]:
            headers = {"Authorization": key, "Idempotency-Key": "k-1"}
            async with http.post(
                url + "/v2/transcript", json={"audio_url": "https://x/a"}, headers=headers
            ) as r:
                assert r.status == want, await r.text()  # upstream's answer each time, not a ghost job


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_a_queued_job_refused_at_dispatch_keeps_only_its_id_status_and_error(store: str) -> None:
    overrides = {"limits": {"async_concurrency": 1}, "transcripts": {"reconcile_after_s": 0.2}}
    async with (
        gateway(store, SimConfig(keys=[GOOD], job_seconds=0.3, async_concurrency=1), **overrides) as (
            sim,
            url,
            app,
        ),
        aiohttp.ClientSession() as http,
    ):
        first = {"audio_url": "https://x/1.mp3"}
        async with http.post(url + "/v2/transcript", json=first, headers={"Authorization": GOOD}) as r:
            assert r.status == 200
        bad = {"audio_url": "https://x/secret-audio.mp3", "custom_spelling": "y" * 30_000}
        async with http.post(url + "/v2/transcript", json=bad, headers={"Authorization": "bad-key"}) as r:
            queued = await r.json()
            assert r.status == 200 and queued["status"] == "queued"  # nobody could tell yet
        jobs = app[TRANSCRIPTS].jobs

        async def refused() -> bool:
            job = await jobs.get(queued["id"])
            return job is not None and job.state.value == "ended"

        for _ in range(200):
            if await refused():
                break
            await asyncio.sleep(0.05)
        job = await jobs.get(queued["id"])
        assert job is not None and job.state.value == "ended"
        assert job.body == {} and job.cred is None
        assert set(job.snapshot or {}) <= {"id", "status", "error"}
        records, size = await store_size(app)
        assert size < 8 * 1024, size  # two small records, not the 30 KB body
        async with http.get(
            url + f"/v2/transcript/{queued['id']}", headers={"Authorization": "bad-key"}
        ) as r:
            seen = await r.json()
        assert seen["id"] == queued["id"] and seen["status"] == "error" and seen["error"]
        assert "custom_spelling" not in seen


async def test_another_keys_job_id_is_not_a_cursor_into_its_list() -> None:
    """Key B lists with ``before_id=<key A's job id>``: the id is not mapped to A's upstream
    id (B would learn it, and page through A's list); it goes upstream as B sent it."""
    async with gateway("sqlite", SimConfig()) as (sim, url, app), aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v2/transcript", json={"audio_url": "https://x/a"}, headers={"Authorization": "key-a"}
        ) as r:
            a_job = await r.json()
        (a_upstream,) = sim.transcripts.jobs
        for cursor in ("before_id", "after_id"):
            async with http.get(
                url + f"/v2/transcript?{cursor}={a_job['id']}", headers={"Authorization": "key-b"}
            ) as r:
                assert a_upstream not in await r.text()
            listed = [s for s in sim.seen if s["method"] == "GET" and s["path"] == "/v2/transcript"]
            assert listed[-1]["query"] == f"{cursor}={a_job['id']}"
        # Its owner's cursor is still mapped.
        async with http.get(
            url + f"/v2/transcript?before_id={a_job['id']}", headers={"Authorization": "key-a"}
        ) as r:
            assert r.status == 200
        listed = [s for s in sim.seen if s["method"] == "GET" and s["path"] == "/v2/transcript"]
        assert listed[-1]["query"] == f"before_id={a_upstream}"
