"""The simulator's LLM Gateway: chat completions (JSON or SSE) under per-model windows,
understanding, the model list; every answer's tokens drawn per request and billed in
``Sim.llm_billed``."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

from aiohttp import hdrs, web

from .state import SIM, Sim, read_json


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_post("/v1/chat/completions", _chat)
    r.add_post("/v1/understanding", _understanding)
    r.add_get("/v1/models", _models)


def _llm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"message": message, "code": code, "request_id": uuid.uuid4().hex}, status=status, headers=headers
    )


async def _chat(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    if sim.config.free_plan:
        return _llm_error(403, "forbidden", "LLM Gateway is not available on the free tier")
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _llm_error(400, "invalid_request", "model is required")
    window = sim.llm_window(model)
    now = time.monotonic()
    if not window.arrive(now):
        sim.recorder.violate("llm", f"llm:{model}", now)
        reset = max(1, int(window.reset_in(now) + 0.999))
        return _llm_error(
            429,
            "rate_limit_exceeded",
            "Rate limit exceeded",
            {
                "X-RateLimit-Limit": str(window.limit),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(reset),
                "X-RateLimit-Model": model,
                "X-RateLimit-Service": "llm-gateway",
            },
        )
    if sim.config.llm_latency_s:
        await asyncio.sleep(sim.config.llm_latency_s)
    answer = f"Simulated answer from {model}."
    usage = _usage(sim, model)
    if body.get("stream"):
        resp = web.StreamResponse(headers={hdrs.CONTENT_TYPE: "text/event-stream"})
        await resp.prepare(request)
        for i, word in enumerate(answer.split()):
            chunk = {
                "id": "chatcmpl-sim",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
            }
            last = i == len(answer.split()) - 1
            if last:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if last:
                _bill(sim, request, model, usage, stream=True)
            await asyncio.sleep(sim.config.llm_stream_delay_s)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    _bill(sim, request, model, usage, stream=False)
    return web.json_response(
        {
            "request_id": uuid.uuid4().hex,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
            ],
            "request": {"model": model, "max_tokens": body.get("max_tokens", 1000)},
            "usage": usage,
            "response_time": 1_000_000,
        }
    )


def _usage(sim: Sim, what: str) -> dict[str, int]:
    """Token counts for one answer: seeded by the request's place in the run, so a run is
    repeatable and each answer differs."""
    sim.llm_drawn += 1
    rng = random.Random(f"{what}:{sim.llm_drawn}")
    given, made = rng.randint(5, 4000), rng.randint(1, 1500)
    return {
        "input_tokens": given,
        "output_tokens": made,
        "prompt_tokens": given,
        "completion_tokens": made,
        "total_tokens": given + made,
    }


def _bill(sim: Sim, request: web.Request, model: str | None, usage: dict[str, int], *, stream: bool) -> None:
    """What upstream billed for an answer (tests compare the gateway's ledger with it)."""
    sim.llm_billed.append(
        {
            "path": request.path,
            "model": model,
            "customer": request.headers.get("X-AAI-Customer", ""),
            "input_tokens": usage["input_tokens"],
            "output_tokens": usage["output_tokens"],
            "stream": stream,
        }
    )


async def _understanding(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    transcript_id = body.get("transcript_id")
    if transcript_id is not None and transcript_id not in sim.transcripts.jobs:
        return _llm_error(400, "invalid_request", f"Transcript {transcript_id} not found")
    now = time.monotonic()
    if not sim.understanding.arrive(now):
        sim.recorder.violate("understanding", "understanding", now)
        return _llm_error(
            429,
            "rate_limit_exceeded",
            "Rate limit exceeded",
            {"X-RateLimit-Reset": str(max(1, int(sim.understanding.reset_in(now) + 0.999)))},
        )
    usage = _usage(sim, "understanding")
    _bill(sim, request, None, usage, stream=False)
    return web.json_response(
        {
            "request_id": uuid.uuid4().hex,
            "speech_understanding": {"response": {"transcript_id": body.get("transcript_id")}},
            "usage": {k: usage[k] for k in ("input_tokens", "output_tokens", "total_tokens")},
        }
    )


def _model_entry(model_id: str) -> dict[str, Any]:
    price = {"completions": 1.0, "prompt": 0.5}
    provider = {"id": "sim", "name": "Simulator"}
    return {
        "id": model_id,
        "name": model_id,
        "description": "simulated",
        "created": 0,
        "default_parameters": {"temperature": 1.0},
        "supported_parameters": ["max_tokens"],
        "top_provider": {"is_moderated": False, "context_length": 200000, "max_completion_tokens": 8192},
        "context_length": 200000,
        "pricing": {"global": price},
        "creator": "sim",
        "retirement_date": 0,
        "available_regions": ["us"],
        "providers": [provider],
        "default_provider": provider,
    }


async def _models(request: web.Request) -> web.Response:
    return web.json_response(
        {"data": [_model_entry(m) for m in ("claude-sonnet-4-6", "gpt-5", "gemini-2.5-flash")]}
    )
