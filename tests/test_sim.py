"""The simulator is the judge, so it is tested too: it must enforce upstream's limits the
way UPSTREAM.md describes and record every violation."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from gateway.sim.app import NEGATIVE_BALANCE, SimConfig
from gateway.sim.recorder import RollingWindow, busiest_window
from tests.helpers import running_sim, serving

KEY = {"Authorization": "k"}


def test_rolling_window_counts_arrivals_in_the_last_w_seconds() -> None:
    w = RollingWindow("x", 2, 1.0)
    assert w.arrive(0.0) and w.arrive(0.5)
    assert not w.arrive(0.99)  # the third inside (t - 1, t]
    assert w.arrive(1.0)  # 0.0 has left the window
    assert abs(w.reset_in(1.2) - 0.3) < 1e-9
    assert busiest_window([0.0, 0.5, 1.0, 1.4, 3.0], 1.0) == 3


async def test_request_window_429_and_violation() -> None:
    async with running_sim(SimConfig(requests_limit=2, requests_window_s=10)) as (sim, url):
        async with aiohttp.ClientSession() as http:
            statuses = []
            for _ in range(3):
                async with http.get(url + "/v2/transcript/none", headers=KEY) as r:
                    statuses.append(r.status)
                    retry = r.headers.get("Retry-After")
            assert statuses == [404, 404, 429] and retry is not None and 1 <= int(retry) <= 10
        assert [v.kind for v in sim.recorder.violations] == ["requests"]


async def test_missing_key_is_401_and_not_counted() -> None:
    async with running_sim(SimConfig(requests_limit=1)) as (sim, url), aiohttp.ClientSession() as http:
        async with http.get(url + "/v2/transcript/x") as r:
            assert r.status == 401 and (await r.json())["error"].startswith("Authentication error")
        assert sim.requests.arrivals == []


async def test_transcripts_throttle_beyond_concurrency_and_webhooks_retry() -> None:
    hits: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(1)
        assert request.query["customer_id"] == "c1" and request.headers["X-Auth"] == "s3cret"
        return web.Response(status=500 if len(hits) < 3 else 200)

    hook_app = web.Application()
    hook_app.router.add_post("/hook", hook)
    async with serving(hook_app) as port:
        async with (
            running_sim(SimConfig(async_concurrency=1, job_seconds=0.2, webhook_retry_s=0.05)) as (sim, url),
            aiohttp.ClientSession() as http,
        ):
            body = {
                "audio_url": "https://x/a.mp3",
                "webhook_url": f"http://127.0.0.1:{port}/hook?customer_id=c1",
                "webhook_auth_header_name": "X-Auth",
                "webhook_auth_header_value": "s3cret",
            }
            ids = []
            for _ in range(2):
                async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
                    ids.append((await r.json())["id"])
            async with http.get(url + f"/v2/transcript/{ids[1]}", headers=KEY) as r:
                second = await r.json()
            assert second["status"] == "queued" and second["throttled"] is True
            assert [v.kind for v in sim.recorder.violations] == ["async_throttled"]
            for _ in range(100):
                if len(hits) >= 4:
                    break
                await asyncio.sleep(0.05)
            async with http.get(url + f"/v2/transcript/{ids[0]}", headers=KEY) as r:
                first = await r.json()
            assert first["status"] == "completed" and first["text"]
            assert sim.transcripts.max_running == 1
            attempts = [e["attempt"] for e in sim.transcripts.webhook_log if e["transcript_id"] == ids[0]]
            assert attempts == [1, 2, 3]  # two 500s, then the 200 stops the retries


async def test_negative_balance_refuses_new_work() -> None:
    async with running_sim(SimConfig(negative_balance=True)) as (sim, url), aiohttp.ClientSession() as http:
        async with http.post(url + "/v2/transcript", json={"audio_url": "https://x/a"}, headers=KEY) as r:
            assert r.status == 400 and (await r.json())["error"] == NEGATIVE_BALANCE


async def test_llm_per_model_window_with_rate_limit_headers() -> None:
    async with (
        running_sim(SimConfig(llm_limit=1, llm_window_s=10)) as (sim, url),
        aiohttp.ClientSession() as http,
    ):
        for model, expected in [("gpt-5", 200), ("gpt-5", 429), ("claude-sonnet-4-6", 200)]:
            async with http.post(url + "/v1/chat/completions", json={"model": model}, headers=KEY) as r:
                assert r.status == expected
                if expected == 429:
                    assert r.headers["X-RateLimit-Model"] == "gpt-5"
                    assert r.headers["X-RateLimit-Remaining"] == "0"
                    assert 1 <= int(r.headers["X-RateLimit-Reset"]) <= 10
        assert [v.limit for v in sim.recorder.violations] == ["llm:gpt-5"]


def pcm(ms: int, rate: int = 16000) -> bytes:
    return b"\0\0" * (rate * ms // 1000)


async def test_streaming_session_lifecycle_and_termination() -> None:
    async with running_sim() as (sim, url), aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws") + "/v3/ws?sample_rate=16000", headers=KEY) as ws:
            begin = json.loads((await ws.receive()).data)
            assert begin["type"] == "Begin" and begin["expires_at"] > 0
            for _ in range(22):
                await ws.send_bytes(pcm(50))
                await asyncio.sleep(0.05)
            await ws.send_str(json.dumps({"type": "Terminate"}))
            kinds = []
            async for msg in ws:
                kinds.append(json.loads(msg.data)["type"])
            assert "Turn" in kinds and kinds[-1] == "Termination"
            assert ws.close_code == 1000
        assert sim.streaming.report()["terminated"] == 1 and sim.recorder.violations == []


async def test_streaming_over_the_session_limit_is_closed_3009() -> None:
    async with running_sim(SimConfig(streaming_limit=1)) as (sim, url), aiohttp.ClientSession() as http:
        ws_url = url.replace("http", "ws") + "/v3/ws"
        async with http.ws_connect(ws_url, headers=KEY) as first:
            await first.receive()  # Begin
            async with http.ws_connect(ws_url, headers=KEY) as second:  # the upgrade succeeds...
                error = json.loads((await second.receive()).data)
                assert error["type"] == "Error" and error["error_code"] == 3009
                await second.receive()
                assert second.close_code == 3009  # ...then the socket is closed
            await first.close()
        assert [v.kind for v in sim.recorder.violations] == ["streaming_sessions"]
        assert sim.streaming.report()["left_open"] == 1  # the first ended without Terminate


async def test_streaming_audio_faster_than_real_time_is_closed_3007() -> None:
    async with running_sim() as (sim, url), aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws") + "/v3/ws", headers=KEY) as ws:
            await ws.receive()
            for _ in range(40):  # 2 s of audio at once
                if ws.closed:
                    break
                await ws.send_bytes(pcm(50))
            async for _ in ws:
                pass
            assert ws.close_code == 3007
        assert [v.kind for v in sim.recorder.violations] == ["audio_rate"]


async def test_streaming_temporary_token_is_single_use() -> None:
    async with running_sim() as (sim, url), aiohttp.ClientSession() as http:
        async with http.get(url + "/v3/token?expires_in_seconds=60", headers=KEY) as r:
            token = (await r.json())["token"]
        ws_url = url.replace("http", "ws") + f"/v3/ws?token={token}"
        async with http.ws_connect(ws_url) as ws:
            assert json.loads((await ws.receive()).data)["type"] == "Begin"
            await ws.send_str(json.dumps({"type": "Terminate"}))
        async with http.get(ws_url) as r:
            assert r.status == 401
