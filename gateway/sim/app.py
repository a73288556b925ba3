"""The upstream simulator: a faithful stand-in for AssemblyAI, and the judge of every limit.

It serves REST v2, the LLM Gateway and streaming v3 on ONE listener (point the gateway's
``api_url``, ``llm_url`` and ``streaming_url`` all at it), enforces the account limits the
way upstream does (UPSTREAM.md) and records every violation, so tests can assert that the
gateway never caused one, and read each limit's busiest window (capacity actually used).

Admin endpoints (no auth): ``GET /_sim/report``, ``POST /_sim/reset``, ``POST /_sim/config``
(change limits or flags at run time, e.g. ``{"negative_balance": true}``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlparse

from aiohttp import hdrs, web

from .recorder import Recorder, RollingWindow
from .streaming import StreamingService
from .transcripts import Job, TranscriptService

NEGATIVE_BALANCE = "Your current account balance is negative. Please top up to continue using the API."
AUTH_ERROR = "Authentication error, API token missing/invalid"
READS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class SimConfig:
    requests_limit: int = 20_000
    requests_window_s: float = 300.0
    count_reads: bool = True
    llm_limit: int = 30
    llm_window_s: float = 60.0
    llm_models: dict[str, int] = field(default_factory=dict)
    understanding_limit: int = 30
    async_concurrency: int = 200
    streaming_limit: int = 100
    streaming_window_s: float = 60.0
    job_seconds: float = 2.0
    post_latency_s: float = 0.0  # how long POST /v2/transcript takes to answer
    llm_latency_s: float = 0.0
    keys: list[str] | None = None  # None: any non-empty key is valid
    public_api_url: str | None = None  # absolute URLs in page_details; default: this server
    negative_balance: bool = False
    webhook_retry_s: float = 10.0
    free_plan: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Sim:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.reset()

    def reset(self) -> None:
        c = self.config
        self.recorder = Recorder()
        self.requests = RollingWindow("requests", c.requests_limit, c.requests_window_s)
        self.llm: dict[str, RollingWindow] = {}
        self.understanding = RollingWindow("understanding", c.understanding_limit, c.llm_window_s)
        old = getattr(self, "transcripts", None)
        if old is not None:
            asyncio.ensure_future(old.close())
        self.transcripts = TranscriptService(
            self.recorder,
            concurrency=c.async_concurrency,
            default_seconds=c.job_seconds,
            webhook_retry_s=c.webhook_retry_s,
        )
        self.streaming = StreamingService(
            self.recorder, RollingWindow("streaming_sessions", c.streaming_limit, c.streaming_window_s)
        )
        self.uploads: dict[str, int] = {}
        self.seen: list[dict[str, Any]] = []  # method, path, status of every request (tests)

    def llm_window(self, model: str) -> RollingWindow:
        window = self.llm.get(model)
        if window is None:
            limit = self.config.llm_models.get(model, self.config.llm_limit)
            window = self.llm[model] = RollingWindow(f"llm:{model}", limit, self.config.llm_window_s)
        return window

    def report(self) -> dict[str, Any]:
        return {
            "violations": [v.as_dict() for v in self.recorder.violations],
            "requests": {
                "arrivals": len(self.requests.arrivals),
                "busiest": self.requests.busiest(),
                "limit": self.requests.limit,
                "window_s": self.requests.window_s,
            },
            "llm": {
                m: {"arrivals": len(w.arrivals), "busiest": w.busiest(), "limit": w.limit}
                for m, w in self.llm.items()
            },
            "transcripts": {
                "submitted": self.transcripts.submitted,
                "max_running": self.transcripts.max_running,
                "running": self.transcripts.running,
            },
            "streaming": self.streaming.report(),
            "uploads": len(self.uploads),
            "transcript_gets": sum(
                1 for x in self.seen if x["method"] == "GET" and x["path"].startswith("/v2/transcript/")
            ),
            "transcript_posts": sum(
                1 for x in self.seen if x["method"] == "POST" and x["path"] == "/v2/transcript"
            ),
        }


SIM: web.AppKey[Sim] = web.AppKey("sim", Sim)
KEY: web.RequestKey[str] = web.RequestKey("key", str)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def build_sim_app(sim: Sim | None = None) -> web.Application:
    sim = sim or Sim()

    @web.middleware
    async def account(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authenticate, then count the request against the account window at arrival."""
        path = request.path
        if path.startswith("/_sim"):
            return await handler(request)
        public = request.method == "GET" and path.rstrip("/") == "/v1/models"
        ws_token = path == "/v3/ws" and "token" in request.query
        key = request.headers.get(hdrs.AUTHORIZATION, "")
        if not public and not ws_token and not _valid_key(sim, key):
            return _record(sim, request, _error(401, AUTH_ERROR))
        now = time.monotonic()
        counts = path != "/v3/ws" and (sim.config.count_reads or request.method not in READS)
        if counts and not sim.requests.arrive(now):
            sim.recorder.violate("requests", "requests", now, f"{request.method} {path}")
            retry = max(1, int(sim.requests.reset_in(now) + 0.999))
            return _record(sim, request, _error(429, "Too Many Requests", {hdrs.RETRY_AFTER: str(retry)}))
        request[KEY] = key
        return _record(sim, request, await handler(request))

    app = web.Application(middlewares=[account], client_max_size=3 * 1024**3)
    app[SIM] = sim

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        yield
        await sim.transcripts.close()

    app.cleanup_ctx.append(lifecycle)
    r = app.router
    r.add_post("/v2/upload", _upload)
    r.add_post("/v2/transcript", _create)
    r.add_get("/v2/transcript", _list)
    r.add_get("/v2/transcript/{id}", _get)
    r.add_delete("/v2/transcript/{id}", _delete)
    r.add_get("/v2/transcript/{id}/{sub}", _sub)
    r.add_post("/v1/chat/completions", _chat)
    r.add_post("/v1/understanding", _understanding)
    r.add_get("/v1/models", _models)
    r.add_get("/v3/token", _token)
    r.add_get("/v3/ws", _ws)
    r.add_get("/_sim/report", _report)
    r.add_post("/_sim/reset", _reset)
    r.add_post("/_sim/config", _configure)
    return app


def _valid_key(sim: Sim, key: str) -> bool:
    if not key:
        return False
    return sim.config.keys is None or key in sim.config.keys


def _record(sim: Sim, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    sim.seen.append(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "status": resp.status,
            "at": time.monotonic(),
            "headers": dict(request.headers),
        }
    )
    return resp


# -- REST v2 --------------------------------------------------------------------------------
async def _upload(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    if sim.config.negative_balance:
        return _error(400, NEGATIVE_BALANCE)
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
    upload_id = uuid.uuid4().hex
    sim.uploads[upload_id] = size
    return web.json_response({"upload_url": f"https://cdn.assemblyai.sim/upload/{upload_id}"})


async def _json(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "Invalid JSON body")
    if not isinstance(body, dict):
        return _error(400, "Invalid JSON body")
    return body


async def _create(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await _json(request)
    if isinstance(body, web.Response):
        return body
    if sim.config.negative_balance:
        return _error(400, NEGATIVE_BALANCE)
    if not isinstance(body.get("audio_url"), str) or not body["audio_url"]:
        return _error(400, "audio_url is required")
    if body.get("speech_model") not in (None, "best", "nano", "slam-1", "universal"):
        return _error(400, f"Invalid speech_model: {body['speech_model']!r}")
    job = sim.transcripts.create(request[KEY], body)
    hint = parse_qs(urlparse(body["audio_url"]).query).get("sim_post_seconds")
    delay = float(hint[0]) if hint else sim.config.post_latency_s
    if delay:
        await asyncio.sleep(delay)  # the job exists upstream; its creator has not heard yet
    return web.json_response(job.view())


def _job(request: web.Request) -> Job | web.Response:
    job = request.app[SIM].transcripts.jobs.get(request.match_info["id"])
    if job is None or job.key != request[KEY] and request.app[SIM].config.keys is not None:
        return _error(404, "Transcript not found")
    return job


async def _get(request: web.Request) -> web.Response:
    job = _job(request)
    return job if isinstance(job, web.Response) else web.json_response(job.view())


async def _delete(request: web.Request) -> web.Response:
    job = _job(request)
    if isinstance(job, web.Response):
        return job
    if job.status in ("queued", "processing"):
        return _error(400, "Transcript is still being processed and cannot be deleted")
    request.app[SIM].transcripts.delete(job)
    return web.json_response(job.view())


async def _sub(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    if isinstance(job, web.Response):
        return job
    sub = request.match_info["sub"]
    if job.status != "completed":
        return _error(400, f"Transcript is not completed (status: {job.status})")
    view = job.view()
    if sub == "sentences":
        return web.json_response(
            {
                "id": job.id,
                "sentences": job.sentences(),
                "confidence": 0.98,
                "audio_duration": job.audio_duration,
            }
        )
    if sub == "paragraphs":
        return web.json_response(
            {
                "id": job.id,
                "paragraphs": job.sentences(),
                "confidence": 0.98,
                "audio_duration": job.audio_duration,
            }
        )
    if sub == "srt":
        return web.Response(text=f"1\n00:00:00,000 --> 00:00:01,000\n{job.text()}\n")
    if sub == "vtt":
        return web.Response(text=f"WEBVTT\n\n00:00.000 --> 00:01.000\n{job.text()}\n")
    if sub == "word-search":
        words = [w for w in request.query.get("words", "").split(",") if w]
        matches = [
            {"text": w, "count": 1, "timestamps": [[0, 400]], "indexes": [0]}
            for w in words
            if w.lower() in job.text().lower()
        ]
        return web.json_response({"id": job.id, "total_count": len(matches), "matches": matches})
    if sub == "redacted-audio":
        if not view.get("redact_pii_audio"):
            return _error(400, "Redacted audio is only available when redact_pii_audio was enabled")
        return web.json_response(
            {
                "status": "redacted_audio_ready",
                "redacted_audio_url": f"https://cdn.assemblyai.sim/redacted/{job.id}",
            }
        )
    return _error(404, "Not found")


async def _list(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    q = request.query
    limit = max(1, min(200, int(q.get("limit", "10"))))
    jobs = [sim.transcripts.jobs[i] for i in reversed(sim.transcripts.order)]
    if sim.config.keys is not None:
        jobs = [j for j in jobs if j.key == request[KEY]]
    if "status" in q:
        jobs = [j for j in jobs if j.status == q["status"]]
    if "before_id" in q:
        ids = [j.id for j in jobs]
        jobs = jobs[ids.index(q["before_id"]) + 1 :] if q["before_id"] in ids else []
    page = jobs[:limit]
    base = sim.config.public_api_url or f"{request.scheme}://{request.host}"
    current = f"{base}/v2/transcript?limit={limit}"
    details = {
        "limit": limit,
        "result_count": len(page),
        "current_url": current,
        "prev_url": f"{base}/v2/transcript?limit={limit}&before_id={page[-1].id}" if page else None,
        "next_url": f"{base}/v2/transcript?limit={limit}&after_id={page[0].id}" if page else None,
    }
    items = [
        {
            "id": j.id,
            "resource_url": f"{base}/v2/transcript/{j.id}",
            "status": j.status,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(j.created_wall)),
            "completed": None,
            "audio_url": j.body.get("audio_url"),
            "error": j.error,
        }
        for j in page
    ]
    return web.json_response({"page_details": details, "transcripts": items})


# -- LLM Gateway -----------------------------------------------------------------------------
def _llm_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"message": message, "code": code, "request_id": uuid.uuid4().hex}, status=status, headers=headers
    )


async def _chat(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    if sim.config.free_plan:
        return _llm_error(403, "forbidden", "LLM Gateway is not available on the free tier")
    body = await _json(request)
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
    usage = {
        "input_tokens": 12,
        "output_tokens": 6,
        "prompt_tokens": 12,
        "completion_tokens": 6,
        "total_tokens": 18,
    }
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
            if i == len(answer.split()) - 1:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return web.json_response(
        {
            "request_id": uuid.uuid4().hex,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
            ],
            "usage": usage,
            "response_time": 1_000_000,
        }
    )


async def _understanding(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await _json(request)
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
    return web.json_response(
        {
            "request_id": uuid.uuid4().hex,
            "speech_understanding": {"response": {"transcript_id": body.get("transcript_id")}},
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


# -- Streaming v3 -----------------------------------------------------------------------------
async def _token(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    try:
        expires = int(request.query.get("expires_in_seconds", "60"))
    except ValueError:
        expires = 0
    if not 1 <= expires <= 600:
        return _error(400, "expires_in_seconds must be between 1 and 600")
    return web.json_response({"token": sim.streaming.issue_token(expires), "expires_in_seconds": expires})


async def _ws(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    token = request.query.get("token")
    if token is not None and not sim.streaming.take_token(token):
        return _error(401, AUTH_ERROR)
    return await sim.streaming.handle(request, request.get(KEY, "") or f"token:{token}")


# -- admin ------------------------------------------------------------------------------------
async def _report(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].report())


async def _reset(request: web.Request) -> web.Response:
    request.app[SIM].reset()
    return web.json_response({"status": "reset"})


async def _configure(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    changes = await request.json()
    sim.config = SimConfig.from_dict({**asdict(sim.config), **changes})
    if any(k != "negative_balance" and k != "llm_latency_s" and k != "job_seconds" for k in changes):
        sim.reset()
    return web.json_response(asdict(sim.config))
