"""The simulator's fault hook (``faults`` in its config), which the fault suite relies on: each
kind misbehaves as its name says, on every ``every``-th matching request, the kinds in turn,
and only as many times as asked; the report lists each one (and an LLM answer's bill that was
cut off)."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from gateway.sim.app import SimConfig
from tests.helpers import running_sim

KEY = {"Authorization": "k"}
CHAT = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}


async def test_each_kind_in_turn_every_nth_request_then_none() -> None:
    plan = {
        "kinds": {"5xx": 1, "reset": 1, "hang": 1, "slow": 1, "cut": 1},
        "every": 2,
        "paths": ["/v1/chat"],
        "hang_s": 0.3,
        "slow_s": 0.4,
    }
    async with running_sim(SimConfig(llm_limit=100, faults=plan)) as (sim, url):
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            seen: list[str] = []
            loop = asyncio.get_running_loop()
            for _ in range(12):
                began = loop.time()
                try:
                    async with http.post(url + "/v1/chat/completions", json=CHAT, headers=KEY) as r:
                        body = await r.read()
                        took = loop.time() - began
                        seen.append(f"{r.status}{' slow' if took >= 0.3 else ''}")
                        json.loads(body)
                except aiohttp.ClientPayloadError:
                    seen.append("cut")
                except aiohttp.ServerDisconnectedError:
                    seen.append(f"gone{' late' if loop.time() - began >= 0.25 else ''}")
                except aiohttp.ClientOSError:  # the RST
                    seen.append("reset")
            # Another path is never touched.
            async with http.get(url + "/v2/transcript/x", headers=KEY) as r:
                assert r.status == 404
    assert (
        seen
        == ["200", "503", "200", "reset", "200", "gone late", "200", "200 slow", "200", "cut"] + ["200"] * 2
    ), seen
    applied = sim.report()["faults"]
    assert [f["kind"] for f in applied] == ["5xx", "reset", "hang", "slow", "cut"]
    # The cut answer was billed upstream (the work ran): its bill is named; nothing else is.
    assert applied[-1]["cut_bills"] == [len(sim.llm_billed) - 3]
    assert all(f["cut_bills"] == [] for f in applied[:-1])
    # 5xx, reset and hang ran nothing: 12 asked, 3 never reached the handler.
    assert len(sim.llm_billed) == 9


async def test_faults_set_at_run_time_keep_the_rest_of_the_run() -> None:
    async with running_sim(SimConfig()) as (sim, url), aiohttp.ClientSession() as http:
        doc = {"audio_url": "https://example.com/a.mp3"}
        async with http.post(url + "/v2/transcript", json=doc, headers=KEY) as r:
            assert r.status == 200
        change = {"faults": {"kinds": {"5xx": 1}, "paths": ["/v2/transcript"]}}
        async with http.post(url + "/_sim/config", json=change) as r:
            assert r.status == 200
        async with http.post(url + "/v2/transcript", json=doc, headers=KEY) as r:
            assert r.status == 503 and (await r.json())["error"]
        async with http.post(url + "/v2/transcript", json=doc, headers=KEY) as r:
            assert r.status == 200
        assert sim.transcripts.submitted == 2  # the first job is still there; the 503 made none
        assert [f["kind"] for f in sim.report()["faults"]] == ["5xx"]
