"""Managed mode (issue 11): clients send gateway keys of a project; the account's AssemblyAI
key stays in the gateway and goes on every upstream call; a key that is not a gateway key is
a 401 before anything reaches upstream; a project's transcripts are its own; the real SDK
works with a gateway key; the account key shows nowhere a client or an operator looks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from gateway.app import LEDGER, TRANSCRIPTS, build_app
from gateway.config import ConfigError
from gateway.identity import key_digest, new_key
from gateway.ledger import utc_day
from gateway.sim.app import SimConfig
from tests.helpers import Running, gateway_config, stack
from tests.test_sdk import run_sdk

UPSTREAM = "sk-the-account-key-0123456789abcdef"  # what the simulator must see, and nobody else
A1, A2, B1 = new_key(), new_key(), new_key()
AUTH_ERROR = {"error": "Authentication error, API token missing/invalid"}


def projects(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": "alpha",
            "keys": [{"name": "one", "sha256": key_digest(A1)}, {"name": "two", "sha256": key_digest(A2)}],
        },
        {"name": "beta", "keys": [{"name": "one", "sha256": key_digest(B1)}]},
        {"name": "empty"},
        *extra,
    ]


@pytest.fixture(autouse=True)
def account_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    yield


@asynccontextmanager
async def managed(sim: SimConfig | None = None, **overrides: Any) -> AsyncIterator[Running]:
    async with stack(sim or SimConfig(job_seconds=0.2), projects=projects(), **overrides) as s:
        yield s


async def create(http: aiohttp.ClientSession, url: str, key: str) -> str:
    """A transcript made with ``key``: its id."""
    body = {"audio_url": "https://example.com/a.mp3"}
    async with http.post(url + "/v2/transcript", json=body, headers={"Authorization": key}) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


def upstream_keys(s: Running) -> set[str]:
    return {seen["headers"].get("Authorization", "") for seen in s.sim.seen}


async def test_refuses_to_start_without_the_account_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AAI_GATEWAY_UPSTREAM_KEY")
    with pytest.raises(ConfigError, match=r"\$AAI_GATEWAY_UPSTREAM_KEY"):
        build_app(gateway_config("http://127.0.0.1:9", projects=projects()))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"projects": projects(), "transcripts": {"data_dir": str(tmp_path)}}))
    env = {k: v for k, v in os.environ.items() if k != "AAI_GATEWAY_UPSTREAM_KEY"}
    done = subprocess.run(  # noqa: ASYNC221 (a process that exits at once)
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2 and "AAI_GATEWAY_UPSTREAM_KEY" in done.stderr.decode(), done.stderr


async def test_a_gateway_key_goes_upstream_as_the_account_key_bare_or_bearer() -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        for auth in (A1, f"Bearer {A2}"):
            async with http.post(
                s.url + "/v2/transcript",
                json={"audio_url": "https://example.com/a.mp3"},
                headers={"Authorization": auth},
            ) as r:
                assert r.status == 200, await r.text()
                assert UPSTREAM not in await r.text()
        async with http.post(
            s.url + "/v1/chat/completions",
            json={"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": B1},
        ) as r:
            assert r.status == 200, await r.text()
        async with http.get(s.url + "/v3/token?expires_in_seconds=60", headers={"Authorization": A1}) as r:
            assert r.status == 200, await r.text()
        assert upstream_keys(s) == {UPSTREAM}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "not-a-gateway-key"},
        {"Authorization": UPSTREAM},
        {"Authorization": "Bearer "},
    ],  # fmt: skip
    ids=["missing", "empty", "unknown", "the-account-key-itself", "empty-bearer"],
)
async def test_anything_but_a_gateway_key_is_a_401_and_nothing_reaches_upstream(
    headers: dict[str, str],
) -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        routes = [("POST", "/v2/transcript"), ("GET", "/v2/transcript/abc"), ("GET", "/v2/transcript"),
                  ("POST", "/v1/chat/completions"), ("GET", "/v3/token"), ("GET", "/v3/ws")]  # fmt: skip
        for method, path in routes:
            async with http.request(method, s.url + path, headers=headers, json={}) as r:
                assert r.status == 401, (method, path, r.status, await r.text())
                assert await r.json() == AUTH_ERROR
        assert s.sim.seen == []


async def test_a_project_sees_only_its_own_transcripts() -> None:
    async with managed(transcripts={"poll_refresh_s": 0.05}) as s, aiohttp.ClientSession() as http:
        job_id = await create(http, s.url, A1)
        for key, status in ((A1, 200), (A2, 200), (B1, 404)):  # A2: the same project, another key
            async with http.get(f"{s.url}/v2/transcript/{job_id}", headers={"Authorization": key}) as r:
                assert r.status == status, (key, await r.text())
            async with http.get(
                f"{s.url}/v2/transcript/{job_id}/sentences", headers={"Authorization": key}
            ) as r:
                assert (r.status == 404) == (status == 404), await r.text()
        async with http.delete(f"{s.url}/v2/transcript/{job_id}", headers={"Authorization": B1}) as r:
            assert r.status == 404 and await r.json() == {"error": "Transcript not found"}
        job = await s.app[TRANSCRIPTS].jobs.get(job_id)
        assert job is not None and job.key_fp == "project:alpha" and job.cred is None  # no key kept


async def test_a_temporary_token_belongs_to_the_project_that_asked_for_it() -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        async with http.get(s.url + "/v3/token?expires_in_seconds=60", headers={"Authorization": A1}) as r:
            token = (await r.json())["token"]
        ws_url = s.url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
        # ?token= (the npm SDK, browsers) and the token in Authorization (the Python SDK).
        for url, headers in ((ws_url + f"&token={token}", {}), (ws_url, {"Authorization": token})):
            async with http.ws_connect(url, headers=headers) as ws:
                assert json.loads((await ws.receive()).data)["type"] == "Begin"
                await ws.send_bytes(b"\0\0" * 1600)
                await ws.send_str(json.dumps({"type": "Terminate"}))
                async for _ in ws:
                    pass
        async with http.get(ws_url + "&token=made-up") as r:
            assert r.status == 401 and await r.json() == AUTH_ERROR
        today = utc_day(time.time())
        rows = await s.app[LEDGER].rows(today, today)
        usage = {(r.project, r.key, r.metric): r.value for r in rows if r.product == "streaming"}
        assert usage.get(("alpha", "alpha/token", "sessions")) == 2, usage
        ws_seen = [x for x in s.sim.seen if x["path"] == "/v3/ws"]
        assert len(ws_seen) == 2 and UPSTREAM not in json.dumps(ws_seen)  # the token went, not the key


async def test_the_real_sdk_with_a_gateway_key() -> None:
    async with managed(SimConfig(job_seconds=0.3), transcripts={"poll_refresh_s": 0.1}) as s:
        out = await run_sdk(s.url, key=A1)
        assert out["status"] == "completed" and out["text"].startswith("Simulated transcript")
        assert out["get_by_id"] and out["completion"] == "Simulated answer from gpt-5."
        assert upstream_keys(s) == {UPSTREAM}


async def test_the_account_key_shows_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    """Every answer (headers and bodies), every log line and the metrics of a whole run:
    the account key is in none of them."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with managed(transcripts={"poll_refresh_s": 0.05}) as s, aiohttp.ClientSession() as http:

        async def call(method: str, path: str, key: str, **kw: Any) -> Any:
            async with http.request(method, s.url + path, headers={"Authorization": key}, **kw) as r:
                seen.append(f"{r.status} {dict(r.headers)} {await r.text()}")
                return await r.json() if r.content_type == "application/json" else None

        doc = await call("POST", "/v2/transcript", A1, json={"audio_url": "https://example.com/a.mp3"})
        for _ in range(5):
            await call("GET", f"/v2/transcript/{doc['id']}", A1)
        await call("GET", "/v2/transcript", A1)
        await call("POST", "/v1/chat/completions", A1, json={"model": "gpt-5", "messages": []})
        await call("GET", "/v3/token?expires_in_seconds=60", B1)
        await call("GET", "/v2/transcript/x", "bad-key")
        async with http.get(s.url + "/metrics") as r:
            seen.append(await r.text())
        seen.append(generate_latest(s.registry).decode())
    seen.append(caplog.text)
    assert upstream_keys(s) == {UPSTREAM}
    assert not [text for text in seen if UPSTREAM in text]


def test_keys_new_prints_a_key_once_and_the_line_that_admits_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "new", "--project", "alpha", "--name", "ci"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    key = done.stdout.splitlines()[1].strip()
    assert key.startswith("aaigw_") and len(key) > 40
    assert f'{{name: "ci", sha256: "{key_digest(key)}"}}' in done.stdout
    snippet = textwrap.dedent(done.stdout.split("\n", 3)[3])
    assert "name: alpha" in snippet


async def test_an_upload_is_usable_only_by_its_project() -> None:
    async with managed(transcripts={"poll_refresh_s": 0.05}) as s, aiohttp.ClientSession() as http:
        async with http.post(
            s.url + "/v2/upload", data=b"RIFF" + b"\0" * 1024, headers={"Authorization": A1}
        ) as r:
            assert r.status == 200, await r.text()
            url = (await r.json())["upload_url"]
        posts_before = s.sim.report()["transcript_posts"]
        async with http.post(
            s.url + "/v2/transcript", json={"audio_url": url}, headers={"Authorization": B1}
        ) as r:
            assert r.status == 403 and await r.json() == {"error": "Cannot access uploaded file"}
        assert s.sim.report()["transcript_posts"] == posts_before  # refused here, nothing sent
        for key in (A1, A2):  # the project's keys may
            async with http.post(
                s.url + "/v2/transcript", json={"audio_url": url}, headers={"Authorization": key}
            ) as r:
                assert r.status == 200, await r.text()
        async with http.post(
            s.url + "/v2/transcript",
            json={"audio_url": "https://example.com/public.mp3"},
            headers={"Authorization": B1},
        ) as r:
            assert r.status == 200  # not an upload through the gateway: left to upstream


async def test_another_projects_transcript_id_in_an_llm_body_is_not_found() -> None:
    async with managed(transcripts={"poll_refresh_s": 0.05}) as s, aiohttp.ClientSession() as http:
        job_id = await create(http, s.url, A1)
        body = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}], "transcript_id": job_id}
        llm_before = len([x for x in s.sim.seen if x["path"].startswith("/v1")])
        async with http.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": B1}) as r:
            assert r.status == 404 and await r.json() == {"error": "Transcript not found"}
        assert len([x for x in s.sim.seen if x["path"].startswith("/v1")]) == llm_before
        async with http.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": A2}) as r:
            assert r.status == 200, await r.text()


async def test_the_transcript_list_shows_a_project_only_its_own() -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        made: dict[str, list[str]] = {A1: [], B1: []}
        for key in (A1, B1, A1):
            made[key].append(await create(http, s.url, key))
        for key, own in ((A2, made[A1]), (B1, made[B1])):
            async with http.get(s.url + "/v2/transcript?limit=50", headers={"Authorization": key}) as r:
                doc = await r.json()
            assert sorted(t["id"] for t in doc["transcripts"]) == sorted(own), doc
            assert doc["page_details"]["result_count"] == len(own)
