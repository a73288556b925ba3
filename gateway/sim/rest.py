"""The simulator's REST v2: uploads and transcripts (create, get, delete, sub-resources, the
list paged as upstream pages it)."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import parse_qs, urlparse

from aiohttp import web

from .state import KEY, NEGATIVE_BALANCE, SIM, error, read_json
from .transcripts import Job


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_post("/v2/upload", _upload)
    r.add_post("/v2/transcript", _create)
    r.add_get("/v2/transcript", _list)
    r.add_get("/v2/transcript/{id}", _get)
    r.add_delete("/v2/transcript/{id}", _delete)
    r.add_get("/v2/transcript/{id}/{sub}", _sub)


async def _upload(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    if sim.config.negative_balance:
        return error(400, NEGATIVE_BALANCE)
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
    upload_id = uuid.uuid4().hex
    sim.uploads[upload_id] = size
    return web.json_response({"upload_url": f"https://cdn.assemblyai.sim/upload/{upload_id}"})


async def _create(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if sim.config.negative_balance:
        return error(400, NEGATIVE_BALANCE)
    if not isinstance(body.get("audio_url"), str) or not body["audio_url"]:
        return error(400, "audio_url is required")
    if body.get("speech_model") not in (None, "best", "nano", "slam-1", "universal"):
        return error(400, f"Invalid speech_model: {body['speech_model']!r}")
    job = sim.transcripts.create(request[KEY], body)
    hint = parse_qs(urlparse(body["audio_url"]).query).get("sim_post_seconds")
    delay = float(hint[0]) if hint else sim.config.post_latency_s
    if delay:
        await asyncio.sleep(delay)  # the job exists upstream; its creator has not heard yet
    return web.json_response(job.view())


def _job(request: web.Request) -> Job | web.Response:
    job = request.app[SIM].transcripts.jobs.get(request.match_info["id"])
    if job is None or job.key != request[KEY] and request.app[SIM].config.keys is not None:
        return error(404, "Transcript not found")
    return job


async def _get(request: web.Request) -> web.Response:
    job = _job(request)
    return job if isinstance(job, web.Response) else web.json_response(job.view())


async def _delete(request: web.Request) -> web.Response:
    job = _job(request)
    if isinstance(job, web.Response):
        return job
    if job.status in ("queued", "processing"):
        return error(400, "Transcript is still being processed and cannot be deleted")
    request.app[SIM].transcripts.delete(job)
    return web.json_response(job.view())


async def _sub(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    if isinstance(job, web.Response):
        return job
    sub = request.match_info["sub"]
    if job.status != "completed":
        return error(400, f"Transcript is not completed (status: {job.status})")
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
            return error(400, "Redacted audio is only available when redact_pii_audio was enabled")
        return web.json_response(
            {
                "status": "redacted_audio_ready",
                "redacted_audio_url": f"https://cdn.assemblyai.sim/redacted/{job.id}",
            }
        )
    return error(404, "Not found")


async def _list(request: web.Request) -> web.Response:
    """Newest first. ``before_id``/``after_id`` bound the list by creation order (whatever
    the filters say of the named transcript; an unknown one: nothing). With ``after_id``
    alone the page is the ``limit`` transcripts just after it (so ``next_url`` walks toward
    the newest without skipping); otherwise the ``limit`` newest of what is left."""
    sim = request.app[SIM]
    q = request.query
    limit = max(1, min(200, int(q.get("limit", "10"))))
    order = sim.transcripts.order  # oldest first
    lo, hi = -1, len(order)  # positions strictly between are candidates
    for name in ("before_id", "after_id"):
        if name in q:
            at = order.index(q[name]) if q[name] in sim.transcripts.jobs else -2
            if at == -2:
                lo, hi = 0, 0  # an unknown transcript: nothing
            elif name == "before_id":
                hi = min(hi, at)
            else:
                lo = max(lo, at)
    jobs = [sim.transcripts.jobs[i] for i in reversed(order[lo + 1 : hi])]
    if sim.config.keys is not None:
        jobs = [j for j in jobs if j.key == request[KEY]]
    if q.get("throttled_only", "").lower() == "true":  # overrides the status filter
        jobs = [j for j in jobs if j.throttled]
    elif "status" in q:
        jobs = [j for j in jobs if j.status == q["status"]]
    if "created_on" in q:
        jobs = [j for j in jobs if _day(j.created_wall) == q["created_on"]]
    page = jobs[-limit:] if "after_id" in q and "before_id" not in q else jobs[:limit]
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


def _day(wall: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(wall))
