"""Simulated pre-recorded transcription: jobs, the account's concurrency, webhooks.

A job is ``queued`` until one of the account's ``async_concurrency`` slots is free, then
``processing`` for its duration, then ``completed`` (or ``error``). Beyond the limit jobs
wait in FIFO order with ``throttled: true``: upstream never refuses them, and the recorder
notes each throttled job as a violation (the gateway must never let it happen).

Test hooks ride on the audio URL's query: ``sim_seconds`` (processing time),
``sim_fail=1`` (end in error), ``sim_audio=`` (audio_duration reported).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp

from .recorder import Recorder


@dataclass
class Job:
    id: str
    key: str
    body: dict[str, Any]
    created: float
    seconds: float
    fail: bool
    audio_duration: int
    channels: int = 1  # multichannel: how many (audio_url's sim_channels; default 2)
    status: str = "queued"
    throttled: bool = False
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    webhook_status_code: int | None = None
    deleted: bool = False
    created_wall: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        b = self.body
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "audio_url": b.get("audio_url"),
            "speech_model": b.get("speech_model"),
            "speech_models": b.get("speech_models"),
            "language_code": b.get("language_code", "en_us"),
            "webhook_url": b.get("webhook_url"),
            "webhook_auth": bool(b.get("webhook_auth_header_name")),
            "webhook_auth_header_name": b.get("webhook_auth_header_name"),
            "webhook_status_code": self.webhook_status_code,
            "throttled": self.throttled,
            "audio_duration": None,
            "text": None,
            "words": None,
            "utterances": None,
            "confidence": None,
            "error": self.error,
            "multichannel": b.get("multichannel"),
            "audio_channels": self.channels if b.get("multichannel") else None,
            "redact_pii_audio": b.get("redact_pii_audio"),
        }
        if self.status == "completed":
            words = [
                {"text": w, "start": i * 500, "end": i * 500 + 400, "confidence": 0.98, "speaker": None}
                for i, w in enumerate(self.text().split())
            ]
            out.update(text=self.text(), words=words, confidence=0.98, audio_duration=self.audio_duration,
                       speech_model_used=self.model())  # fmt: skip
        if self.deleted:
            out.update(text="Deleted by user.", words=None, audio_url="http://deleted_by_user")
        return out

    def text(self) -> str:
        return f"Simulated transcript {self.id}."

    def model(self) -> str:
        """The model it ran on: the first asked for (upstream's fallback order), else a default."""
        models = self.body.get("speech_models")
        if isinstance(models, list) and models:
            return str(models[0])
        return str(self.body.get("speech_model") or "universal-3-pro")

    def sentences(self) -> list[dict[str, Any]]:
        view = self.view()
        return [
            {
                "text": self.text(),
                "start": 0,
                "end": 1000,
                "confidence": 0.98,
                "words": view["words"],
                "speaker": None,
            }
        ]


class TranscriptService:
    def __init__(
        self,
        recorder: Recorder,
        *,
        concurrency: int,
        default_seconds: float,
        webhook_retry_s: float = 10.0,
        webhook_attempts: int = 10,
    ) -> None:
        self.recorder = recorder
        self.concurrency = concurrency
        self.default_seconds = default_seconds
        self.webhook_retry_s = webhook_retry_s
        self.webhook_attempts = webhook_attempts
        self.jobs: dict[str, Job] = {}
        self.order: list[str] = []
        self._queue: deque[str] = deque()
        self.running = 0
        self.max_running = 0
        self.submitted = 0
        self.webhook_log: list[dict[str, Any]] = []
        # What upstream bills, per completed transcript: id, model, seconds (× channels), the body.
        self.billed: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def create(self, key: str, body: dict[str, Any]) -> Job:
        hints = parse_qs(urlparse(str(body.get("audio_url", ""))).query)
        seconds = float(hints.get("sim_seconds", [self.default_seconds])[0])
        fail = hints.get("sim_fail", ["0"])[0] == "1"
        audio = int(float(hints.get("sim_audio", [max(1, round(seconds))])[0]))
        channels = int(hints.get("sim_channels", ["2"])[0]) if body.get("multichannel") else 1
        job = Job(uuid.uuid4().hex, key, body, time.monotonic(), seconds, fail, audio, channels)
        self.jobs[job.id] = job
        self.order.append(job.id)
        self.submitted += 1
        self._queue.append(job.id)
        self._pump()
        return job

    def _pump(self) -> None:
        now = time.monotonic()
        while self._queue and self.running < self.concurrency:
            job = self.jobs[self._queue.popleft()]
            if job.status != "queued":
                continue
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            job.status, job.started, job.throttled = "processing", now, False
            self._spawn(self._run(job))
        for job_id in self._queue:
            job = self.jobs[job_id]
            if not job.throttled:
                job.throttled = True
                self.recorder.violate("async_throttled", "async_concurrency", now, job.id)

    async def _run(self, job: Job) -> None:
        await asyncio.sleep(job.seconds)
        job.ended = time.monotonic()
        if job.fail:
            job.status, job.error = "error", "Simulated failure: the audio could not be decoded"
        else:
            job.status = "completed"
            seconds = job.audio_duration * job.channels
            self.billed.append({"id": job.id, "model": job.model(), "seconds": seconds, "body": job.body})
        self.running -= 1
        self._pump()
        url = job.body.get("webhook_url")
        if url:
            self._spawn(self._webhook(job, url))

    async def _webhook(self, job: Job, url: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        headers = {}
        name, value = job.body.get("webhook_auth_header_name"), job.body.get("webhook_auth_header_value")
        if name and value:
            headers[name] = value
        payload = {"transcript_id": job.id, "status": job.status}
        for attempt in range(1, self.webhook_attempts + 1):
            status = 0
            try:
                async with self._session.post(url, json=payload, headers=headers) as resp:
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            self.webhook_log.append(
                {"transcript_id": job.id, "url": url, "attempt": attempt, "status": status}
            )
            job.webhook_status_code = status or None
            if 200 <= status < 300 or 400 <= status < 500:
                return
            await asyncio.sleep(self.webhook_retry_s)

    def delete(self, job: Job) -> None:
        job.deleted = True
