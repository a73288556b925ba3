"""Pre-recorded usage (issue 12): a completed transcript is recorded once, as upstream bills
it: audio seconds × channels on the model upstream ran, one line per billed add-on, by
project, key and customer; a failed one costs nothing. The ledger equals the simulator's own
record of what it billed."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.app import LEDGER
from gateway.identity import key_digest, new_key
from gateway.ledger import utc_day
from gateway.sim.app import SimConfig
from tests.helpers import stack

UPSTREAM = "sk-account-key-for-usage-tests-000000"
A, B = new_key(), new_key()
PROJECTS = [
    {"name": "alpha", "keys": [{"name": "a", "sha256": key_digest(A)}]},
    {"name": "beta", "keys": [{"name": "b", "sha256": key_digest(B)}]},
]


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    monkeypatch.setenv("AAI_GATEWAY_ADMIN_TOKEN", "usage-admin")
    yield


async def test_the_ledger_equals_what_upstream_billed_per_project_model_and_customer() -> None:
    rng = random.Random(20261201)
    async with (
        stack(SimConfig(job_seconds=0.05), projects=PROJECTS, transcripts={"poll_refresh_s": 0.05}) as s,
        aiohttp.ClientSession() as http,
    ):
        made: dict[str, tuple[str, str, dict[str, Any]]] = {}  # job id -> project, customer, body
        for n in range(24):
            key, project = (A, "alpha") if n % 2 else (B, "beta")
            audio, channels = rng.randint(1, 7200), rng.choice([1, 2, 3])
            body: dict[str, Any] = {
                "audio_url": f"https://x.test/{n}.mp3?sim_audio={audio}&sim_channels={channels}",
                "speech_models": [rng.choice(["universal-3-pro", "universal-2"])],
            }
            if channels > 1:
                body["multichannel"] = True
            if rng.random() < 0.5:
                body["speaker_labels"] = True
            headers = {"Authorization": key}
            customer = ""
            if n % 3 == 0:
                customer = f"cust-{n % 4}"
                headers["X-AAI-Customer"] = customer
            elif n % 3 == 1:
                customer = f"hook-{n % 5}"
                body["webhook_url"] = f"https://hooks.example.com/done?customer_id={customer}"
            if n == 5:
                body["audio_url"] += "&sim_fail=1"  # fails: costs nothing
            async with http.post(s.url + "/v2/transcript", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()
                made[(await r.json())["id"]] = (project, customer, body)

        async def poll(job_id: str, key: str) -> None:
            deadline = time.monotonic() + 20
            while True:
                async with http.get(f"{s.url}/v2/transcript/{job_id}", headers={"Authorization": key}) as r:
                    status = (await r.json())["status"]
                if status in ("completed", "error"):
                    return
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)

        await asyncio.gather(*(poll(j, A if p == "alpha" else B) for j, (p, _, _) in made.items()))
        # Seen again (a second poll, as a webhook or another instance would): counted once.
        await asyncio.gather(*(poll(j, A if p == "alpha" else B) for j, (p, _, _) in made.items()))

        billed = s.sim.transcripts.billed
        assert len(billed) == 23  # the failed one was not
        want: dict[tuple[str, str, str], float] = defaultdict(float)
        for project, customer, body in made.values():
            done = [b for b in billed if b["body"]["audio_url"] == body["audio_url"]]
            if not done:
                continue
            (record,) = done
            want[(project, record["model"], customer)] += record["seconds"]
            if body.get("speaker_labels"):
                want[(project, "speaker_labels", customer)] += record["seconds"]
        today = utc_day(time.time())
        rows = await s.app[LEDGER].rows(today, today)
        got: dict[tuple[str, str, str], float] = defaultdict(float)
        counted: dict[str, float] = defaultdict(float)
        for row in rows:
            assert row.product == "transcription"
            if row.metric == "audio_seconds":
                got[(row.project, row.model, row.customer)] += row.value
            elif row.metric == "transcripts":
                counted[row.project] += row.value
        assert dict(got) == dict(want)
        assert sum(counted.values()) == 23
        assert {row.key for row in rows} == {"alpha/a", "beta/b"}

        # The same through the admin API's report, priced.
        admin = {"Authorization": "Bearer usage-admin"}
        async with http.get(s.url + "/admin/v1/usage?group_by=project", headers=admin) as r:
            assert r.status == 200, await r.text()
            report = await r.json()
        per_project = {row["project"]: row for row in report["rows"]}
        for project in ("alpha", "beta"):
            audio = sum(v for (p, m, _), v in want.items() if p == project and m != "speaker_labels")
            assert per_project[project]["audio_seconds"] == pytest.approx(audio)
            assert per_project[project]["cost_usd"] > 0
        async with http.get(s.url + "/admin/v1/usage?format=csv", headers=admin) as r:
            assert r.status == 200 and (await r.text()).startswith("project,")


async def test_a_transcript_ended_by_upstreams_webhook_is_billed_its_full_duration() -> None:
    """Upstream's webhook says only ``completed``: the gateway reads the duration upstream."""
    from tests.test_webhooks import FAST_HOOKS, with_public_url

    async with (
        with_public_url(SimConfig(job_seconds=0.1), projects=PROJECTS, **FAST_HOOKS) as (sim, url, (app, _)),
        aiohttp.ClientSession() as http,
    ):
        body = {"audio_url": "https://x.test/a.mp3?sim_audio=321", "speech_models": ["universal-2"]}
        async with http.post(url + "/v2/transcript", json=body, headers={"Authorization": A}) as r:
            assert r.status == 200
        today = utc_day(time.time())
        deadline = time.monotonic() + 10
        while not (rows := await app[LEDGER].rows(today, today)):  # no poll: the webhook ends it
            assert time.monotonic() < deadline, "the webhook-ended transcript was not billed"
            await asyncio.sleep(0.05)
        assert {(r.model, r.metric): r.value for r in rows} == {
            ("universal-2", "audio_seconds"): 321.0, ("universal-2", "transcripts"): 1.0,
        }  # fmt: skip
        assert sim.transcripts.webhook_log, "upstream's webhook was not what ended it"
