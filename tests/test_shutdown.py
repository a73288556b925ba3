"""Graceful shutdown: a rolling restart of three instances under load.

Three ``aai-gateway serve`` processes share one real Redis (a key prefix of this test's own)
in front of the simulator process. A client load of transcript submissions, polls, uploads
and a streaming session runs while each instance in turn is sent SIGTERM (after the load
stopped sending it new work, as a load balancer would once /readyz fails) and started again.

Every HTTP answer is a success or a 429 with Retry-After (waiters handed back), never a 5xx
or a connection lost mid-request; each instance exits 0 within shutdown_grace_s and a
margin; every streaming session ends with Termination relayed and a close the SDKs know
(1013 when the gateway ended it); every transcript accepted completes upstream exactly once.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from gateway.app import HANDLER
from gateway.sim.app import SimConfig
from tests.conftest import REDIS_URL
from tests.helpers import Process, _merge, delete_prefix, stack, start_gateway_process, start_sim_process

pytestmark = pytest.mark.slow

KEY = {"Authorization": "rolling-restart-key"}
# The simulator answers only this key: a stray process elsewhere on the machine still pointed at
# a port this simulator reuses (another test's gateway) cannot add its jobs or sessions to ours.
OURS = [KEY["Authorization"]]
GRACE_S = 3.0
MARGIN_S = 6.0  # streaming terminations (terminate_wait_s), the store's close, process exit
CHUNK = b"\0\0" * 800  # 50 ms of 16 kHz PCM


@dataclass
class Load:
    """What the clients saw, and where they may send (instances not being restarted)."""

    up: list[Process]
    stop: bool = False
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)  # 5xx, 429 without Retry-After, lost connections
    accepted: dict[str, str] = field(default_factory=dict)  # gateway job id -> audio_url
    sessions: list[tuple[bool, int | None]] = field(default_factory=list)  # (Termination seen, close code)
    handed_back: int = 0  # 429s of an instance shutting down (its waiters)

    def pick(self) -> Process:
        return random.choice(self.up)

    async def answer(self, resp: aiohttp.ClientResponse, what: str) -> Any:
        self.statuses[resp.status] += 1
        body = await resp.json(content_type=None)
        if resp.status >= 500 or (resp.status == 429 and "Retry-After" not in resp.headers):
            self.problems.append(f"{what}: {resp.status} {dict(resp.headers)} {body}")
        if resp.status == 429 and "shutting down" in body["error"]:
            self.handed_back += 1
        return body


async def submitter(load: Load, http: aiohttp.ClientSession) -> None:
    n = 0
    while not load.stop:
        n += 1
        audio = f"https://example.com/rolling-{n}.mp3"
        try:
            async with http.post(
                load.pick().url + "/v2/transcript", json={"audio_url": audio}, headers=KEY
            ) as r:
                body = await load.answer(r, "POST /v2/transcript")
                if r.status == 200:
                    load.accepted[str(body["id"])] = audio
        except aiohttp.ClientError as exc:
            load.problems.append(f"POST /v2/transcript: {exc!r}")
        await asyncio.sleep(0.2)


async def uploader(load: Load, http: aiohttp.ClientSession) -> None:
    """More than the window allows: some uploads wait, so SIGTERM finds waiters to hand back."""
    while not load.stop:
        try:
            async with http.post(load.pick().url + "/v2/upload", data=b"audio" * 100, headers=KEY) as r:
                await load.answer(r, "POST /v2/upload")
        except aiohttp.ClientError as exc:
            load.problems.append(f"POST /v2/upload: {exc!r}")
        await asyncio.sleep(0.02)


async def poller(load: Load, http: aiohttp.ClientSession) -> None:
    while not load.stop:
        if load.accepted:
            job = random.choice(list(load.accepted))
            try:
                async with http.get(load.pick().url + f"/v2/transcript/{job}", headers=KEY) as r:
                    await load.answer(r, "GET /v2/transcript/{id}")
            except aiohttp.ClientError as exc:
                load.problems.append(f"GET /v2/transcript/{{id}}: {exc!r}")
        await asyncio.sleep(0.2)


async def streamer(load: Load, http: aiohttp.ClientSession) -> None:
    """One session at a time, on the instance up the longest (the next to be restarted); when
    the gateway ends it (its shutdown), a new one elsewhere."""
    while not load.stop:
        url = load.up[0].url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
        try:
            ws = await http.ws_connect(url, headers=KEY)
        except aiohttp.ClientError as exc:
            load.problems.append(f"/v3/ws: {exc!r}")
            await asyncio.sleep(0.2)
            continue
        reader = asyncio.create_task(termination_seen(ws))
        while not ws.closed and not reader.done() and not load.stop:
            try:
                await ws.send_bytes(CHUNK)
            except (ConnectionError, aiohttp.ClientError):
                break
            await asyncio.sleep(0.05)
        if not ws.closed and not reader.done():
            await ws.send_str(json.dumps({"type": "Terminate"}))
        load.sessions.append((await asyncio.wait_for(reader, 10), ws.close_code))


async def termination_seen(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Reads the session to its end: whether a Termination came."""
    seen = False
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("type") == "Termination":
            seen = True
    return seen


def shutdown_config(sim: Process, prefix: str, **more: Any) -> dict[str, Any]:
    """What every gateway here runs on: the simulator upstream, the real Redis under the test's
    key prefix, a grace of GRACE_S, and INFO logs (the shutdown's own lines are asserted);
    ``more`` merges into it."""
    raw = {
        "upstream": {"api_url": sim.url, "llm_url": sim.url, "streaming_url": "ws" + sim.url[4:]},
        "redis": {"url": REDIS_URL, "key_prefix": prefix},
        "shutdown_grace_s": GRACE_S,
        "log": {"level": "info", "access_log": False},
    }
    return _merge(raw, more)


@asynccontextmanager
async def one_gateway(**more: Any) -> AsyncIterator[Process]:
    """The simulator (answering only OURS) and one gateway process on ``shutdown_config``, both
    ready; both killed and the test's keys deleted afterwards."""
    prefix = "roll" + uuid.uuid4().hex[:8]
    sim = start_sim_process(SimConfig(keys=OURS))
    gw = start_gateway_process(shutdown_config(sim, prefix, **more))
    try:
        await sim.ready("/_sim/report")
        await gw.ready("/readyz")
        yield gw
    finally:
        gw.kill()
        sim.kill()
        await delete_prefix(prefix)


async def stop_gracefully(gw: Process) -> float:
    """SIGTERM; the exit code must be 0. Returns the seconds it took."""
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(gw.proc.wait, GRACE_S + MARGIN_S + 5)
    took = time.monotonic() - started
    assert rc == 0, gw.output()
    return took


async def test_a_rolling_restart_under_load_loses_nothing_and_charges_nothing_twice() -> None:
    prefix = "roll" + uuid.uuid4().hex[:8]
    sim = start_sim_process(SimConfig(async_concurrency=3, job_seconds=0.5, post_latency_s=0.3, keys=OURS))
    raw = shutdown_config(
        sim,
        prefix,
        account="rolling",
        limits={"async_concurrency": 3, "requests": {"limit": 10, "window_s": 1.0}},
        queue={"max_wait_s": 2.0},
        transcripts={"claim_s": 3, "reconcile_after_s": 0.5, "poll_refresh_s": 0.2},
        streaming={"terminate_wait_s": 2.0},
    )
    gateways = [start_gateway_process(raw) for _ in range(3)]
    everyone = list(gateways)
    took: list[float] = []
    try:
        await sim.ready("/_sim/report")
        for gw in gateways:
            await gw.ready("/readyz")
        load = Load(up=list(gateways))
        async with aiohttp.ClientSession() as http:
            clients = [
                asyncio.create_task(c(load, http)) for c in (submitter, *[uploader] * 6, poller, streamer)
            ]
            await asyncio.sleep(1.5)
            for i, gw in enumerate(gateways):
                load.up.remove(gw)  # the balancer sends it no new work (its /readyz says 503 from now)
                await asyncio.sleep(0.05)  # requests that already picked it are in flight, or waiting
                took.append(await stop_gracefully(gw))
                assert "SIGTERM received: shutting down gracefully" in gw.output()
                fresh = start_gateway_process(raw)
                everyone.append(fresh)
                await fresh.ready("/readyz")
                gateways[i] = fresh
                load.up.append(fresh)
                await asyncio.sleep(1.0)
            load.stop = True
            await asyncio.wait_for(asyncio.gather(*clients), 15)

            # Every job accepted completes (through any instance), upstream exactly once.
            deadline = time.monotonic() + 60
            pending = set(load.accepted)
            while pending:
                assert time.monotonic() < deadline, f"{len(pending)} jobs never completed"
                job = next(iter(pending))
                async with http.get(load.pick().url + f"/v2/transcript/{job}", headers=KEY) as r:
                    if r.status == 200 and (await r.json())["status"] == "completed":
                        pending.discard(job)
                        continue
                await asyncio.sleep(0.2)
            async with http.get(sim.url + "/_sim/report") as r:
                report = await r.json()
            async with http.get(sim.url + "/v2/transcript?limit=200", headers=KEY) as r:
                upstream = [t["audio_url"] for t in (await r.json())["transcripts"]]
    finally:
        for gw in everyone:
            gw.kill()
        sim.kill()
        await delete_prefix(prefix)

    assert load.problems == [], load.problems[:10]
    assert set(load.statuses) <= {200, 429}, load.statuses
    assert len(load.accepted) >= 20 and load.statuses[200] > 50, load.statuses
    assert load.handed_back >= 1  # waiters were there to hand back
    counts = Counter(upstream)
    assert sorted(counts) == sorted(load.accepted.values()), "a job lost, or one nobody accepted"
    assert set(counts.values()) == {1}, [a for a, n in counts.items() if n > 1]  # never twice
    assert report["transcripts"]["submitted"] == len(counts)
    assert report["violations"] == []
    assert report["streaming"]["left_open"] == 0
    assert load.sessions and all(termination for termination, _ in load.sessions), load.sessions
    assert {code for _, code in load.sessions} <= {1000, 1013}, load.sessions
    assert sum(code == 1013 for _, code in load.sessions) == 3, load.sessions  # one per restart
    assert max(took) < GRACE_S + MARGIN_S, took
    print(f"\nrolling restart: {dict(load.statuses)} answers ({load.handed_back} handed back), "
          f"{len(load.accepted)} jobs, sessions {load.sessions}, "
          f"exits in {', '.join(f'{t:.1f}s' for t in took)}")  # fmt: skip


async def test_sigterm_lets_an_admitted_request_finish_and_hands_a_waiter_back_at_once() -> None:
    """One instance, two requests a window: a transcript whose upstream POST takes 1.5 s is in
    progress and an upload holds the other token, so a second upload waits. SIGTERM: the
    waiter gets 429 + Retry-After at once, the POST in progress its 200 within the grace, and
    the process exits 0."""
    limits = {"requests": {"limit": 2, "window_s": 30}}
    async with one_gateway(limits=limits, queue={"max_wait_s": 10}) as gw:
        async with aiohttp.ClientSession() as http:

            async def call(method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], Any, float]:
                async with http.request(method, gw.url + path, headers=KEY, **kw) as r:
                    return r.status, dict(r.headers), await r.json(content_type=None), time.monotonic()

            job = {"audio_url": "https://example.com/slow.mp3?sim_post_seconds=1.5"}
            slow = asyncio.create_task(call("POST", "/v2/transcript", json=job))
            await asyncio.sleep(0.3)
            assert (await call("POST", "/v2/upload", data=b"a"))[0] == 200  # the window's other token
            waiter = asyncio.create_task(call("POST", "/v2/upload", data=b"b"))
            await asyncio.sleep(0.3)
            assert not waiter.done() and not slow.done()
            sent = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            status, headers, body, at = await waiter
            assert status == 429 and headers["Retry-After"] == "1" and "shutting down" in body["error"]
            assert at - sent < 1.0  # handed back at once, not after the request in progress
            try:
                status, _, body, at = await slow
            except Exception:
                print(gw.output())
                raise
            assert status == 200 and body["status"] in ("queued", "processing"), body
            rc = await asyncio.to_thread(gw.proc.wait, GRACE_S + MARGIN_S)
            assert rc == 0 and time.monotonic() - sent < GRACE_S + MARGIN_S
        assert "shut down in" in gw.output()


async def test_while_draining_readyz_fails_and_a_request_that_would_wait_is_handed_back() -> None:
    """What a kept-alive connection sees during the grace (new connections are refused)."""
    async with (
        stack(limits={"requests": {"limit": 1, "window_s": 30}}) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(gw.url + "/v2/upload", data=b"a", headers=KEY) as r:
            assert r.status == 200  # the window's one token
        gw.app[HANDLER].draining = True
        async with http.get(gw.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 503 and body["error"] == "shutting down" and len(body["config_hash"]) == 12
            assert r.headers["Connection"] == "close"  # the next request goes elsewhere
        started = time.monotonic()
        async with http.post(gw.url + "/v2/upload", data=b"b", headers=KEY) as r:
            body = await r.json()
            assert r.status == 429 and r.headers["Retry-After"] == "1" and "shutting down" in body["error"]
        assert time.monotonic() - started < 1.0  # not after queue.max_wait_s


async def test_a_request_outlasting_the_grace_is_cut_and_the_process_still_exits_0_in_time() -> None:
    async with one_gateway(shutdown_grace_s=1.0) as gw:
        async with aiohttp.ClientSession() as http:
            job = {"audio_url": "https://example.com/stuck.mp3?sim_post_seconds=4"}
            stuck = asyncio.create_task(http.post(gw.url + "/v2/transcript", json=job, headers=KEY))
            await asyncio.sleep(0.5)
            took = await stop_gracefully(gw)
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await stuck
        assert 1.0 <= took < 1.0 + MARGIN_S, (took, gw.output()[-4000:])  # the log says which step
        assert "1 requests still in progress after shutdown_grace_s (1s): cut" in gw.output()
