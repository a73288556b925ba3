"""The simulator's config and state: its limits' windows, jobs, sessions, bills and faults,
and what ``GET /_sim/report`` shows of them (the routes: app.py, rest.py, llm.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

from .recorder import Recorder, RollingWindow
from .streaming import StreamingService
from .transcripts import TranscriptService

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
    llm_stream_delay_s: float = 0.0  # between an SSE answer's chunks
    keys: list[str] | None = None  # None: any non-empty key is valid
    public_api_url: str | None = None  # absolute URLs in page_details; default: this server
    negative_balance: bool = False
    webhook_retry_s: float = 10.0
    free_plan: bool = False
    faults: dict[str, Any] = field(default_factory=dict)  # see app.py's docstring

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
        self.llm_billed: list[dict[str, Any]] = []  # path, model, customer, tokens of each answer
        self.llm_drawn = 0  # token counts drawn: each answer's seed
        self.arm_faults()

    def arm_faults(self) -> None:
        """Take the config's ``faults`` afresh: counts full, nothing applied yet."""
        plan = self.config.faults
        kinds = plan.get("kinds") or {}
        self.faults_left: dict[str, int] = {k: int(kinds.get(k, 0)) for k in FAULT_KINDS}
        self.faults_seen = 0  # matching requests so far
        self.faults_applied: list[dict[str, Any]] = []

    def next_fault(self, request: web.Request) -> dict[str, Any] | None:
        """The fault this request gets, if any: its entry in ``faults_applied``."""
        plan = self.config.faults
        paths = plan.get("paths") or ["/"]
        if not any(self.faults_left.values()) or request.path.startswith("/_sim") or request.path == "/v3/ws":
            return None
        if not any(request.path.startswith(p) for p in paths):
            return None
        self.faults_seen += 1
        if self.faults_seen % max(1, int(plan.get("every", 1))):
            return None
        turn = len(self.faults_applied) and FAULT_KINDS.index(self.faults_applied[-1]["kind"]) + 1
        kinds = [k for k in FAULT_KINDS[turn:] + FAULT_KINDS[:turn] if self.faults_left.get(k, 0) > 0]
        kind = kinds[0]  # (some kind has a count left: checked above)
        self.faults_left[kind] -= 1
        entry = {"kind": kind, "method": request.method, "path": request.path, "cut_bills": []}
        self.faults_applied.append(entry)
        return entry

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
            "llm_billed": self.llm_billed,
            "uploads": len(self.uploads),
            "faults": self.faults_applied,
            "transcript_gets": sum(
                1 for x in self.seen if x["method"] == "GET" and x["path"].startswith("/v2/transcript/")
            ),
            "transcript_posts": sum(
                1 for x in self.seen if x["method"] == "POST" and x["path"] == "/v2/transcript"
            ),
        }


FAULT_KINDS = ("5xx", "reset", "hang", "slow", "cut")
SIM: web.AppKey[Sim] = web.AppKey("sim", Sim)
KEY: web.RequestKey[str] = web.RequestKey("key", str)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def read_json(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 upstream answers."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return error(400, "Invalid JSON body")
    if not isinstance(body, dict):
        return error(400, "Invalid JSON body")
    return body
