"""Hot reload (gateway/reload.py): SIGHUP and POST /admin/v1/reload re-read the config file.

New limits apply to new admissions at once; connections, waiters and leases survive; an
invalid file, or one changing a restart-only key, is refused with the key's path and the
old config stays; every instance shows its config's hash in /readyz.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.config import Config, load_config
from gateway.reload import changed_keys, config_hash, needs_restart
from gateway.sim.app import SimConfig
from gateway.tls import SERVED_TLS, server_context
from tests.conftest import REDIS_URL
from tests.helpers import _merge, delete_prefix, gateway_config, running_sim, serving, start_gateway_process
from tests.test_tls import make_certs, peer_subject

KEY = {"Authorization": "reload-test-key"}
ADMIN = "s3cret-admin-token"
ONLY_US = SimConfig(keys=[KEY["Authorization"]])  # a stray gateway elsewhere on the machine is refused


def write(path: Path, raw: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(raw))


def read(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def base_raw(sim_url: str, prefix: str, **over: Any) -> dict[str, Any]:
    """A config file's content: every upstream at the simulator, the real Redis under a key
    prefix of the test's own, one request per 30 s (so a second one waits)."""
    raw: dict[str, Any] = gateway_config(sim_url).model_dump(mode="json", exclude_defaults=True)
    raw = _merge(raw, {"redis": {"url": REDIS_URL, "key_prefix": prefix}, "account": "reload"})
    raw["transcripts"] = {"data_dir": str(Path(tempfile.gettempdir()) / f"aai-gw-{prefix}")}  # one per test
    raw = _merge(raw, {"limits": {"requests": {"limit": 1, "window_s": 30}}, "queue": {"max_wait_s": 10}})
    return _merge(raw, over)


@asynccontextmanager
async def gateway_on_file(path: Path, token: str | None = ADMIN) -> AsyncIterator[tuple[str, Any]]:
    load = partial(load_config, path, environ={})
    app = build_app(load(), load=load, admin_token=token)
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), app
    finally:
        await server.close()


async def readyz_hash(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return str(body["config_hash"])


async def upload(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/v2/upload", data=b"audio", headers=KEY) as resp:
        await resp.read()
        return resp.status


async def reload(http: aiohttp.ClientSession, url: str, token: str | None = ADMIN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.post(url + "/admin/v1/reload", headers=headers) as resp:
        return resp.status, await resp.json()


# -- the hash and the diff ----------------------------------------------------------------------
def test_the_hash_names_the_validated_config_not_its_spelling(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, {"limits": {"plan": "paid"}})
    write(b, {"limits": {"plan": "paid", "requests": {"limit": 20_000, "window_s": 300}}})  # the defaults
    assert config_hash(load_config(a, environ={})) == config_hash(load_config(b, environ={}))
    assert len(config_hash(load_config(a, environ={}))) == 12
    write(b, {"limits": {"requests": {"limit": 19_999, "window_s": 300}}})
    assert config_hash(load_config(a, environ={})) != config_hash(load_config(b, environ={}))


def test_the_hash_does_not_depend_on_a_password() -> None:
    one = Config.model_validate({"redis": {"url": "redis://:first@h:6379/0"}})
    two = Config.model_validate({"redis": {"url": "redis://:second@h:6379/0"}})
    assert config_hash(one) == config_hash(two)


def test_changed_keys_and_which_need_a_restart() -> None:
    old = Config.model_validate({})
    new = Config.model_validate(
        {"limits": {"requests": {"limit": 5}}, "listen": {"port": 9999}, "log": {"level": "debug"}}
    )
    changed = changed_keys(old, new)
    assert changed == ["limits.requests.limit", "listen.port", "log.level"]
    assert needs_restart(old, new, changed) == ["listen.port"]
    tls = Config.model_validate({"listen": {"tls": {"cert_file": "c", "key_file": "k"}}})
    assert needs_restart(old, tls, changed_keys(old, tls)) == ["listen.tls (turning TLS on or off)"]


# -- the admin endpoint ------------------------------------------------------------------------
async def test_the_admin_endpoint_needs_its_token_and_keeps_the_old_config_on_a_bad_file(
    tmp_path: Path,
) -> None:
    prefix = "rl" + uuid.uuid4().hex[:8]
    path = tmp_path / "gw.yaml"
    async with running_sim(ONLY_US) as (_, sim_url), aiohttp.ClientSession() as http:
        write(path, base_raw(sim_url, prefix))
        try:
            async with gateway_on_file(path, token=None) as (url, _):
                status, body = await reload(http, url)
                assert (status, body) == (404, {"error": "Not found"})  # no token: no admin endpoint
            async with gateway_on_file(path) as (url, _):
                first = await readyz_hash(http, url)
                status, body = await reload(http, url, token=None)
                assert status == 401 and "Bearer" in body["error"]
                status, body = await reload(http, url, token="wrong")
                assert (status, body) == (403, {"error": "Admin token invalid"})
                async with http.post(url + "/admin/v1/reload", headers={"Authorization": ADMIN}) as resp:
                    assert resp.status == 401  # the raw token, as AssemblyAI keys are sent, is not Bearer

                write(path, base_raw(sim_url, prefix, limits={"requests": {"limit": 0}}))
                status, body = await reload(http, url)
                assert status == 400 and f"{path}: limits.requests.limit: must be > 0" in body["error"], body
                assert first in body["error"] and await readyz_hash(http, url) == first

                write(path, base_raw(sim_url, prefix, listen={"port": 1}, redis={"key_prefix": "other"}))
                status, body = await reload(http, url)
                assert status == 400 and "need a restart" in body["error"]
                assert "listen.port" in body["error"] and "redis.key_prefix" in body["error"]
                assert await readyz_hash(http, url) == first

                write(path, base_raw(sim_url, prefix, limits={"requests": {"limit": 3}}))
                status, body = await reload(http, url)
                assert status == 200 and body["changed"] == ["limits.requests.limit"], body
                assert body["previous_hash"] == first and body["config_hash"] != first
                assert await readyz_hash(http, url) == body["config_hash"]
                async with http.get(url + "/metrics") as resp:
                    text = await resp.text()
                assert f'aai_gateway_config_info{{hash="{body["config_hash"]}"}} 1.0' in text
                assert 'aai_gateway_config_reloads_total{outcome="refused"} 2.0' in text
                assert 'aai_gateway_tokens_capacity{limit="requests"} 3.0' in text
        finally:
            await delete_prefix(prefix)


# -- what survives a reload --------------------------------------------------------------------
async def test_a_waiter_is_admitted_under_the_raised_limit_and_open_connections_survive(
    tmp_path: Path,
) -> None:
    """One request per 30 s: the second waits. A reload raising the limit to 2 admits it at
    once (no lease ends meanwhile, no restart); a streaming session opened before the reload
    and a keep-alive connection go on after it."""
    prefix = "rl" + uuid.uuid4().hex[:8]
    path = tmp_path / "gw.yaml"
    async with running_sim(ONLY_US) as (sim, sim_url), aiohttp.ClientSession() as http:
        write(path, base_raw(sim_url, prefix))
        try:
            async with gateway_on_file(path) as (url, _):
                ws_url = url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
                ws = await http.ws_connect(ws_url, headers=KEY)
                assert json.loads((await ws.receive()).data)["type"] == "Begin"
                assert await upload(http, url) == 200  # the one request of the window
                waiter = asyncio.create_task(upload(http, url))
                await asyncio.sleep(1.0)
                assert not waiter.done()  # waiting for the window's only lease

                write(path, base_raw(sim_url, prefix, limits={"requests": {"limit": 2}}))
                status, body = await reload(http, url)
                assert status == 200, body
                assert await asyncio.wait_for(waiter, 3) == 200  # admitted under the new capacity

                for _ in range(4):  # the session opened before the reload still relays
                    await ws.send_bytes(b"\0\0" * 800)
                    await asyncio.sleep(0.05)
                await ws.send_str(json.dumps({"type": "Terminate"}))
                kinds = []
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        kinds.append(json.loads(msg.data)["type"])
                assert kinds[-1] == "Termination" and ws.close_code == 1000
        finally:
            await delete_prefix(prefix)
    assert sim.streaming.report()["terminated"] == 1


# -- SIGHUP on a real process ------------------------------------------------------------------
async def test_sighup_on_a_running_gateway_applies_a_new_limit_and_refuses_a_bad_file() -> None:
    prefix = "rl" + uuid.uuid4().hex[:8]
    async with running_sim(ONLY_US) as (_, sim_url), aiohttp.ClientSession() as http:
        raw = base_raw(sim_url, prefix, queue={"max_wait_s": 0.3})
        raw.pop("listen", None)
        gw = start_gateway_process(raw)
        path = Path(gw.proc.args[-1])  # type: ignore[index]
        try:
            await gw.ready("/readyz")
            first = await readyz_hash(http, gw.url)
            assert await upload(http, gw.url) == 200
            assert await upload(http, gw.url) == 429  # one per 30 s

            ours = read(path)
            write(path, _merge(ours, {"limits": {"requests": {"limit": 0}}}))
            gw.proc.send_signal(signal.SIGHUP)
            await wait_for_log(gw, "refused")
            assert "limits.requests.limit: must be > 0" in gw.output()
            assert await readyz_hash(http, gw.url) == first and gw.proc.poll() is None

            write(path, _merge(ours, {"limits": {"requests": {"limit": 2}}, "log": {"format": "json"}}))
            gw.proc.send_signal(signal.SIGHUP)
            await wait_for_log(gw, "reloaded (SIGHUP)")
            second = await readyz_hash(http, gw.url)
            line = next(x for x in gw.output().splitlines() if "reloaded (SIGHUP)" in x)
            assert json.loads(line)["message"].endswith(  # logged in the new format already
                f"hash {first} -> {second}; limits.requests.limit, log.format"
            )
            assert await upload(http, gw.url) == 200  # the lease taken before the reload still counts:
            assert await upload(http, gw.url) == 429  # 2 of 2
        finally:
            gw.kill()
            await delete_prefix(prefix)


async def wait_for_log(gw: Any, text: str, within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while text not in gw.output():
        if loop.time() > deadline:
            pytest.fail(f"no {text!r} in the log:\n{gw.output()}")
        await asyncio.sleep(0.05)


# -- the certificate ---------------------------------------------------------------------------
async def test_a_reload_reads_a_renewed_certificate_and_refuses_a_bad_one(tmp_path: Path) -> None:
    """The files at the configured paths are replaced (a renewal): a reload serves the new
    certificate to new handshakes; a key that does not match is refused (400, the key path)
    and the certificate served stays."""
    first, renewed = (
        make_certs(tmp_path / "first", cn="first"),
        make_certs(tmp_path / "renewed", cn="renewed"),
    )
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    path = tmp_path / "gw.yaml"
    prefix = "rl" + uuid.uuid4().hex[:8]
    async with running_sim(ONLY_US) as (_, sim_url):
        write(path, base_raw(sim_url, prefix, listen={"tls": {"cert_file": str(cert), "key_file": str(key)}}))
        load = partial(load_config, path, environ={})
        config = load()
        app = build_app(config, load=load, admin_token=ADMIN)
        assert config.listen.tls is not None
        app[SERVED_TLS] = server_context(config.listen.tls)
        trust = ssl.create_default_context(cafile=str(first.ca))
        trust.load_verify_locations(cafile=str(renewed.ca))
        try:
            async with (
                serving(app, tls=app[SERVED_TLS].context) as port,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http,
            ):
                url = f"https://localhost:{port}"
                assert await peer_subject(port, first.ca) == "first"
                shutil.copy(renewed.cert, cert)
                shutil.copy(renewed.key, key)
                status, body = await reload(http, url)
                assert status == 200 and body["changed"] == [] and "renewed" in body["notes"][0], body
                assert await peer_subject(port, renewed.ca) == "renewed"
                shutil.copy(first.key, key)  # not the renewed certificate's key
                status, body = await reload(http, url)
                assert status == 400 and body["error"].startswith("listen.tls.key_file: "), body
                assert await peer_subject(port, renewed.ca) == "renewed"
        finally:
            await delete_prefix(prefix)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("Bearer", 401),
        ("Bearer    ", 401),
        ("Basic czNjcmV0", 401),
        (f"bearer {ADMIN}", 200),  # the scheme is case-insensitive (RFC 9110)
        (f"Bearer   {ADMIN}  ", 200),
        (f"Bearer {ADMIN}x", 403),
        (f"Bearer {ADMIN[:-1]}", 403),
        ("Bearer " + "A" * 8000, 403),
        ("Bearer s3cr\u00e9t", 403),
    ],
)
async def test_the_admin_token_is_read_strictly(tmp_path: Path, header: str, status: int) -> None:
    path = tmp_path / "gw.yaml"
    write(path, {"transcripts": {"data_dir": str(tmp_path / "data")}})
    async with gateway_on_file(path) as (url, _), aiohttp.ClientSession() as http:
        async with http.post(url + "/admin/v1/reload", headers={"Authorization": header}) as resp:
            body = await resp.json()
            assert resp.status == status, body
            assert ("error" in body) == (status != 200)
            assert ADMIN not in json.dumps(body)
