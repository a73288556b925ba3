"""The admin API (issue 11): projects and gateway keys made at runtime, kept in the store,
seen by every instance; a revoked key refused everywhere within a second while its admitted
work finishes; caps; the config file's projects and keys listed but not changed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import build_app
from gateway.identity import key_digest, new_key
from gateway.sim.app import SimConfig
from tests.conftest import REDIS_URL
from tests.helpers import gateway_config, running_gateway, running_sim

UPSTREAM = "sk-the-account-key-0123456789abcdef"
ADMIN = "admin-token-for-tests"
FILE_KEY = new_key()
BEARER = {"Authorization": f"Bearer {ADMIN}"}
AUTH_ERROR = {"error": "Authentication error, API token missing/invalid"}


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    monkeypatch.setenv("AAI_GATEWAY_ADMIN_TOKEN", ADMIN)
    yield


def file_projects() -> list[dict[str, Any]]:
    return [{"name": "production", "keys": [{"name": "backend", "sha256": key_digest(FILE_KEY)}]}]


@asynccontextmanager
async def gateways(
    count: int = 1, *, shared: bool = False, data_dir: Path | None = None, **over: Any
) -> AsyncIterator[tuple[Any, list[str]]]:
    """The simulator and ``count`` managed gateways in this process; ``shared``: on the real
    Redis under a prefix of the test's own, else each on the embedded store."""
    over.setdefault("projects", file_projects())
    if shared:
        over["redis"] = {"url": REDIS_URL, "key_prefix": "adm" + uuid.uuid4().hex[:8]}
    # Jobs are refreshed from upstream every 0.5 s (the default, 10 s, is a whole test's wait).
    over["transcripts"] = {"poll_refresh_s": 0.5}
    if data_dir is not None:
        over["transcripts"]["data_dir"] = str(data_dir)
    async with running_sim(SimConfig(job_seconds=0.3)) as (sim, sim_url):
        config = gateway_config(sim_url, **over)
        async with _many(config, count) as urls:
            yield sim, urls


@asynccontextmanager
async def _many(config: Any, count: int) -> AsyncIterator[list[str]]:
    if count == 0:
        yield []
        return
    async with running_gateway(config) as (url, _, _), _many(config, count - 1) as rest:
        yield [url, *rest]


async def call(
    http: aiohttp.ClientSession, method: str, url: str, *, auth: str | None = ADMIN, **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {auth}"} if auth is not None else {}
    async with http.request(method, url, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


async def transcribe(http: aiohttp.ClientSession, url: str, key: str) -> tuple[int, Any]:
    return await call(
        http, "POST", url + "/v2/transcript", auth=key, json={"audio_url": "https://x.test/a.mp3"}
    )


async def test_admin_routes_need_the_token_and_do_not_exist_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with gateways() as (_, [url]), aiohttp.ClientSession() as http:
        assert (await call(http, "GET", url + "/admin/v1/projects", auth=None))[0] == 401
        status, doc = await call(http, "GET", url + "/admin/v1/projects", auth="wrong")
        assert status == 403 and doc == {"error": "Admin token invalid"}
        assert (await call(http, "POST", url + "/admin/v1/projects", auth=FILE_KEY, json={"name": "x"}))[
            0
        ] == 403
    monkeypatch.delenv("AAI_GATEWAY_ADMIN_TOKEN")
    async with gateways() as (_, [url]), aiohttp.ClientSession() as http:
        status, doc = await call(http, "GET", url + "/admin/v1/projects")
        assert status == 404 and "error" in doc


async def test_projects_and_keys_at_runtime_on_the_embedded_store(tmp_path: Path) -> None:
    async with gateways(data_dir=tmp_path) as (sim, [url]), aiohttp.ClientSession() as http:
        status, doc = await call(http, "POST", url + "/admin/v1/projects", json={"name": "ci"})
        assert status == 201 and doc["name"] == "ci" and doc["source"] == "api"
        for body, want in (({"name": "ci"}, 409), ({"name": "production"}, 409), ({"name": "Bad_Name"}, 400),
                           ({}, 400), ([], 400)):  # fmt: skip
            status, doc = await call(http, "POST", url + "/admin/v1/projects", json=body)
            assert status == want and isinstance(doc["error"], str), (body, status, doc)
        status, doc = await call(http, "POST", url + "/admin/v1/projects", data=b"{not json")
        assert status == 400 and "JSON" in doc["error"]

        status, made = await call(http, "POST", url + "/admin/v1/projects/ci/keys", json={"name": "runner"})
        assert status == 201 and made["project"] == "ci" and made["name"] == "runner"
        key = made["key"]
        assert key.startswith("aaigw_") and made["id"].startswith("key_")
        assert (await call(http, "POST", url + "/admin/v1/projects/ci/keys", json={"name": "runner"}))[
            0
        ] == 409
        assert (await call(http, "POST", url + "/admin/v1/projects/nope/keys", json={"name": "x"}))[0] == 404

        status, job = await transcribe(http, url, key)
        assert status == 200, job
        assert {s["headers"].get("Authorization") for s in sim.seen} == {UPSTREAM}
        # The key's project owns the job: the file project's key cannot see it.
        assert (await call(http, "GET", url + f"/v2/transcript/{job['id']}", auth=FILE_KEY))[0] == 404
        assert (await call(http, "GET", url + f"/v2/transcript/{job['id']}", auth=key))[0] == 200

        status, listed = await call(http, "GET", url + "/admin/v1/projects/ci/keys")
        assert status == 200 and len(listed["keys"]) == 1
        entry = listed["keys"][0]
        assert entry["id"] == made["id"] and entry["last_used"] is not None and entry["source"] == "api"
        assert key not in str(listed) and key_digest(key) not in str(listed)
        status, listed = await call(http, "GET", url + "/admin/v1/projects/production/keys")
        assert [(k["name"], k["source"]) for k in listed["keys"]] == [("backend", "config")]
        file_id = listed["keys"][0]["id"]
        assert (await call(http, "DELETE", url + f"/admin/v1/keys/{file_id}"))[0] == 409
        status, projects = await call(http, "GET", url + "/admin/v1/projects")
        assert [(p["name"], p["source"], p["keys"]) for p in projects["projects"]] == [
            ("ci", "api", 1), ("production", "config", 1),
        ]  # fmt: skip

        status, doc = await call(http, "DELETE", url + f"/admin/v1/keys/{made['id']}")
        assert status == 200 and doc["revoked"] is True
        assert await transcribe(http, url, key) == (401, AUTH_ERROR)
        assert (await call(http, "DELETE", url + f"/admin/v1/keys/{made['id']}"))[0] == 404
        assert (await call(http, "DELETE", url + "/admin/v1/projects/production"))[0] == 409

    # A restart keeps what was made: the project, and a key made before it.
    async with gateways(data_dir=tmp_path) as (_, [url]), aiohttp.ClientSession() as http:
        status, made = await call(http, "POST", url + "/admin/v1/projects/ci/keys", json={"name": "again"})
        assert status == 201
    async with gateways(data_dir=tmp_path) as (_, [url]), aiohttp.ClientSession() as http:
        assert (await transcribe(http, url, made["key"]))[0] == 200
        status, doc = await call(http, "DELETE", url + "/admin/v1/projects/ci")
        assert status == 200 and doc["keys_revoked"] == [made["id"]]
        assert await transcribe(http, url, made["key"]) == (401, AUTH_ERROR)
        status, doc = await call(http, "POST", url + "/admin/v1/projects", json={"name": "ci"})
        assert status == 409 and "deleted project" in doc["error"]  # its transcripts keep their owner


async def test_caps_count_the_files_and_the_apis_together() -> None:
    async with gateways(projects_limit="payg", keys_limit=2) as (_, [url]), aiohttp.ClientSession() as http:
        assert (await call(http, "POST", url + "/admin/v1/projects", json={"name": "second"}))[0] == 201
        status, doc = await call(http, "POST", url + "/admin/v1/projects", json={"name": "third"})
        assert status == 403 and "projects_limit (2)" in doc["error"]
        assert (await call(http, "POST", url + "/admin/v1/projects/second/keys", json={"name": "k"}))[
            0
        ] == 201
        status, doc = await call(http, "POST", url + "/admin/v1/projects/second/keys", json={"name": "k2"})
        assert status == 403 and "keys_limit (2)" in doc["error"]


async def test_managed_with_no_projects_in_the_file() -> None:
    async with gateways(projects=[], managed=True) as (_, [url]), aiohttp.ClientSession() as http:
        assert await transcribe(http, url, FILE_KEY) == (401, AUTH_ERROR)
        assert (await call(http, "POST", url + "/admin/v1/projects", json={"name": "only"}))[0] == 201
        _, made = await call(http, "POST", url + "/admin/v1/projects/only/keys", json={"name": "k"})
        assert (await transcribe(http, url, made["key"]))[0] == 200


async def test_pass_through_mode_has_no_projects() -> None:
    async with gateways(projects=[]) as (_, [url]), aiohttp.ClientSession() as http:
        status, doc = await call(http, "GET", url + "/admin/v1/projects")
        assert status == 404 and "error" in doc


async def test_a_revoked_key_is_refused_by_every_instance_within_a_second_while_its_work_finishes() -> None:
    async with gateways(2, shared=True) as (sim, [one, two]), aiohttp.ClientSession() as http:
        await call(http, "POST", one + "/admin/v1/projects", json={"name": "ci"})
        _, made = await call(http, "POST", one + "/admin/v1/projects/ci/keys", json={"name": "a"})
        _, other = await call(http, "POST", one + "/admin/v1/projects/ci/keys", json={"name": "b"})
        key = made["key"]
        deadline = time.monotonic() + 1.0
        while (await transcribe(http, two, key))[0] != 200:  # made on one, known to two
            assert time.monotonic() < deadline, "a new key was not known to the other instance within 1 s"
            await asyncio.sleep(0.02)
        status, job = await transcribe(http, two, key)
        assert status == 200

        status, _ = await call(http, "DELETE", one + f"/admin/v1/keys/{made['id']}")
        assert status == 200
        revoked_at = time.monotonic()
        while (await transcribe(http, two, key))[0] != 401:
            assert time.monotonic() - revoked_at < 1.0, "the other instance still took the key after 1 s"
            await asyncio.sleep(0.02)
        took = time.monotonic() - revoked_at
        print(f"\nrevocation seen by the second instance after {took * 1000:.0f} ms")
        # The job it submitted before runs to the end; the project's other key reads it.
        deadline = time.monotonic() + 10
        while True:
            status, doc = await call(http, "GET", two + f"/v2/transcript/{job['id']}", auth=other["key"])
            assert status == 200, doc
            if doc["status"] == "completed":
                break
            assert time.monotonic() < deadline, doc
            await asyncio.sleep(0.1)
        # And "last used" is written down for the admin API of either instance.
        _, listed = await call(http, "GET", two + "/admin/v1/projects/ci/keys")
        assert [k["name"] for k in listed["keys"]] == ["b"]


async def test_the_embedded_directory_is_a_file_readable_by_its_owner_only(tmp_path: Path) -> None:
    async with gateways(data_dir=tmp_path) as (_, [url]), aiohttp.ClientSession() as http:
        assert (await call(http, "POST", url + "/admin/v1/projects", json={"name": "ci"}))[0] == 201
    assert (tmp_path / "directory.db").stat().st_mode & 0o777 == 0o600


def test_build_app_needs_no_directory_in_pass_through(tmp_path: Path) -> None:
    build_app(gateway_config("http://127.0.0.1:9", transcripts={"data_dir": str(tmp_path)}))
    assert not (tmp_path / "directory.db").exists()


class FlakyDirectory:
    """A directory whose store is away: every read fails."""

    kind = "flaky"

    async def version(self) -> int:
        from gateway.errors import StoreUnavailable

        raise StoreUnavailable("redis away")


async def test_the_ring_keeps_its_last_view_while_the_directory_is_away(tmp_path: Path) -> None:
    from gateway.directory import SqliteDirectory
    from gateway.identity import KeyRing

    config = gateway_config(
        "http://127.0.0.1:9", projects=file_projects(), transcripts={"data_dir": str(tmp_path)}
    )
    directory = SqliteDirectory(tmp_path / "d.db")
    await directory.add_project("ci", cap=None)
    key = new_key()
    await directory.add_key("ci", "k", key_digest(key), cap=None, known=False)
    ring = KeyRing(config, directory)
    assert ring.find(key) is None  # not read yet
    assert await ring.refresh() and ring.find(key) is not None
    assert not await ring.refresh()  # the version did not move: nothing re-read
    ring.directory = FlakyDirectory()  # type: ignore[assignment]
    task = asyncio.create_task(ring.run())
    await asyncio.sleep(0)
    assert ring.find(key) is not None and ring.find(FILE_KEY) is not None
    task.cancel()
    # A runtime key of a project that left the config file stops working with it.
    await directory.add_key("production", "extra", key_digest(other := new_key()), cap=None, known=True)
    ring.directory = directory
    await ring.refresh()
    assert ring.find(other) is not None
    ring.use_config(gateway_config("http://127.0.0.1:9", projects=[{"name": "elsewhere"}]))
    assert ring.find(other) is None and ring.find(FILE_KEY) is None
    await directory.close()


async def _everything_in(client: Any, prefix: str) -> str:
    """Every key under ``prefix`` and its value, whatever its type, as one text."""
    out = []
    async for key in client.scan_iter(match=f"{prefix}:*"):
        kind = (await client.type(key)).decode()
        read = {
            "string": client.get, "hash": client.hgetall, "list": lambda k: client.lrange(k, 0, -1),
            "set": client.smembers, "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: client.xrange(k),
        }[kind]  # fmt: skip
        out.append(f"{key!r} {await read(key)!r}")
    return "\n".join(out)


@pytest.mark.parametrize("shared", [False, True], ids=["embedded", "redis"])
async def test_the_account_key_is_nowhere_in_the_store(shared: bool, tmp_path: Path) -> None:
    """A run that touches everything the store keeps (jobs, an upload, a token, usage,
    runtime projects and keys): neither the account key nor a gateway key is in it."""
    from gateway.admission.redis_store import make_client

    prefix = "sec" + uuid.uuid4().hex[:8]
    over: dict[str, Any] = {"redis": {"url": REDIS_URL, "key_prefix": prefix}} if shared else {}
    async with running_sim(SimConfig(job_seconds=0.1)) as (_, sim_url):
        config = gateway_config(
            sim_url,
            projects=file_projects(),
            transcripts={"data_dir": str(tmp_path), "poll_refresh_s": 0.05},
            **over,
        )
        async with running_gateway(config) as (url, _, _), aiohttp.ClientSession() as http:
            await call(http, "POST", url + "/admin/v1/projects", json={"name": "ci"})
            _, made = await call(http, "POST", url + "/admin/v1/projects/ci/keys", json={"name": "k"})
            async with http.post(
                url + "/v2/upload", data=b"RIFF", headers={"Authorization": made["key"]}
            ) as r:
                upload = (await r.json())["upload_url"]
            status, job = await call(
                http, "POST", url + "/v2/transcript", auth=made["key"], json={"audio_url": upload}
            )
            assert status == 200, job
            deadline = time.monotonic() + 10
            while (await call(http, "GET", url + f"/v2/transcript/{job['id']}", auth=made["key"]))[1][
                "status"
            ] != "completed":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            async with http.get(
                url + "/v3/token?expires_in_seconds=60", headers={"Authorization": FILE_KEY}
            ) as r:
                assert r.status == 200
            async with http.ws_connect(url.replace("http", "ws") + "/v3/ws?sample_rate=16000",
                                       headers={"Authorization": FILE_KEY}) as ws:  # fmt: skip
                await ws.receive()
                await ws.send_str('{"type": "Terminate"}')
                async for _ in ws:
                    pass
    files = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())  # noqa: ASYNC240 (after the run)
    kept = [files]
    if shared:
        client = make_client(REDIS_URL, timeout_ms=2000)
        kept.append((await _everything_in(client, prefix)).encode())
        async for key in client.scan_iter(match=f"{prefix}:*"):
            await client.delete(key)
        await client.aclose()
        assert b"dir:keys" in kept[1] and b"job" in kept[1], kept[1][:500]  # the run reached Redis
    for secret in (UPSTREAM, made["key"], FILE_KEY):
        assert not [k for k in kept if secret.encode() in k], f"{secret[:8]}... is in the store"
