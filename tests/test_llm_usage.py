"""LLM Gateway usage (issue 12): every 2xx answer with a ``usage``, JSON or SSE, is recorded
once in the ledger with its tokens, per model and customer, read as it passes to the client,
whose bytes stay upstream's. The simulator draws token counts per request and keeps what it
billed; the ledger must equal it exactly."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.app import LEDGER
from gateway.ledger import utc_day
from gateway.products.llm_usage import LINE_CAP, UNDERSTANDING_MODEL, SseReader
from gateway.sim.app import SimConfig
from tests.helpers import gateway_config, running_gateway, serving, stack
from tests.test_managed import A1, B1, UPSTREAM, create, managed

KEY = {"Authorization": "llm-usage-test-key"}
CHAT = "/v1/chat/completions"


TOKENS = ("input_tokens", "output_tokens")
Totals = defaultdict[tuple[str, str, str], float]  # (model, customer, metric) -> value


async def ledger_llm(app: web.Application) -> Totals:
    """The ledger's LLM tokens today: (model, customer, metric) -> value (its requests are
    counted per route group by usage.Tally, on no model)."""
    today = utc_day(time.time())
    out: Totals = defaultdict(float)
    for r in await app[LEDGER].rows(today, today):
        if r.product == "llm" and r.metric in TOKENS:
            out[(r.model, r.customer, r.metric)] += r.value
    return out


def billed(answers: list[dict[str, Any]]) -> Totals:
    """What the simulator billed, in the ledger's terms."""
    out: Totals = defaultdict(float)
    for a in answers:
        model = a["model"] or UNDERSTANDING_MODEL
        out[(model, a["customer"], "input_tokens")] += a["input_tokens"]
        out[(model, a["customer"], "output_tokens")] += a["output_tokens"]
    return out


async def settled(app: web.Application, want: Totals, within: float = 5.0) -> None:
    """The ledger reaches ``want`` (recording follows the client's answer), and stays there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (got := await ledger_llm(app)) != want:
        assert loop.time() < deadline, f"ledger {dict(got)} != billed {dict(want)}"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert await ledger_llm(app) == want  # nothing counted twice


async def read_sse(resp: aiohttp.ClientResponse) -> bytes:
    return await resp.read()


async def test_json_and_sse_answers_are_recorded_as_the_simulator_billed_them() -> None:
    async with stack() as s, aiohttp.ClientSession() as http:
        calls = [
            ("gpt-5", "acme", False),
            ("gpt-5", "acme", True),
            ("claude-sonnet-4-6", "acme", False),
            ("claude-sonnet-4-6", "globex", True),
            ("gpt-5", "", True),
            ("gemini-2.5-flash", "", False),
        ]
        for model, customer, stream in calls:
            headers = {**KEY, "X-AAI-Customer": customer} if customer else KEY
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
            async with http.post(s.url + CHAT, json=body, headers=headers) as r:
                assert r.status == 200
                raw = await r.read()
                kind = "text/event-stream" if stream else "application/json"
                assert r.headers["Content-Type"].startswith(kind)
                assert b'"usage"' in raw  # the client got upstream's answer, usage and all
        async with http.post(
            s.url + "/v1/understanding",
            json={"speech_understanding": {}},
            headers={**KEY, "X-AAI-Customer": "acme"},
        ) as r:
            assert r.status == 200
        assert len(s.sim.llm_billed) == len(calls) + 1
        counts = {(a["input_tokens"], a["output_tokens"]) for a in s.sim.llm_billed}
        assert len(counts) > 1  # varied counts: each answer is told apart
        await settled(s.app, billed(s.sim.llm_billed))
        today = utc_day(time.time())
        keys = {r.key for r in await s.app[LEDGER].rows(today, today)}
        assert len(keys) == 1 and KEY["Authorization"] not in keys.pop()  # a fingerprint, never the key


async def test_an_error_answer_records_nothing() -> None:
    async with stack(SimConfig(free_plan=True)) as s, aiohttp.ClientSession() as http:
        for stream in (False, True):
            body: dict[str, Any] = {"model": "gpt-5", "messages": [], "stream": stream}
            async with http.post(s.url + CHAT, json=body, headers=KEY) as r:
                assert r.status == 403
        async with http.post(s.url + CHAT, json={"model": "gpt-5"}) as r:  # no key: the gateway's 401
            assert r.status == 401
        await asyncio.sleep(0.3)
        assert await ledger_llm(s.app) == {}


async def test_a_client_that_leaves_mid_stream() -> None:
    """Before the usage chunk passed: nothing is recorded (the gateway never saw one). After
    it passed, before the stream's end: what upstream billed is recorded."""
    async with stack(SimConfig(llm_stream_delay_s=0.3)) as s, aiohttp.ClientSession() as http:
        body = {"model": "gpt-5", "messages": [], "stream": True}
        async with http.post(s.url + CHAT, json=body, headers=KEY) as r:
            assert r.status == 200
            assert (await r.content.readline()).startswith(b"data: ")
            r.close()  # gone after the first chunk
        await asyncio.sleep(1.8)  # as long as the whole stream would have taken
        assert s.sim.llm_billed == [] and await ledger_llm(s.app) == {}

        async with http.post(s.url + CHAT, json=body, headers={**KEY, "X-AAI-Customer": "late"}) as r:
            while b'"usage"' not in await r.content.readline():
                pass
            r.close()  # gone after the usage chunk, before [DONE]
        await settled(s.app, billed(s.sim.llm_billed))
        assert len(s.sim.llm_billed) == 1


async def test_managed_projects_and_a_rewritten_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """In managed mode each line is its project's and key's; an answer whose transcript id
    the gateway rewrites (so it is read whole and re-encoded) is recorded from upstream's
    bytes all the same."""
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    async with managed(transcripts={"poll_refresh_s": 0.05}) as s, aiohttp.ClientSession() as http:
        job_id = await create(http, s.url, A1)
        ask = {"transcript_id": job_id, "speech_understanding": {}}
        headers = {"Authorization": A1, "X-AAI-Customer": "acme"}
        async with http.post(s.url + "/v1/understanding", json=ask, headers=headers) as r:
            assert (
                r.status == 200
                and (await r.json())["speech_understanding"]["response"]["transcript_id"] == job_id
            )
        body = {"model": "gpt-5", "messages": [], "stream": True}
        async with http.post(s.url + CHAT, json=body, headers={"Authorization": B1}) as r:
            assert r.status == 200 and b'"usage"' in await r.read()
        await settled(s.app, billed(s.sim.llm_billed))
        today = utc_day(time.time())
        lines = {(r.project, r.key, r.model, r.customer) for r in await s.app[LEDGER].rows(today, today)
                 if r.product == "llm" and r.metric in TOKENS}  # fmt: skip
        assert lines == {
            ("alpha", "alpha/one", UNDERSTANDING_MODEL, "acme"),
            ("beta", "beta/one", "gpt-5", ""),
        }


# -- a hostile upstream ---------------------------------------------------------------------
def event(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


HUGE = b"x" * (3 * LINE_CAP)
ANSWERS: dict[str, tuple[bytes, dict[str, float] | None]] = {
    # model -> (the SSE body upstream sends, the tokens the ledger must hold, None: nothing)
    "huge-line": (
        b'data: {"usage": {"input_tokens": 999999, "pad": "'
        + HUGE
        + b'"}}\n\n'
        + event({"model": "huge-line", "usage": {"input_tokens": 7, "output_tokens": 3}}),
        {"input_tokens": 7, "output_tokens": 3},
    ),
    "no-newline": (b'data: {"usage": {"input_tokens": 5, "output_tokens": 5}}' + HUGE, None),
    "cut-event": (b'data: {"usage": {"input_tokens": 5, "output_tokens": 5}}\n', None),
    "malformed": (b'data: {"usage": {"input_tokens": 5, "output_tokens": \n\ndata: [DONE]\n\n', None),
    "bad-numbers": (
        event({"usage": {"input_tokens": -5, "output_tokens": "12", "prompt_tokens": 1e300}})
        + event({"usage": {"completion_tokens": True, "total_tokens": 4}}),
        None,  # no valid count: nothing
    ),
    "split": (
        event({"usage": {"input_tokens": 40}, "choices": []})
        + b': a comment\r\nevent: message\r\ndata: {"choices": [], \r\n'
        + b'data: "usage": {"output_tokens": 11}}\r\n\r\n'
        + event({"usage": None, "choices": []}),
        {"input_tokens": 40, "output_tokens": 11},
    ),
    "openai": (
        event({"model": "gpt-4.1-2025", "choices": [{"delta": {"content": "hi"}}], "usage": None})
        + event(
            {"model": "gpt-4.1-2025", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
        )
        + b"data: [DONE]\n\n",
        {"input_tokens": 9, "output_tokens": 2},
    ),
    "bad-model": (
        event({"model": "x|y\nz", "usage": {"input_tokens": 1, "output_tokens": 1}}),
        {"input_tokens": 1, "output_tokens": 1},
    ),
}


@asynccontextmanager
async def hostile_stack() -> AsyncIterator[tuple[str, web.Application]]:
    """A gateway in front of an upstream that answers each model with its ANSWERS body (SSE,
    in small and odd-sized pieces), or a JSON one for ``stream: false``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if not body.get("stream"):
            raw = json.dumps({"model": model, "usage": {"input_tokens": 21, "output_tokens": 4}}, indent=3)
            data, coding = raw.encode(), None
            if "gzip" in request.headers.get("Accept-Encoding", "") and model == "gzipped":
                data, coding = gzip.compress(data), "gzip"
            headers = {"Content-Type": "application/json"} | ({"Content-Encoding": coding} if coding else {})
            return web.Response(body=data, headers=headers)
        data = ANSWERS[model][0]
        headers = {"Content-Type": "text/event-stream"}
        if model == "openai" and "gzip" in request.headers.get("Accept-Encoding", ""):
            data, headers["Content-Encoding"] = gzip.compress(data), "gzip"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for at in range(0, len(data), 7919):
            await resp.write(data[at : at + 7919])
        await resp.write_eof()
        return resp

    upstream = web.Application()
    upstream.router.add_post(CHAT, chat)
    async with serving(upstream) as port:
        url = f"http://127.0.0.1:{port}"
        async with running_gateway(gateway_config(url)) as (gateway_url, app, _):
            yield gateway_url, app


async def test_a_hostile_upstream_records_nothing_bogus_and_the_client_gets_its_bytes() -> None:
    async with hostile_stack() as (url, app), aiohttp.ClientSession(auto_decompress=False) as http:
        want: Totals = defaultdict(float)
        for model, (sent, tokens) in ANSWERS.items():
            body = {"model": model, "messages": [], "stream": True}
            async with http.post(url + CHAT, json=body, headers={**KEY, "Accept-Encoding": "br"}) as r:
                assert r.status == 200 and await r.read() == sent  # upstream's bytes, unchanged
            if tokens is not None:
                named = "gpt-4.1-2025" if model == "openai" else model
                for metric, value in tokens.items():
                    want[(named, "", metric)] += value
        await settled(app, want)

        # A gzip answer the client asked for stays gzip, and is still read.
        body = {"model": "openai", "messages": [], "stream": True}
        async with http.post(url + CHAT, json=body, headers={**KEY, "Accept-Encoding": "gzip, br"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await r.read()) == ANSWERS["openai"][0]
        for model in ("plain", "gzipped"):  # JSON answers: the client's bytes are upstream's
            async with http.post(
                url + CHAT, json={"model": model}, headers={**KEY, "Accept-Encoding": "gzip"}
            ) as r:
                raw = await r.read()
                text = gzip.decompress(raw) if model == "gzipped" else raw
                assert text.startswith(b'{\n   "model"')  # as upstream indented it: not re-encoded
        want[("gpt-4.1-2025", "", "input_tokens")] += 9
        want[("gpt-4.1-2025", "", "output_tokens")] += 2
        for model in ("plain", "gzipped"):
            want[(model, "", "input_tokens")] += 21
            want[(model, "", "output_tokens")] += 4
        await settled(app, want)


def test_sse_reading_does_not_depend_on_where_chunks_are_cut() -> None:
    for model, (data, tokens) in ANSWERS.items():
        whole = SseReader()
        whole.feed(data)
        assert whole.found().counts == (tokens or {}), model
        for size in (1, 2, 3, 64, 4096) if len(data) < 10_000 else (4096, 7919, 65536):
            pieces = SseReader()
            for at in range(0, len(data), size):
                pieces.feed(data[at : at + size])
            assert (pieces.found().counts, pieces.found().model) == (
                whole.found().counts,
                whole.found().model,
            )


def test_sse_reading_keeps_bounded_memory() -> None:
    reader = SseReader()
    for _ in range(200):
        reader.feed(b"data: " + b"y" * 65536)  # 13 MB, never a newline
        assert len(reader.buf) <= LINE_CAP
    reader.feed(b"\n\n" + event({"usage": {"input_tokens": 2, "output_tokens": 1}}))
    assert reader.found().counts == {"input_tokens": 2, "output_tokens": 1}


# -- the real SDK -------------------------------------------------------------------------------
SDK_SCRIPT = textwrap.dedent(
    """
    import json, assemblyai as aai
    gw = aai.LLMGateway()
    hi = [{"role": "user", "content": "hi"}]
    c = gw.chat.completions.create(model="gpt-5", messages=hi)
    chunks = gw.chat.completions.create(model="claude-sonnet-4-6", messages=hi, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    print("RESULT " + json.dumps([c.choices[0].message.content, streamed]))
    """
)


async def test_the_sdks_calls_are_recorded() -> None:
    async with stack() as s:
        env = {**os.environ, "ASSEMBLYAI_LLM_GATEWAY_BASE_URL": s.url, "ASSEMBLYAI_API_KEY": "sdk-key"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SDK_SCRIPT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-3000:]
        answers = json.loads(out.decode().split("RESULT ")[1])
        assert answers[0] == "Simulated answer from gpt-5."
        assert answers[1].strip() == "Simulated answer from claude-sonnet-4-6."
        assert [a["stream"] for a in s.sim.llm_billed] == [False, True]
        await settled(s.app, billed(s.sim.llm_billed))
