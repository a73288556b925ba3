"""The gateway as a client sees it, in front of the simulator (both in this process)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.app import CONFIG, ENGINE, target_problem
from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.products.catalog import Catalog
from gateway.proxy.body import inflate
from gateway.sim.app import SimConfig
from tests.helpers import free_port, gateway_config, metric, running_gateway, running_sim, stack

KEY = {"Authorization": "test-key"}


async def test_routes_and_gateway_endpoints() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:
        async with http.get(s.url + "/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(s.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["store"] == "memory" and "ONE instance" in body["note"]
        async with http.post(
            s.url + "/v2/transcript", json={"audio_url": "https://x/a.mp3"}, headers=KEY
        ) as r:
            assert r.status == 200 and (await r.json())["status"] in ("queued", "processing")
            assert r.headers["RateLimit-Policy"] == "async;q=200"  # the tightest it took
            assert r.headers["RateLimit"] == "async;r=199"
        async with http.get(s.url + "/v2/transcript/not-a-gateway-id", headers=KEY) as r:
            assert r.headers["RateLimit-Policy"] == "requests;q=20000;w=300"
            assert r.headers["RateLimit"].startswith("requests;r=19998;t=")
        async with http.post(
            s.url + "/v1/chat/completions", json={"model": "gpt-5", "messages": []}, headers=KEY
        ) as r:
            assert r.status == 200
            assert r.headers["RateLimit-Policy"] == "llm:gpt-5;q=30;w=60"
        async with http.get(s.url + "/v3/token?expires_in_seconds=60", headers=KEY) as r:
            assert r.status == 200 and "token" in await r.json()
        async with http.get(s.url + "/metrics") as r:
            text = await r.text()
            assert 'aai_gateway_admissions_total{limit="requests"} 4.0' in text
            assert 'aai_gateway_admissions_total{limit="llm:gpt-5"} 1.0' in text
            assert "test-key" not in text
        assert [(x["method"], x["path"]) for x in s.sim.seen] == [
            ("POST", "/v2/transcript"),
            ("GET", "/v2/transcript/not-a-gateway-id"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v3/token"),
        ]


async def test_bad_input_gets_clear_json_errors_and_costs_nothing() -> None:
    async with stack(proxy={"max_json_body_bytes": 1024}) as s, aiohttp.ClientSession() as http:
        cases = [
            ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
            ("POST", "/v1/chat/completions", b"[1,2]", 400, "JSON object"),
            ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "`model` is required"),
            ("POST", "/v1/chat/completions", b'{"model": ""}', 400, "`model` is required"),
            ("POST", "/v1/chat/completions", b'{"model": "bad model\\n"}', 400, "not a valid model name"),
            (
                "POST",
                "/v1/chat/completions",
                json.dumps({"model": "gpt-5", "x": "y" * 2000}).encode(),
                413,
                "larger",
            ),
            ("GET", "/nowhere", b"", 404, "Not found"),
            ("GET", "/v3/ws", b"", 400, "WebSocket"),
        ]
        for method, path, body, status, text in cases:
            async with http.request(method, s.url + path, data=body, headers=KEY) as r:
                assert r.status == status, (path, body)
                payload = await r.json()
                assert set(payload) == {"error"} and text in payload["error"], payload
        # Nothing reached upstream, nothing was charged.
        assert s.sim.seen == []
        assert metric(s.registry, "aai_gateway_admissions_total", limit="requests") == 0


async def test_missing_key_gets_upstreams_401_without_reaching_it() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:
        for method, path in [
            ("GET", "/v2/transcript/abc"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v3/token"),
        ]:
            async with http.request(method, s.url + path) as r:
                assert r.status == 401
                assert await r.json() == {"error": "Authentication error, API token missing/invalid"}
        async with http.get(s.url + "/v1/models") as r:  # upstream serves it without a key
            assert r.status == 200
        assert [x["path"] for x in s.sim.seen] == ["/v1/models"]


async def test_free_plan_has_no_llm_gateway() -> None:
    async with stack(limits={"plan": "free"}) as s, aiohttp.ClientSession() as http:
        async with http.post(s.url + "/v1/chat/completions", json={"model": "gpt-5"}, headers=KEY) as r:
            assert r.status == 403 and "free plan" in (await r.json())["error"]
        assert s.sim.seen == []


async def test_page_details_point_back_at_the_gateway() -> None:
    cfg = SimConfig(public_api_url="https://api.assemblyai.com", job_seconds=0.05)
    async with running_sim(cfg) as (sim, sim_url):
        config = gateway_config(sim_url, upstream={"api_url": sim_url}, public_url="https://gw.example.com")
        async with running_gateway(config) as (url, _, _), aiohttp.ClientSession() as http:
            async with http.post(
                url + "/v2/transcript", json={"audio_url": "https://x/a.mp3"}, headers=KEY
            ) as r:
                assert r.status == 200
            # The simulator writes absolute URLs to its own host here: rewrite those.
            sim.config.public_api_url = sim_url
            async with http.get(url + "/v2/transcript?limit=5", headers=KEY) as r:
                details = (await r.json())["page_details"]
            assert details["current_url"] == "https://gw.example.com/v2/transcript?limit=5"
            assert details["prev_url"].startswith("https://gw.example.com/v2/transcript?limit=5&before_id=")


async def test_page_details_use_the_request_host_without_public_url() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:
        await (
            await http.post(s.url + "/v2/transcript", json={"audio_url": "https://x/a.mp3"}, headers=KEY)
        ).read()
        async with http.get(
            s.url + "/v2/transcript", headers={**KEY, "X-Forwarded-Host": "evil.example"}
        ) as r:
            details = (await r.json())["page_details"]
        assert details["current_url"].startswith(s.url + "/v2/transcript")


async def test_upload_streams_and_is_never_retried() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:

        async def chunks():
            for _ in range(64):
                yield b"\0" * 65536

        async with http.post(s.url + "/v2/upload", data=chunks(), headers=KEY) as r:
            assert r.status == 200 and "upload_url" in await r.json()
        assert list(s.sim.uploads.values()) == [64 * 65536]


async def test_sse_streams_through() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:
        body = {"model": "gpt-5", "messages": [], "stream": True}
        async with http.post(s.url + "/v1/chat/completions", json=body, headers=KEY) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            lines = [line async for line in r.content]
        assert lines[-2].strip() == b"data: [DONE]"


async def test_upstream_429_is_retried_with_a_new_token() -> None:
    # Upstream allows fewer than the gateway believes: the gateway retries after Retry-After.
    sim_cfg = SimConfig(llm_limit=2, llm_window_s=1.0)
    async with (
        stack(sim_cfg, limits={"llm_requests": {"limit": 3, "window_s": 1}}) as s,
        aiohttp.ClientSession() as http,
    ):
        statuses = []
        for _ in range(3):
            async with http.post(s.url + "/v1/chat/completions", json={"model": "gpt-5"}, headers=KEY) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 200]
        assert metric(s.registry, "aai_gateway_upstream_429_retries_total", group="llm") >= 1
        assert metric(s.registry, "aai_gateway_admissions_total", limit="llm:gpt-5") >= 4


async def test_connect_failure_is_502_and_refunded() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = gateway_config(dead)
    async with running_gateway(config) as (url, app, registry), aiohttp.ClientSession() as http:
        async with http.get(url + "/v2/transcript/abc", headers=KEY) as r:
            assert r.status == 502 and "connect" in (await r.json())["error"]
        out, _ = await app[ENGINE].store.usage(Catalog(app[CONFIG].limits).requests)
        assert out == 0  # the window token was given back: the request never left


async def test_read_timeout_is_504() -> None:
    sim_cfg = SimConfig(llm_latency_s=2.0)
    async with stack(sim_cfg, upstream={"read_timeout_s": 0.2}) as s, aiohttp.ClientSession() as http:
        async with http.post(s.url + "/v1/chat/completions", json={"model": "gpt-5"}, headers=KEY) as r:
            assert r.status == 504 and set(await r.json()) == {"error"}


async def test_queue_max_wait_then_429_with_retry_after() -> None:
    limits = {"requests": {"limit": 2, "window_s": 5}}
    async with stack(limits=limits, queue={"max_wait_s": 0.3}) as s, aiohttp.ClientSession() as http:
        statuses, headers = [], []
        for _ in range(3):
            async with http.get(s.url + "/v2/transcript/x", headers=KEY) as r:
                statuses.append(r.status)
                headers.append(r.headers)
                body = await r.json()
        assert statuses[:2] == [404, 404] and statuses[2] == 429
        assert "'requests' limit" in body["error"]
        retry = int(headers[2]["Retry-After"])
        assert 1 <= retry <= 8
        assert headers[2]["RateLimit"] == f"requests;r=0;t={retry}"
        assert len(s.sim.seen) == 2


async def test_queue_max_depth_refuses_at_once() -> None:
    limits = {"requests": {"limit": 1, "window_s": 5}}
    async with (
        stack(limits=limits, queue={"max_depth": 1, "max_wait_s": 2}) as s,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(s.url + "/v2/transcript/x", headers=KEY) as r:
            assert r.status == 404
        waiter = asyncio.ensure_future(http.get(s.url + "/v2/transcript/y", headers=KEY))
        await asyncio.sleep(0.2)
        t0 = asyncio.get_running_loop().time()
        async with http.get(s.url + "/v2/transcript/z", headers=KEY) as r:
            assert r.status == 429 and "already wait" in (await r.json())["error"]
        assert asyncio.get_running_loop().time() - t0 < 0.5
        waiter.cancel()


async def test_client_leaving_while_queued_is_never_forwarded_nor_charged() -> None:
    limits = {"requests": {"limit": 1, "window_s": 1.0}}
    async with stack(limits=limits) as s:
        engine = s.app[ENGINE]
        async with aiohttp.ClientSession() as http:
            async with http.get(s.url + "/v2/transcript/first", headers=KEY) as r:
                assert r.status == 404
        # A client that gives up while waiting.
        leaver = aiohttp.ClientSession()
        task = asyncio.ensure_future(leaver.get(s.url + "/v2/transcript/gone", headers=KEY))
        await asyncio.sleep(0.2)
        assert "requests" in repr(engine)  # it waits
        task.cancel()
        await leaver.close()
        await asyncio.sleep(0.2)
        assert "'requests'" not in repr(engine).split("waiting=")[1]
        await asyncio.sleep(1.2)  # past the window: had it been charged, it would have gone upstream
        assert [x["path"] for x in s.sim.seen] == ["/v2/transcript/first"]
        assert metric(s.registry, "aai_gateway_admissions_total", limit="requests") == 1


async def test_headers_forwarded_except_hop_by_hop() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:
        headers = {
            "Authorization": "the-key-unchanged",
            "AssemblyAI-Version": "2025-05-12",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "dropped: named by Connection",
            "Keep-Alive": "timeout=5",
            "X-AAI-Gateway-Priority": "99",
            "X-Custom": "kept",
        }
        async with http.get(s.url + "/v2/transcript/abc?x=1&y=two", headers=headers) as r:
            assert r.status == 404
            assert "Transfer-Encoding" not in r.headers or r.headers["Transfer-Encoding"] == "chunked"
        seen = s.sim.seen[0]
        assert seen["query"] == "x=1&y=two"
        got = {k.lower(): v for k, v in seen["headers"].items()}
        assert got["authorization"] == "the-key-unchanged"
        assert got["assemblyai-version"] == "2025-05-12" and got["x-custom"] == "kept"
        for hop in ("x-hop", "keep-alive", "x-aai-gateway-priority"):
            assert hop not in got
        assert got["host"] == s.sim_url.split("//")[1]


async def test_maxmemory_policy_that_could_evict_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    from gateway.__main__ import _warn_eviction
    from tests.test_redis_trouble import private_redis

    async with private_redis() as redis:
        client = aioredis.Redis.from_url(redis.url)
        await client.config_set("maxmemory-policy", "volatile-lru")
        await client.aclose()
        async with stack(redis={"url": redis.url}) as s:
            with caplog.at_level(logging.WARNING, logger="gateway"):
                await _warn_eviction(s.app, s.app[CONFIG])
    assert "maxmemory-policy is 'volatile-lru'" in caplog.text and "noeviction" in caplog.text


def test_request_paths_routing_and_upstream_could_read_differently_are_named() -> None:
    fine = [
        "/",
        "/v2/transcript",
        "/v2/transcript/abc?x=..",
        "/v2/a.b",
        "/v2/...",
        "/.well-known/x",
        "/v2/%41",
    ]
    assert [target_problem(p.partition("?")[0]) for p in fine] == [None] * len(fine)
    refused = {
        "/v2/x/../../v2/transcript": "dot segment",
        "/v2/%2e%2e/transcript": "dot segment",
        "/v2/%2E./transcript": "dot segment",
        "/v2/.%2e": "dot segment",
        "/v2/./transcript": "dot segment",
        "/v2//transcript": "empty segment",
        "/v2/a%2Fb": "encoded slash",
        "/v2/a%5cb": "encoded slash",
        "/v2/a\\b": "backslash",
        "/v2/%00": "control character",
        "/v2/a%0d%0aX: y": "control character",
    }
    for path, problem in refused.items():
        assert problem in (target_problem(path) or ""), path


def test_bodies_are_inflated_within_the_cap_only_to_be_read() -> None:
    doc = b'{"model": "gpt-5"}'
    assert inflate(gzip.compress(doc), ["gzip"], 100) == doc
    assert inflate(gzip.compress(doc[:5]) + gzip.compress(doc[5:]), ["gzip"], 100) == doc  # two members
    assert inflate(zlib.compress(doc), ["deflate"], 100) == doc
    raw_deflate = zlib.compressobj(wbits=-15)
    assert inflate(raw_deflate.compress(doc) + raw_deflate.flush(), ["deflate"], 100) == doc
    assert inflate(gzip.compress(gzip.compress(doc)), ["gzip", "gzip"], 100) == doc
    assert inflate(gzip.compress(doc), ["gzip"], len(doc)) == doc  # exactly the cap
    for data, codings, error in [
        (gzip.compress(doc), ["gzip"], PayloadTooLarge),  # cap below
        (gzip.compress(b"0" * 10_000_000), ["gzip"], PayloadTooLarge),  # a bomb: stops at cap + 1
        (gzip.compress(doc)[:-4], ["gzip"], BadRequest),
        (b"plain", ["gzip"], BadRequest),
        (gzip.compress(doc) + b"junk", ["gzip"], BadRequest),
        (doc, ["br"], UnsupportedMediaType),
        (doc, ["compress"], UnsupportedMediaType),
    ]:
        with pytest.raises(error):
            inflate(data, codings, len(doc) - 1 if error is PayloadTooLarge else 100)
