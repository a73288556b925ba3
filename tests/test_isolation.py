"""Managed mode's isolation matrix (issue 11): every product route × {own project, another
project, an unknown key, a revoked key}. Another project gets upstream's 404 (403 for an
upload) and nothing reaches upstream; an unknown or revoked key gets the 401 and nothing
reaches upstream; the project's own key works. The whole run's answers, log lines and
metrics are captured: the account's key is in none of them. And the real SDK streams with a
gateway key, and with a temporary token its project asked for."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import aiohttp
import pytest
from prometheus_client import generate_latest

from gateway.app import TRANSCRIPTS
from gateway.identity import key_digest, new_key
from gateway.sim.app import SimConfig
from tests.helpers import sdk_stream_script, stack

UPSTREAM = "sk-the-account-key-for-isolation-0123456789"
ADMIN = "isolation-admin-token"
A, B = new_key(), new_key()
AUTH_ERROR = {"error": "Authentication error, API token missing/invalid"}
NOT_FOUND = {"error": "Transcript not found"}


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    monkeypatch.setenv("AAI_GATEWAY_ADMIN_TOKEN", ADMIN)
    yield


PROJECTS = [
    {"name": "alpha", "keys": [{"name": "a", "sha256": key_digest(A)}]},
    {"name": "beta", "keys": [{"name": "b", "sha256": key_digest(B)}]},
]


class Route(NamedTuple):
    name: str
    method: str
    path: str  # {job}: alpha's transcript; {upstream}: its id upstream
    body: Any  # JSON; {upload}: alpha's upload_url
    own: int
    other: int  # 404 or 403: refused here, nothing sent


ROUTES = [
    Route("create-with-upload", "POST", "/v2/transcript", {"audio_url": "{upload}"}, 200, 403),
    Route("get", "GET", "/v2/transcript/{job}", None, 200, 404),
    *(Route(sub, "GET", f"/v2/transcript/{{job}}/{sub}", None, 200, 404)
      for sub in ("sentences", "paragraphs", "srt", "vtt", "word-search?words=simulated")),  # fmt: skip
    Route("chat-naming-the-job", "POST", "/v1/chat/completions",
          {"model": "gpt-5", "messages": [], "transcript_id": "{job}"}, 200, 404),
    Route("understanding-naming-the-job", "POST", "/v1/understanding", {"transcript_id": "{job}"}, 200, 404),
    # Upstream's own ids and paths outside upstream's routes: nobody's, in managed mode.
    Route("get-by-upstream-id", "GET", "/v2/transcript/{upstream}", None, 404, 404),
    Route("sub-by-upstream-id", "GET", "/v2/transcript/{upstream}/sentences", None, 404, 404),
    Route("chat-naming-upstream-id", "POST", "/v1/chat/completions",
          {"model": "gpt-5", "messages": [], "transcript_id": "{upstream}"}, 404, 404),
    # A path that would name another route without its slash: refused for anyone (400).
    Route("list-with-a-slash", "GET", "/v2/transcript/", None, 400, 400),
    Route("sub-with-a-slash", "GET", "/v2/transcript/{job}/sentences/", None, 400, 400),
    Route("post-to-a-job", "POST", "/v2/transcript/{job}", {}, 404, 404),
    # Routes that name nothing of a project's: every project may.
    Route("list", "GET", "/v2/transcript", None, 200, 200),
    Route("upload", "POST", "/v2/upload", b"RIFF" + b"\0" * 64, 200, 200),
    Route("models", "GET", "/v1/models", None, 200, 200),
    Route("token", "GET", "/v3/token?expires_in_seconds=60", None, 200, 200),
    Route("delete", "DELETE", "/v2/transcript/{job}", None, 200, 404),  # last: it ends the job
]  # fmt: skip


class Run:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.seen: list[str] = []  # every answer: status, headers, body

    async def call(self, method: str, path: str, key: str | None, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": key} if key is not None else {}
        kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            text = await r.text()
            self.seen.append(f"{r.status} {dict(r.headers)} {text}")
            try:
                return r.status, json.loads(text)
            except json.JSONDecodeError:
                return r.status, text


def fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    return value


async def test_every_route_for_every_kind_of_caller(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sim_cfg = SimConfig(job_seconds=0.1)
    async with stack(sim_cfg, projects=PROJECTS, transcripts={"poll_refresh_s": 0.05}) as s, \
            aiohttp.ClientSession() as http:  # fmt: skip
        run = Run(http, s.url)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with http.post(
            s.url + "/admin/v1/projects/alpha/keys", json={"name": "gone"}, headers=admin
        ) as r:
            revoked = await r.json()
        async with http.delete(s.url + f"/admin/v1/keys/{revoked['id']}", headers=admin) as r:
            assert r.status == 200
        unknown = new_key()

        status, up = await run.call("POST", "/v2/upload", A, b"RIFF" + b"\0" * 64)
        status, job = await run.call("POST", "/v2/transcript", A, {"audio_url": "https://x.test/a.mp3"})
        assert status == 200, job
        for _ in range(200):
            status, doc = await run.call("GET", f"/v2/transcript/{job['id']}", A)
            if doc["status"] == "completed":
                break
            await asyncio.sleep(0.02)
        assert doc["status"] == "completed", doc
        record = await s.app[TRANSCRIPTS].jobs.get(job["id"])
        names = {"job": job["id"], "upstream": record.upstream_id, "upload": up["upload_url"]}
        assert record.upstream_id != job["id"]

        table = []
        for route in ROUTES:
            path, body = fill(route.path, names), fill(route.body, names)
            row = {}
            nobody = 400 if route.own == 400 else 401
            for caller, key, want in (("unknown", unknown, nobody), ("revoked", revoked["key"], nobody),
                                      ("other", B, route.other), ("own", A, route.own)):  # fmt: skip
                before = len(s.sim.seen)
                status, doc = await run.call(route.method, path, key, body)
                row[caller] = status
                assert status == want, (route.name, caller, status, doc)
                if want == 401:
                    assert doc == AUTH_ERROR, (route.name, caller, doc)
                if want in (400, 401, 403, 404):
                    assert len(s.sim.seen) == before, f"{route.name} as {caller}: reached upstream"
                    assert isinstance(doc, dict) and isinstance(doc.get("error"), str), (route.name, doc)
                if caller == "other" and route.name == "list":
                    assert job["id"] not in json.dumps(doc), "another project's transcript in the list"
                if caller == "own" and route.name == "list":
                    assert job["id"] in json.dumps(doc)
                if route.other == 404 and caller == "other" and route.own == 200:
                    assert doc in (NOT_FOUND, {"error": "Not found"}) or "not found" in doc["error"].lower()
            table.append(f"{route.name:30} " + " ".join(f"{c}={v}" for c, v in row.items()))
        print("\n" + "\n".join(table))

        # Streaming: the key, or a token the project asked for; never the unknown or revoked.
        ws = s.url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
        for key, want in ((unknown, 401), (revoked["key"], 401)):
            async with http.get(ws, headers={"Authorization": key}) as r:
                assert r.status == want and await r.json() == AUTH_ERROR
                run.seen.append(f"{r.status} {dict(r.headers)} {await r.text()}")
        for headers in ({"Authorization": A}, {"Authorization": B}):
            async with http.ws_connect(ws, headers=headers) as conn:
                begin = await conn.receive()
                run.seen.append(begin.data)
                await conn.send_str(json.dumps({"type": "Terminate"}))
                run.seen.extend([m.data async for m in conn])

        for path in ("/metrics", "/readyz", "/admin/v1/projects", "/admin/v1/projects/alpha/keys"):
            async with http.get(s.url + path, headers=admin) as r:
                run.seen.append(await r.text())
        run.seen.append(generate_latest(s.registry).decode())
    run.seen.append(caplog.text)
    assert {x["headers"].get("Authorization") for x in s.sim.seen if x["path"] != "/v3/ws"} == {UPSTREAM}
    assert not [text for text in run.seen if UPSTREAM in text], "the account key showed"
    assert not [text for text in run.seen if A in text or B in text], "a gateway key was echoed"


SDK_SCRIPT = sdk_stream_script(
    """
    host, key, token = sys.argv[1], sys.argv[2], sys.argv[3]
    out = {"with_key": stream(StreamingClientOptions(api_key=key, api_host=host))}
    out["with_token"] = stream(StreamingClientOptions(token=token, api_host=host))
    print("RESULT " + json.dumps(out))
    """
)


async def test_the_sdk_streams_with_a_gateway_key_and_with_its_projects_token() -> None:
    async with stack(SimConfig(), projects=PROJECTS) as s, aiohttp.ClientSession() as http:
        host = s.url.replace("http://", "ws://")  # as tests/test_streaming.py gives it
        # (The SDK asks for a token over https only: tests/test_tls.py drives that; here, plain.)
        async with http.get(s.url + "/v3/token?expires_in_seconds=60", headers={"Authorization": A}) as r:
            token = (await r.json())["token"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SDK_SCRIPT, host, A, token, env=dict(os.environ),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        lines = [line for line in stdout.decode().splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, stderr.decode()[-3000:]
        out = json.loads(lines[-1][len("RESULT ") :])
        for how in ("with_key", "with_token"):
            assert out[how][0] == "Begin" and out[how][-1] == "Termination", (how, out[how])
            assert not [e for e in out[how] if e.startswith("Error")], out[how]
        sessions = [x for x in s.sim.seen if x["path"] == "/v3/ws"]
        assert len(sessions) == 2
        assert sessions[0]["headers"].get("Authorization") == UPSTREAM  # the key: swapped for the account's
        assert UPSTREAM not in json.dumps(sessions[1])  # the token: sent as it came
        assert s.sim.streaming.report()["left_open"] == 0


async def test_each_projects_webhooks_carry_its_own_settings_only() -> None:
    """Two projects, each with its own webhook URL and secret header: each receiver hears its
    own transcript only, with its own header, and never the account key."""
    from tests.test_transcripts import wait_for
    from tests.test_webhooks import FAST_HOOKS, Hook, hook_server, with_public_url

    hooks = {A: Hook(), B: Hook()}
    async with (
        hook_server(hooks[A]) as url_a,
        hook_server(hooks[B]) as url_b,
        with_public_url(SimConfig(job_seconds=0.2), projects=PROJECTS, **FAST_HOOKS) as (_, url, _),
        aiohttp.ClientSession() as http,
    ):
        jobs = {}
        for key, hook_url, secret in ((A, url_a, "secret-a"), (B, url_b, "secret-b")):
            body = {"audio_url": "https://x.test/a.mp3", "webhook_url": hook_url + f"?customer_id={secret}",
                    "webhook_auth_header_name": "X-Hook", "webhook_auth_header_value": secret}  # fmt: skip
            async with http.post(url + "/v2/transcript", json=body, headers={"Authorization": key}) as r:
                assert r.status == 200
                jobs[key] = (await r.json())["id"]

        async def both_called() -> bool:
            return all(hook.calls for hook in hooks.values())

        await wait_for(both_called)
        for key, secret in ((A, "secret-a"), (B, "secret-b")):
            (call,) = hooks[key].calls
            assert call["body"] == {"transcript_id": jobs[key], "status": "completed"}
            assert call["headers"]["X-Hook"] == secret and call["query"] == {"customer_id": secret}
            assert (
                UPSTREAM not in json.dumps(call) and A not in json.dumps(call) and B not in json.dumps(call)
            )
