"""The ledger is exact (issue 12): transcripts, streaming sessions and LLM calls of two
projects and several customers go through two gateway instances sharing Redis, with random
durations, channels and token counts; every transcript's end is seen by both instances. The
ledger equals the simulator's own record of what it billed, per project and customer:
seconds, sessions and tokens, not one off."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.app import LEDGER
from gateway.identity import key_digest, new_key
from gateway.ledger import utc_day
from gateway.sim.app import SimConfig
from tests.conftest import REDIS_URL
from tests.helpers import gateway_config, running_gateway, running_sim

A, B = new_key(), new_key()
KEYS = {"alpha": A, "beta": B}
PROJECTS = [
    {"name": "alpha", "keys": [{"name": "a", "sha256": key_digest(A)}]},
    {"name": "beta", "keys": [{"name": "b", "sha256": key_digest(B)}]},
]
CUSTOMERS = ["", "acme", "globex"]


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", "sk-account-key-exactness-0000")
    yield


async def test_two_instances_record_exactly_what_upstream_billed() -> None:
    rng = random.Random(1201)
    prefix = "exact" + uuid.uuid4().hex[:8]
    async with running_sim(SimConfig(job_seconds=0.2)) as (sim, sim_url):
        config = gateway_config(
            sim_url, projects=PROJECTS, redis={"url": REDIS_URL, "key_prefix": prefix},
            transcripts={"poll_refresh_s": 0.05},
        )  # fmt: skip
        async with (
            running_gateway(config) as (one, app, _),
            running_gateway(config) as (two, _, _),
            aiohttp.ClientSession() as http,
        ):
            urls = [one, two]
            want: dict[tuple[str, str, str], float] = defaultdict(float)  # (project, customer, metric)

            def headers(project: str, customer: str) -> dict[str, str]:
                out = {"Authorization": KEYS[project]}
                if customer:
                    out["X-AAI-Customer"] = customer
                return out

            # Transcripts: made on either instance, polled on both until each has seen the end.
            jobs: list[tuple[str, str, str, str]] = []  # id, project, customer, audio_url
            for n in range(12):
                project, customer = rng.choice(["alpha", "beta"]), rng.choice(CUSTOMERS)
                channels = rng.choice([1, 2])
                audio_url = f"https://x.test/{n}.mp3?sim_audio={rng.randint(1, 5000)}&sim_channels={channels}"
                body: dict[str, Any] = {"audio_url": audio_url, "speech_models": ["universal-3-pro"]}
                if channels > 1:
                    body["multichannel"] = True
                async with http.post(rng.choice(urls) + "/v2/transcript", json=body,
                                     headers=headers(project, customer)) as r:  # fmt: skip
                    assert r.status == 200, await r.text()
                    jobs.append(((await r.json())["id"], project, customer, audio_url))

            async def done(url: str, job_id: str, project: str) -> None:
                deadline = time.monotonic() + 20
                while True:
                    async with http.get(f"{url}/v2/transcript/{job_id}", headers=headers(project, "")) as r:
                        if (await r.json())["status"] == "completed":
                            return
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(done(url, j, p) for j, p, _, _ in jobs for url in urls))

            # LLM calls, JSON and streamed, on either instance.
            async def chat(n: int) -> None:
                project, customer = rng.choice(["alpha", "beta"]), rng.choice(CUSTOMERS)
                body = {"model": rng.choice(["gpt-5", "claude-sonnet-4-6"]), "stream": n % 2 == 0,
                        "messages": [{"role": "user", "content": f"question {n}"}]}  # fmt: skip
                async with http.post(rng.choice(urls) + "/v1/chat/completions", json=body,
                                     headers=headers(project, customer)) as r:  # fmt: skip
                    assert r.status == 200, await r.text()
                    await r.read()
                    chats.append((project, customer))

            chats: list[tuple[str, str]] = []
            for n in range(10):
                await chat(n)

            # Streaming sessions of random lengths, on either instance.
            async def session(n: int) -> None:
                project, customer = rng.choice(["alpha", "beta"]), rng.choice(CUSTOMERS)
                url = (
                    rng.choice(urls).replace("http", "ws")
                    + f"/v3/ws?sample_rate=16000&tag={project}.{customer}.{n}"
                )
                async with http.ws_connect(url, headers=headers(project, customer)) as ws:
                    await ws.receive()  # Begin
                    for _ in range(rng.randint(5, 25)):
                        await ws.send_bytes(b"\0\0" * 1600)  # 0.1 s of audio
                        await asyncio.sleep(0.1)
                    await ws.send_str('{"type": "Terminate"}')
                    async for _ in ws:
                        pass

            await asyncio.gather(*(session(n) for n in range(6)))

            # What upstream billed, per project and customer.
            for _, project, customer, audio_url in jobs:
                (billed,) = [b for b in sim.transcripts.billed if b["body"]["audio_url"] == audio_url]
                want[(project, customer, "audio_seconds:transcription")] += billed["seconds"]
            assert len(sim.llm_billed) == len(chats)
            for billed, (project, customer) in zip(sim.llm_billed, chats, strict=True):
                assert billed["customer"] == customer
                want[(project, customer, "input_tokens:llm")] += billed["input_tokens"]
                want[(project, customer, "output_tokens:llm")] += billed["output_tokens"]
            assert len(sim.streaming.billed) == 6
            for billed in sim.streaming.billed:
                project, customer, _ = billed["query"]["tag"].split(".")
                want[(project, customer, "session_seconds:streaming")] += billed["session_duration_seconds"]
                want[(project, customer, "audio_seconds:streaming")] += billed["audio_duration_seconds"]
                want[(project, customer, "sessions:streaming")] += 1

            today = utc_day(time.time())

            async def ledger_now() -> dict[tuple[str, str, str], float]:
                got: dict[tuple[str, str, str], float] = defaultdict(float)
                for row in await app[LEDGER].rows(today, today):
                    name = f"{row.metric}:{row.product}"
                    if name in {k[2] for k in want}:
                        got[(row.project, row.customer, name)] += row.value
                return got

            deadline = time.monotonic() + 5  # the last sessions' records land as they close
            while True:
                got = await ledger_now()
                if got == want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert dict(got) == dict(want)
            assert sim.recorder.violations == []
