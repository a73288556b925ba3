"""Monthly spend caps (issue 12): new billable work of a project (a key, the account) past
its cap is a 402 before anything is sent or spent; reads still work; a transcript holds an
estimate until it completes; streaming sessions open at the crossing are warned and ended;
the cap resets with the UTC month."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Config
from gateway.identity import Identity, key_digest, new_key
from gateway.ledger import Event, Line, SqliteLedger
from gateway.metrics import Metrics
from gateway.sim.app import SimConfig
from gateway.spend import SpendGuard
from tests.helpers import metric, stack

A, B = new_key(), new_key()
PROJECTS = [
    {"name": "alpha", "keys": [{"name": "a", "sha256": key_digest(A)}], "monthly_spend_cap_usd": 0.2},
    {"name": "beta", "keys": [{"name": "b", "sha256": key_digest(B)}]},
]
PRICING = {"transcription": {"universal-3-pro": 3.6}, "streaming": {"universal-streaming": 36.0},
           "llm": {"gpt-5": {"input": 10_000.0, "output": 10_000.0}}}  # fmt: skip


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", "sk-account-key-spend-caps-0000")
    yield


async def until(check: Any, within: float = 5.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = await check()
        if got:
            return got
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.05)


async def test_a_transcript_holds_its_estimate_and_the_cap_refuses_new_work_not_reads() -> None:
    # universal-3-pro at $3.60/h: a transcript holds 120 s ($0.12) until it completes.
    config = {
        "projects": PROJECTS,
        "pricing": PRICING,
        "transcripts": {"hold_audio_s": 120, "poll_refresh_s": 0.05},
    }
    async with stack(SimConfig(job_seconds=1.0), **config) as s, aiohttp.ClientSession() as http:

        async def post(key: str, seconds: int = 60) -> tuple[int, Any]:
            body = {
                "audio_url": f"https://x.test/a.mp3?sim_audio={seconds}",
                "speech_models": ["universal-3-pro"],
            }
            async with http.post(s.url + "/v2/transcript", json=body, headers={"Authorization": key}) as r:
                return r.status, await r.json()

        status, first = await post(A)
        assert status == 200
        status, second = await post(A)  # $0.12 held, under $0.20: still allowed (the guard reads each second)
        assert status == 200
        sim_posts = s.sim.report()["transcript_posts"]

        async def refused() -> Any:
            status, doc = await post(A)
            return doc if status == 402 else None

        doc = await until(refused)  # $0.24 held >= $0.20
        assert "Monthly spend cap of $0.20 for project 'alpha' reached" in doc["error"]
        assert s.sim.report()["transcript_posts"] == sim_posts  # refused here: nothing sent
        async with http.get(f"{s.url}/v2/transcript/{first['id']}", headers={"Authorization": A}) as r:
            assert r.status == 200  # reads still work
        assert (await post(B))[0] == 200  # another project: no cap
        assert metric(s.registry, "aai_gateway_spend_cap_refusals_total", scope="project") >= 1

        # Completed, each bills 60 s ($0.06) and releases its hold: $0.12 + what slipped in.
        async def allowed() -> Any:
            for job in (first, second):  # polled: the gateway learns they completed
                async with http.get(f"{s.url}/v2/transcript/{job['id']}", headers={"Authorization": A}) as r:
                    assert r.status == 200
            status, _ = await post(A, 1)
            return status == 200

        await until(allowed, within=10)


async def test_llm_spend_and_the_account_cap() -> None:
    config = {"projects": PROJECTS, "pricing": PRICING, "spend_cap_usd": 1.0}
    async with stack(SimConfig(), **config) as s, aiohttp.ClientSession() as http:

        async def chat(key: str) -> tuple[int, Any]:
            body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(
                s.url + "/v1/chat/completions", json=body, headers={"Authorization": key}
            ) as r:
                return r.status, await r.json()

        assert (await chat(B))[0] == 200  # tokens at $10,000 per million: well over $1

        async def refused() -> Any:
            status, doc = await chat(B)
            return doc if status == 402 else None

        doc = await until(refused)
        assert "for the account reached" in doc["error"]
        async with http.get(s.url + "/v1/models", headers={"Authorization": A}) as r:
            assert r.status == 200  # not billable: served


async def test_a_session_open_when_the_cap_is_reached_is_warned_and_ended() -> None:
    # Streaming at $36/h = $0.01 a second: alpha's $0.20 lasts 20 s of session.
    projects = [dict(PROJECTS[0], monthly_spend_cap_usd=0.02), PROJECTS[1]]
    async with stack(SimConfig(), projects=projects, pricing=PRICING) as s, aiohttp.ClientSession() as http:
        ws_url = s.url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
        started = time.monotonic()
        async with http.ws_connect(ws_url, headers={"Authorization": A}) as ws:
            seen = []
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    seen.append(json.loads(message.data))
                    if seen[-1]["type"] == "Begin":
                        asyncio.ensure_future(_talk(ws))
        took = time.monotonic() - started
        warnings = [m for m in seen if m["type"] == "Warning"]
        assert (
            warnings and "Monthly spend cap of $0.02 for project 'alpha' reached" in warnings[-1]["warning"]
        )
        assert seen[-1]["type"] == "Termination" and took < 10, (took, seen[-3:])
        assert s.sim.streaming.report()["left_open"] == 0
        assert metric(s.registry, "aai_gateway_spend_cap_sessions_ended_total") == 1
        async with http.get(ws_url, headers={"Authorization": A}) as r:  # a new one: refused
            assert r.status == 402 and "spend cap" in (await r.json())["error"]


async def _talk(ws: aiohttp.ClientWebSocketResponse) -> None:
    while not ws.closed:
        await ws.send_bytes(b"\0\0" * 800)
        await asyncio.sleep(0.05)


async def test_pass_through_keys_have_their_own_cap_and_it_resets_with_the_month(tmp_path: Path) -> None:
    now = [1_800_000_000.0]  # 2027-01-15
    config = Config.model_validate(
        {"key_monthly_spend_cap_usd": 1.0, "transcripts": {"data_dir": str(tmp_path)}}
    )
    ledger = SqliteLedger(tmp_path / "ledger.db")
    guard = SpendGuard(ledger, lambda: config, Metrics(__import__("prometheus_client").CollectorRegistry()),
                       wall=lambda: now[0])  # fmt: skip
    who = Identity("fp-of-the-key", "fp-of-the-key"[:16])
    await ledger.record(
        Event("e1", now[0], Line("", who.key, "llm", "gpt-5"), {"input_tokens": 1}, spend=1.5)
    )
    await guard.refresh()
    hit = guard.over(who)
    assert hit is not None and hit.scope == "key" and "this key" in hit.message()
    assert guard.over(Identity("other", "other")) is None
    now[0] += 20 * 86400  # February: a new month, nothing spent yet
    await guard.refresh()
    assert guard.over(who) is None
    await ledger.close()


async def test_a_project_made_through_the_admin_api_has_a_cap_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AAI_GATEWAY_ADMIN_TOKEN", "caps-admin")
    admin = {"Authorization": "Bearer caps-admin"}
    async with stack(SimConfig(), projects=PROJECTS, pricing=PRICING) as s, aiohttp.ClientSession() as http:
        async with http.post(s.url + "/admin/v1/projects", json={"name": "ci", "monthly_spend_cap_usd": 0.5},
                             headers=admin) as r:  # fmt: skip
            assert r.status == 201 and (await r.json())["monthly_spend_cap_usd"] == 0.5
        async with http.post(s.url + "/admin/v1/projects/ci/keys", json={"name": "k"}, headers=admin) as r:
            key = (await r.json())["key"]

        async def chat() -> tuple[int, Any]:
            body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(
                s.url + "/v1/chat/completions", json=body, headers={"Authorization": key}
            ) as r:
                return r.status, await r.json()

        assert (await chat())[0] == 200

        async def refused() -> Any:
            status, doc = await chat()
            return doc if status == 402 else None

        assert "for project 'ci'" in (await until(refused))["error"]
        for name, body, want in (("ci", {"monthly_spend_cap_usd": -1}, 400), ("ci", {}, 400),
                                 ("alpha", {"monthly_spend_cap_usd": 1}, 409),
                                 ("nope", {"monthly_spend_cap_usd": 1}, 404)):  # fmt: skip
            async with http.patch(f"{s.url}/admin/v1/projects/{name}", json=body, headers=admin) as r:
                assert r.status == want, (name, body, await r.text())
        async with http.patch(s.url + "/admin/v1/projects/ci", json={"monthly_spend_cap_usd": None},
                              headers=admin) as r:  # fmt: skip
            assert r.status == 200
        async with http.get(s.url + "/admin/v1/projects", headers=admin) as r:
            caps = {p["name"]: p["monthly_spend_cap_usd"] for p in (await r.json())["projects"]}
        assert caps == {"alpha": 0.2, "beta": None, "ci": None}

        async def allowed() -> Any:
            return (await chat())[0] == 200

        await until(allowed)
