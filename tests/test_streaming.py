"""Streaming through the gateway, with the simulator as the judge: sessions relayed both ways,
admitted per window and queued instead of refused, and never left open to bill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import yarl

from gateway.app import LEDGER, TRANSCRIPTS
from gateway.ledger import utc_day
from gateway.sim.app import Sim, SimConfig
from tests.helpers import gateway_config, metric, running_gateway, running_sim, sdk_stream_script

KEY = {"Authorization": "stream-key"}


def pcm(ms: int = 50, rate: int = 16000) -> bytes:
    return b"\0\0" * (rate * ms // 1000)


@asynccontextmanager
async def streaming(
    sim_cfg: SimConfig | None = None, **overrides: Any
) -> AsyncIterator[tuple[Sim, str, Any, Any]]:
    async with running_sim(sim_cfg or SimConfig()) as (sim, sim_url):
        async with running_gateway(gateway_config(sim_url, **overrides)) as (url, app, registry):
            yield sim, url.replace("http", "ws") + "/v3/ws?sample_rate=16000", app, registry


async def messages(ws: aiohttp.ClientWebSocketResponse, within: float = 5.0) -> list[dict[str, Any]]:
    """Everything the server sends until it closes."""
    out = []
    async with asyncio.timeout(within):
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                out.append(json.loads(msg.data))
    return out


async def talk(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> None:
    for _ in range(int(seconds / 0.05)):
        await ws.send_bytes(pcm())
        await asyncio.sleep(0.05)


async def wait_until(check: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_session_is_relayed_both_ways_and_terminated_cleanly() -> None:
    async with streaming() as (sim, url, _, registry), aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers={**KEY, "AssemblyAI-Version": "2025-05-12"}) as ws:
            begin = json.loads((await ws.receive()).data)
            assert begin["type"] == "Begin"
            await talk(ws, 1.2)
            await ws.send_str(json.dumps({"type": "Terminate"}))
            got = await messages(ws)
            assert "Turn" in [m["type"] for m in got] and got[-1]["type"] == "Termination"
            assert ws.close_code == 1000
        assert sim.streaming.report()["terminated"] == 1 and sim.recorder.violations == []
        await wait_until(lambda: any(x["path"] == "/v3/ws" for x in sim.seen))
        (ws_seen,) = [x for x in sim.seen if x["path"] == "/v3/ws"]
        assert ws_seen["headers"]["Authorization"] == "stream-key"
        assert ws_seen["headers"]["AssemblyAI-Version"] == "2025-05-12"
        assert ws_seen["query"] == "sample_rate=16000&inactivity_timeout=60"  # ours added, theirs kept
        assert metric(registry, "aai_gateway_sessions_admitted_total") == 1


async def test_a_client_that_vanishes_without_terminate_leaves_no_session_open() -> None:
    async with streaming() as (sim, url, _, registry), aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url, headers=KEY)
        await ws.receive()  # Begin
        await talk(ws, 0.3)
        await ws.close()  # the SDK's default disconnect(): no Terminate
        await wait_until(lambda: sim.streaming.open_sessions == 0)
        assert sim.streaming.report()["terminated"] == 1 and sim.streaming.report()["left_open"] == 0
        await wait_until(
            lambda: metric(registry, "aai_gateway_sessions_ended_total", reason="client_gone") == 1
        )


async def test_no_audio_for_the_idle_timeout_ends_the_session() -> None:
    async with (
        streaming(streaming={"idle_timeout_s": 0.4}) as (sim, url, _, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY) as ws:
            await ws.receive()
            await talk(ws, 0.2)
            got = await messages(ws)  # then silence
        warning = next(m for m in got if m["type"] == "Warning")
        assert "no audio" in warning["warning"] and got[-1]["type"] == "Termination"
        assert sim.streaming.report()["terminated"] == 1


async def test_the_maximum_duration_ends_the_session_with_a_warning_first() -> None:
    limits = {"max_duration_s": 1.0, "warn_before_s": 0.5, "idle_timeout_s": 10}
    async with streaming(streaming=limits) as (sim, url, _, _), aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=KEY) as ws:
            await ws.receive()
            speaking = asyncio.ensure_future(talk(ws, 3.0))
            got = await messages(ws)
            speaking.cancel()
        kinds = [m["type"] for m in got]
        assert kinds.count("Warning") == 2 and "ends in" in got[kinds.index("Warning")]["warning"]
        assert kinds[-1] == "Termination" and sim.streaming.report()["terminated"] == 1


async def test_upstream_close_codes_are_relayed() -> None:
    async with streaming() as (sim, url, _, _), aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=KEY) as ws:
            await ws.receive()
            for _ in range(40):  # 2 s of audio at once: faster than real time
                await ws.send_bytes(pcm())
            got = await messages(ws)
        assert got[-1]["type"] == "Error" and got[-1]["error_code"] == 3007
        assert ws.close_code == 3007


async def test_more_sessions_than_the_window_allows_all_begin_none_refused() -> None:
    window = {"limit": 2, "window_s": 1.0}
    sim_cfg = SimConfig(streaming_limit=2, streaming_window_s=1.0)
    async with (
        streaming(sim_cfg, limits={"streaming_sessions": window}, streaming={"idle_timeout_s": 5}) as (
            sim,
            url,
            _,
            _,
        ),
        aiohttp.ClientSession() as http,
    ):

        async def session(i: int) -> list[str]:
            async with http.ws_connect(url, headers=KEY) as ws:  # accepted at once, even when it must wait
                speaking = asyncio.ensure_future(talk(ws, 0.6))  # audio sent while queued is kept
                first = json.loads((await ws.receive(timeout=10)).data)
                await speaking
                await ws.send_str(json.dumps({"type": "Terminate"}))
                return [first["type"], *[m["type"] for m in await messages(ws)]]

        results = await asyncio.gather(*(session(i) for i in range(5)))
        assert all(r[0] == "Begin" and r[-1] == "Termination" for r in results), results
        assert sim.recorder.violations == []  # no 3009 upstream, no audio faster than real time
        assert sim.streaming.report()["sessions"] == 5


async def test_a_client_leaving_while_queued_never_opens_a_session() -> None:
    window = {"limit": 1, "window_s": 10}
    async with (
        streaming(SimConfig(streaming_limit=5), limits={"streaming_sessions": window}) as (
            sim,
            url,
            _,
            registry,
        ),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY) as first:
            await first.receive()
            second = await http.ws_connect(url, headers=KEY)
            await talk(second, 0.2)
            await second.close()
            await wait_until(lambda: metric(registry, "aai_gateway_sessions_waiting") == 0)
            await first.send_str(json.dumps({"type": "Terminate"}))
            await messages(first)
        assert sim.streaming.report()["sessions"] == 1
        assert metric(registry, "aai_gateway_sessions_ended_total", reason="client_left_waiting") == 1


async def test_past_the_max_wait_the_client_gets_3009_naming_the_gateways_limit() -> None:
    window = {"limit": 1, "window_s": 10}
    overrides = {"limits": {"streaming_sessions": window}, "streaming": {"max_wait_s": 0.3}}
    async with streaming(**overrides) as (sim, url, _, _), aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=KEY) as first:
            await first.receive()
            async with http.ws_connect(url, headers=KEY) as second:
                got = await messages(second)
                assert got[-1]["type"] == "Error" and got[-1]["error_code"] == 3009
                assert "'streaming' limit" in got[-1]["error"]
                assert second.close_code == 3009
        assert sim.streaming.report()["sessions"] == 1


async def test_a_graceful_shutdown_terminates_open_sessions() -> None:
    """The open session is terminated upstream, its Termination relayed, and the client closed
    with 1013 (try again later: the SDKs know it); a session still waiting for admission gets
    an Error and 1013 too, and never reaches upstream."""
    window = {"limit": 1, "window_s": 60.0}
    async with running_sim() as (sim, sim_url), aiohttp.ClientSession() as http:
        config = gateway_config(sim_url, limits={"streaming_sessions": window})
        async with running_gateway(config) as (url, _, _):
            ws_url = url.replace("http", "ws") + "/v3/ws?sample_rate=16000"
            ws = await http.ws_connect(ws_url, headers=KEY)
            await ws.receive()
            await talk(ws, 0.2)
            waiting = await http.ws_connect(ws_url, headers=KEY)
            await talk(waiting, 0.1)
            reading = [asyncio.create_task(texts(w)) for w in (ws, waiting)]  # as clients do
        # The gateway is gone: it terminated the session upstream before it went.
        assert sim.streaming.report()["terminated"] == 1 and sim.streaming.report()["left_open"] == 0
        assert sim.streaming.report()["sessions"] == 1
        got, told = [await r for r in reading]
        assert [m["type"] for m in got if m["type"] != "Turn"][-2:] == ["Warning", "Termination"]
        assert ws.close_code == 1013
        assert told[-1]["type"] == "Error" and told[-1]["error_code"] == 1013, told
        assert "shutting down" in told[-1]["error"] and waiting.close_code == 1013


async def texts(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Every JSON message of a session, read to its close."""
    return [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]


SDK_SCRIPT = sdk_stream_script(
    """
    events = stream(StreamingClientOptions(api_key="stream-key", api_host=sys.argv[1]))
    print("RESULT " + json.dumps(events))
    """
)


async def test_the_sdks_streaming_client_through_the_gateway() -> None:
    window = {"limit": 1, "window_s": 1.0}
    async with streaming(
        SimConfig(streaming_limit=1, streaming_window_s=1.0), limits={"streaming_sessions": window}
    ) as (
        sim,
        url,
        _,
        _,
    ):
        host = url.split("/v3/ws")[0]
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                SDK_SCRIPT,
                host,
                env=dict(os.environ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            for _ in range(3)  # three sessions, one allowed a second: two wait in the gateway
        ]
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
        for p, (out, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err.decode()[-2000:]
            events = json.loads(out.decode().split("RESULT ")[1])
            assert events[0] == "Begin" and "Turn" in events and events[-1] == "Termination", events
        assert sim.recorder.violations == [] and sim.streaming.report()["terminated"] == 3


async def test_usage_from_each_termination_is_recorded_per_key() -> None:
    async with streaming() as (_, url, app, registry), aiohttp.ClientSession() as http:
        for key, seconds in (("key-one", 1.2), ("key-two", 0.3)):
            async with http.ws_connect(url, headers={"Authorization": key}) as ws:
                await ws.receive()
                await talk(ws, seconds)
                if key == "key-one":
                    await ws.send_str(json.dumps({"type": "Terminate"}))
                    await messages(ws)
            # key-two vanished without Terminate: the gateway's Terminate still brings the figures
        vault, ledger = app[TRANSCRIPTS]._vault, app[LEDGER]
        await wait_until(lambda: sessions_ended(registry) == 2)
        today = utc_day(time.time())
        rows = await ledger.rows(today, today)
        usage = {(r.key, r.metric): r.value for r in rows if r.product == "streaming"}
        one, two = vault.fingerprint("key-one")[:16], vault.fingerprint("key-two")[:16]
        assert usage[(one, "sessions")] == 1 and usage[(one, "audio_seconds")] == 1  # the sim rounds
        assert usage[(two, "sessions")] == 1 and (two, "unreported_sessions") not in usage
        assert "key-one" not in json.dumps(rows)  # fingerprints, never keys


def sessions_ended(registry: Any) -> float:
    return sum(
        s.value for f in registry.collect() for s in f.samples if s.name == "aai_gateway_sessions_ended_total"
    )


async def test_a_temporary_token_session_waits_no_longer_than_the_token_is_valid() -> None:
    window = {"limit": 1, "window_s": 30}
    overrides = {"limits": {"streaming_sessions": window}, "streaming": {"max_wait_s": 30}}
    async with streaming(**overrides) as (_, url, app, _), aiohttp.ClientSession() as http:
        base = url.split("/v3/ws")[0].replace("ws", "http", 1)
        async with http.get(base + "/v3/token?expires_in_seconds=2", headers=KEY) as resp:
            assert resp.status == 200
            token = (await resp.json())["token"]
        async with http.ws_connect(url, headers=KEY) as first:  # takes the window's one session
            await first.receive()
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with http.ws_connect(url + f"&token={token}") as second:
                got = await messages(second)
            assert got[-1]["error_code"] == 3009 and loop.time() - started < 3  # not 30 s


async def test_a_temporary_token_from_the_gateway_opens_a_session_billed_to_its_key() -> None:
    async with streaming() as (_, url, app, registry), aiohttp.ClientSession() as http:
        base = url.split("/v3/ws")[0].replace("ws", "http", 1)
        async with http.get(base + "/v3/token?expires_in_seconds=60", headers=KEY) as resp:
            token = (await resp.json())["token"]
        async with http.ws_connect(url + f"&token={token}") as ws:  # no Authorization header
            assert json.loads((await ws.receive()).data)["type"] == "Begin"
            await talk(ws, 0.2)
            await ws.send_str(json.dumps({"type": "Terminate"}))
            await messages(ws)
        await wait_until(lambda: sessions_ended(registry) == 1)
        today = utc_day(time.time())
        rows = await app[LEDGER].rows(today, today)
        assert {r.key for r in rows} == {app[TRANSCRIPTS]._vault.fingerprint(KEY["Authorization"])[:16]}


async def test_the_optional_open_sessions_cap_holds_a_session_until_another_ends() -> None:
    async with (
        streaming(streaming={"max_open_sessions": 1}) as (sim, url, _, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY) as first:
            await first.receive()
            second = await http.ws_connect(url, headers=KEY)
            begun = asyncio.ensure_future(second.receive())
            await asyncio.sleep(0.3)
            assert not begun.done() and sim.streaming.open_sessions == 1
            await first.send_str(json.dumps({"type": "Terminate"}))
            await messages(first)
        assert json.loads((await asyncio.wait_for(begun, 5)).data)["type"] == "Begin"
        await second.send_str(json.dumps({"type": "Terminate"}))
        await messages(second)
        await second.close()
        assert sim.streaming.report()["sessions"] == 2 and sim.recorder.violations == []


async def test_a_request_that_is_not_a_websocket_upgrade_gets_a_json_400() -> None:
    async with streaming() as (sim, url, _, _), aiohttp.ClientSession() as http:
        async with http.get(url.replace("ws", "http", 1), headers=KEY) as r:
            assert r.status == 400 and "WebSocket" in (await r.json())["error"]
        assert sim.streaming.report()["sessions"] == 0


async def test_a_queued_client_is_answered_when_it_pings() -> None:
    """The SDK pings every 20 s and gives up without a pong: a queued session must answer."""
    window = {"limit": 1, "window_s": 10}
    async with (
        streaming(limits={"streaming_sessions": window}) as (sim, url, _, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY) as first:
            await first.receive()
            async with http.ws_connect(url, headers=KEY, autoping=False) as second:
                await second.ping(b"are you there")
                pong = await second.receive(timeout=2)
                assert pong.type is aiohttp.WSMsgType.PONG and pong.data == b"are you there"
            await first.send_str(json.dumps({"type": "Terminate"}))
            await messages(first)
        assert sim.streaming.report()["sessions"] == 1


async def test_a_frame_over_the_cap_closes_1009_and_the_session_is_terminated() -> None:
    async with streaming() as (sim, url, _, _), aiohttp.ClientSession() as http:
        async with http.ws_connect(url, headers=KEY, max_msg_size=0) as ws:
            await ws.receive()  # Begin
            with contextlib.suppress(ConnectionError):  # the gateway stops reading it
                await ws.send_bytes(b"\0" * (9 * 1024 * 1024))
            await messages(ws)
            # 1009 comes first; a client still writing may see its connection reset instead
            assert ws.close_code in (1009, 1006)
        await wait_until(lambda: sim.streaming.open_sessions == 0)
        assert sim.streaming.report()["terminated"] == 1 and sim.streaming.report()["left_open"] == 0


async def test_a_client_that_stops_answering_pings_is_gone_and_its_session_terminated() -> None:
    """A dead TCP connection sends nothing, not even pongs: found by ping, not left to bill."""
    settings = {"ping_interval_s": 0.2, "idle_timeout_s": 30}
    async with (
        streaming(streaming=settings) as (sim, url, _, registry),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY, autoping=False) as ws:
            await ws.receive()  # Begin
            await talk(ws, 0.2)  # then silence, and no pong
            await wait_until(lambda: sim.streaming.open_sessions == 0, within=3)
        assert sim.streaming.report()["terminated"] == 1
        await wait_until(
            lambda: metric(registry, "aai_gateway_sessions_ended_total", reason="client_gone") == 1
        )


async def test_the_query_string_goes_upstream_as_the_client_encoded_it() -> None:
    """The SDK URL-encodes list parameters (keyterms_prompt=["..."]): passed on as sent."""
    prompt = urllib.parse.quote(json.dumps(["hello world", "a+b"]))
    async with streaming() as (sim, url, _, _), aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{url}&keyterms_prompt={prompt}", headers=KEY) as ws:
            assert json.loads((await ws.receive()).data)["type"] == "Begin"
            await ws.send_str(json.dumps({"type": "Terminate"}))
            await messages(ws)
        (seen,) = [x for x in sim.seen if x["path"] == "/v3/ws"]
        query = yarl.URL("/?" + seen["query"]).query  # the simulator's view, decoded once
        assert json.loads(query["keyterms_prompt"]) == ["hello world", "a+b"]


async def test_queued_audio_longer_than_the_idle_timeout_is_all_transcribed() -> None:
    window = {"limit": 1, "window_s": 2.0}  # the second session waits ~2 s
    overrides = {"limits": {"streaming_sessions": window}, "streaming": {"idle_timeout_s": 0.6}}
    async with streaming(**overrides) as (_, url, _, _), aiohttp.ClientSession() as http:
        first = await http.ws_connect(url, headers=KEY)
        await first.receive()
        second = await http.ws_connect(url, headers=KEY)
        await talk(second, 1.5)  # queued: 1.5 s of audio, more than the idle timeout
        await second.send_str(json.dumps({"type": "Terminate"}))
        await first.send_str(json.dumps({"type": "Terminate"}))
        await messages(first)
        got = await messages(second, within=10)  # admitted when the window frees its token
        assert got[-1]["type"] == "Termination" and got[-1]["audio_duration_seconds"] >= 1
        assert not any(m["type"] == "Warning" for m in got)
        await second.close()


async def test_a_terminate_sent_while_queued_is_never_dropped() -> None:
    window = {"limit": 1, "window_s": 1.5}
    for streaming_cfg in ({"buffer_bytes": 3200}, {"backlog": "drop"}):
        overrides = {
            "limits": {"streaming_sessions": window},
            "streaming": {"idle_timeout_s": 30, **streaming_cfg},
        }
        async with streaming(**overrides) as (sim, url, _, _), aiohttp.ClientSession() as http:
            first = await http.ws_connect(url, headers=KEY)
            await first.receive()
            second = await http.ws_connect(url, headers=KEY)
            await talk(second, 0.5)  # 10 frames: over a 2-frame buffer, or all dropped
            await second.send_str(json.dumps({"type": "Terminate"}))
            await first.send_str(json.dumps({"type": "Terminate"}))
            await messages(first)
            got = await messages(second, within=5)  # not after a 30 s idle timeout
            assert got[-1]["type"] == "Termination", streaming_cfg
            await second.close()
            if streaming_cfg.get("backlog") == "drop":  # nothing to send: no session opened
                assert sim.streaming.report()["sessions"] == 1


async def test_a_key_that_is_not_ascii_gets_a_401_not_a_500() -> None:
    """No key is made of such bytes: refused before a session is opened (identity.py), never
    written into the upstream handshake."""
    async with streaming() as (sim, url, _, _):
        u = yarl.URL(url)
        reader, writer = await asyncio.open_connection(u.host, u.port)
        writer.write(
            (
                f"GET {u.raw_path_qs} HTTP/1.1\r\nHost: {u.host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nAuthorization: ключ\r\n\r\n"
            ).encode()
        )
        data = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 401"), data[:200]
        assert b'{"error": "Authentication error, API token missing/invalid"}' in data
        assert sim.streaming.report()["sessions"] == 0


async def test_a_terminate_before_begin_ends_the_session_within_the_sdks_wait() -> None:
    """The SDK waits 5 s for Termination after its Terminate, then stops reading: a session
    still queued then (the window frees in 30 s) ends with no upstream session opened."""
    window = {"limit": 1, "window_s": 30}
    async with (
        streaming(limits={"streaming_sessions": window}) as (sim, url, _, registry),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY) as first:
            await first.receive()  # Begin: the window's one session
            second = await http.ws_connect(url, headers={"Authorization": "other-key"})
            await talk(second, 0.3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await second.send_str(json.dumps({"type": "Terminate"}))
            got = await messages(second, within=5)
            assert loop.time() - started < 5 and [m["type"] for m in got] == ["Termination"]
            assert second.close_code == 1000
            await first.send_str(json.dumps({"type": "Terminate"}))
            await messages(first)
        assert sim.streaming.report()["sessions"] == 1  # none opened for the second
        assert metric(registry, "aai_gateway_sessions_ended_total", reason="client_left_waiting") == 1


async def test_a_terminate_behind_a_long_replay_cuts_it_short() -> None:
    """Admitted after 6 s of queued audio, a session's replay runs 6 s behind the client: its
    Terminate would reach upstream after the SDK stopped waiting, so it goes at once."""
    window = {"limit": 1, "window_s": 6}
    sim_cfg = SimConfig(streaming_limit=1, streaming_window_s=6)
    async with (
        streaming(sim_cfg, limits={"streaming_sessions": window}) as (sim, url, _, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(url, headers=KEY) as first:
            await first.receive()
            await first.send_str(json.dumps({"type": "Terminate"}))
            await messages(first)
        second = await http.ws_connect(url, headers=KEY)
        speaking = asyncio.ensure_future(talk(second, 30))  # queued, then relayed
        begin = json.loads((await second.receive(timeout=10)).data)
        assert begin["type"] == "Begin"
        await asyncio.sleep(0.3)
        speaking.cancel()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await second.send_str(json.dumps({"type": "Terminate"}))
        got = await messages(second, within=5)
        assert loop.time() - started < 5 and got[-1]["type"] == "Termination"
        assert sim.recorder.violations == []  # the audio that did go up went at real time
        await second.close()


async def test_one_sessions_failing_guard_ends_that_session_and_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep runs every session's guard: one that raises is ended (terminated upstream,
    then closed), and the others' guards go on (the idle timeout still ends them)."""
    from gateway.products import streaming_relay

    real_check = streaming_relay._Session.check

    def failing(self: Any, now: float) -> None:
        raise RuntimeError("a bug in one session's guard")

    async with (
        streaming(streaming={"idle_timeout_s": 0.4}) as (sim, url, app, _),
        aiohttp.ClientSession() as http,
    ):
        idle_owner = app[TRANSCRIPTS]._vault.fingerprint("idle-key")
        monkeypatch.setattr(
            streaming_relay._Session,
            "check",
            lambda self, now: (real_check if self.owner == idle_owner else failing)(self, now),
        )
        async with http.ws_connect(url, headers={"Authorization": "broken-key"}) as broken:
            await broken.receive()  # Begin
            async with http.ws_connect(url, headers={"Authorization": "idle-key"}) as idle:
                await idle.receive()  # Begin
                await talk(idle, 0.1)
                got = await messages(idle)  # then silence: its guard still runs
                assert got[-1]["type"] == "Termination"
            await messages(broken)  # ended: terminated upstream, then closed
            assert broken.close_code in (1000, 1011)
        await wait_until(lambda: sim.streaming.open_sessions == 0)
        assert sim.streaming.report()["terminated"] == 2
