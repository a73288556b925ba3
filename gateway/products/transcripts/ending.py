"""How a transcription job ends, whoever learns it first: a poll's refresh, upstream's
webhook, the dispatcher (a job upstream refused) or the reconciler (a job nobody asked about).

``finish`` is the one place a job's end is recorded: a completed transcript's usage first (by
the job's id, so once however many instances see it end), then the job marked ended, its
concurrency lease given back and the client's webhook told, once. ``lookup`` reads upstream's
view of a job; ``forgotten`` ends a job upstream no longer knows; ``webhook`` is upstream's
own notice that a job ended.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web

from ...admission.engine import AdmissionEngine
from ...config import Config
from ...errors import BadGateway, BadRequest, GatewayError, NotFound
from ...ledger import Line
from ...metrics import Metrics
from ...proxy.handler import ProxyHandler
from ...proxy.plan import Plan
from ...usage import Usage
from ...vault import Vault
from ..bodies import parse_object
from ..catalog import Catalog
from .jobs import Job, JobStore, State, ended_snapshot
from .reconcile import Forgotten
from .webhooks import Relay, receiver_token, redacted_audio_event

log = logging.getLogger("gateway.products.transcripts.service")  # its lines, as before the split
# A completed job's duration read, the last step before its end frees its concurrency slot:
# ahead of clients' requests in the window's queue (a client saturating the window otherwise
# held every slot seconds longer: bench/overload_exactness.py saw transcripts at ~20%).
ENDING_PRIORITY = 99

ENDED = frozenset({"completed", "error"})
FORGOTTEN = "AssemblyAI no longer knows this transcript (it was lost upstream); submit it again"


class Ending:
    def __init__(
        self,
        cfg: Config,
        *,
        jobs: JobStore,
        engine: AdmissionEngine,
        catalog: Catalog,
        handler: ProxyHandler,
        vault: Vault,
        metrics: Metrics,
        relay: Relay,
        credential: Callable[[Job], str | None],
        wall: Callable[[], float] = time.time,
        usage: Usage | None = None,
    ) -> None:
        """``relay``: the client webhooks (webhooks.py). ``credential``: the key a job's
        upstream calls carry (Transcripts.credential). ``usage``: where a completed
        transcript's billed seconds are recorded (usage.py)."""
        self._cfg = cfg
        self._t = cfg.transcripts
        self.jobs = jobs
        self._engine = engine
        self._catalog = catalog
        self._handler = handler
        self._vault = vault
        self._metrics = metrics
        self.relay = relay
        self.credential = credential
        self._wall = wall
        self._usage = usage

    def use_config(self, cfg: Config) -> None:
        """A reloaded config (Transcripts.use_config)."""
        self._cfg = cfg

    async def lookup(self, job: Job, key: str, *, priority: int = 0) -> dict[str, Any] | None:
        """GET the job upstream (a window token like any request); None if that failed;
        Forgotten if upstream says it does not know the job (404). ``priority``: its place
        in the window's queue (the read that ends a job goes first: ENDING_PRIORITY)."""
        self._metrics.child(self._metrics.job_refreshes).inc()
        plan = Plan(
            "rest", self._cfg.upstream.api_url, self._catalog.account_window("rest", "GET"), 10.0, b"",
            priority=priority,
        )  # fmt: skip
        status, _, data = await self._handler.fetch(
            plan, "GET", f"/v2/transcript/{job.upstream_id}", {hdrs.AUTHORIZATION: key}
        )
        if status == 404:
            raise Forgotten(job.upstream_id)
        if status != 200:
            return None
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return doc if isinstance(doc, dict) else None

    async def forgotten(self, job: Job) -> None:
        """Upstream no longer knows a running job (a restarted simulator, a purged account):
        it ends in error, its lease freed, its webhook told; its view comes from the gateway
        from now on (upstream would answer 404)."""
        log.warning("job %s: upstream no longer knows %s; it ends in error", job.id, job.upstream_id)
        await self.jobs.update_extra(job.id, {"forgotten": True})
        job.extra["forgotten"] = True
        await self.finish(job, {"id": job.upstream_id, "status": "error", "error": FORGOTTEN}, FORGOTTEN)

    async def finish(
        self,
        job: Job,
        snapshot: dict[str, Any] | None,
        error: str = "",
        *,
        notify: bool = True,
        upstream_id: str = "",
    ) -> None:
        """The job ended (upstream says so, or it never will run): release its lease and
        tell the client's webhook, once, whoever learnt it first. Of upstream's document only
        the ids, status, error and audio duration are kept (``ended_snapshot``). A completed
        transcript's usage is recorded first, by the job's id: recorded once, however many
        instances (a poll, a webhook) see it end, and never lost to a crash in between."""
        if self._usage is not None:
            snapshot = await self._billable_view(job, snapshot)
            billing = job.extra.get("billing") or {}
            project, key = str(billing.get("project", "")), str(billing.get("key") or job.key_fp[:16])
            who = Line(project, key, "transcription")
            await self._usage.transcript(job.id, who, billing, snapshot)
        before = await self.jobs.end(
            job.id,
            snapshot=ended_snapshot(snapshot) if snapshot is not None else None,
            error=error,
            retention_s=int(self._t.retention_days * 86400),
            upstream_id=upstream_id,
        )
        if before is None:
            return
        await self._engine.give_back(before.ticket, [self._catalog.async_jobs], tombstone=True)
        status = str((snapshot or {}).get("status") or "error")
        self._metrics.child(self._metrics.jobs_ended, status).inc()
        if before.created_ms:
            self._metrics.job_duration.observe(max(0.0, self._wall() - before.created_ms / 1000))
        if notify:
            self.relay.send(before, {"transcript_id": before.id, "status": status})

    async def _billable_view(
        self, job: Job, snapshot: dict[str, Any] | None, *, strict: bool = False
    ) -> dict[str, Any] | None:
        """A completed job's view with what billing needs: upstream's webhook says only
        ``completed``, so its duration is read upstream (one GET, admitted like any), once.
        ``strict``: a read that failed raises (GatewayError) instead of billing nothing."""
        if snapshot is None or snapshot.get("status") != "completed" or "audio_duration" in snapshot:
            return snapshot
        key = self.credential(job)
        if not job.upstream_id and isinstance(snapshot.get("id"), str) and snapshot["id"]:
            # Its webhook (authentic: the receiver's token) named it before the dispatcher
            # recorded the id (a POST whose answer was cut): read it by that id.
            job = dataclasses.replace(job, upstream_id=snapshot["id"])
        if not job.upstream_id or not key or job.state is State.ENDED:
            return snapshot
        try:
            view = await self.lookup(job, key, priority=ENDING_PRIORITY)
            if view is None and strict:
                raise BadGateway("upstream's view of the transcript could not be read")
            return view or snapshot
        except (Forgotten, GatewayError) as exc:
            if strict and not isinstance(exc, Forgotten):
                raise
            log.warning("usage: transcript %s ended; its duration could not be read: %s", job.id, exc)
            return snapshot

    async def webhook(self, request: web.Request, job_id: str, token: str) -> web.Response:
        """Upstream's webhook for a job: end it now, relay to the client. Only upstream knows
        the receiver's token; anything else is refused without a trace of the job."""
        if not self._vault.same(token, receiver_token(job_id, self._vault)):
            raise NotFound()
        job = await self.jobs.get(job_id)
        if job is None:
            raise NotFound()
        try:
            event = parse_object(await request.read())
        except BadRequest:
            event = {}
        status, upstream_id = event.get("status"), event.get("transcript_id")
        upstream_id = upstream_id if isinstance(upstream_id, str) else ""
        if job.upstream_id and upstream_id and upstream_id != job.upstream_id:
            return web.json_response({"status": "ok"})  # not about this job: nothing to do
        if status in ENDED:
            # Possibly before the dispatcher recorded the upstream id (a job that failed at
            # once): the id comes with the event, and the job ends all the same.
            snapshot = {"id": upstream_id or job.upstream_id, "status": status}
            if job.state in (State.CLAIMED, State.SUBMITTED):
                # Upstream is done with it: its concurrency slot is free from now, not once
                # the duration read below lands (it waits for a requests token: behind a
                # saturated window, seconds; bench/overload_exactness.py). Released for good
                # (tombstone): no renewal brings the lease back; finish() releases again,
                # harmlessly.
                await self._engine.give_back(job.ticket, [self._catalog.async_jobs], tombstone=True)
            try:  # the duration first: a read that fails must not end the job billed nothing
                if self._usage is not None:
                    snapshot = await self._billable_view(job, snapshot, strict=True) or snapshot
            except GatewayError:  # upstream retries its webhook; a poll or the reconciler may end it first
                return web.json_response({"error": "the transcript's duration could not be read"}, status=503)
            await self.finish(job, snapshot, upstream_id=upstream_id)
        elif (relayed := redacted_audio_event(job, event)) is not None:
            # Only the fields upstream sends, checked: never the POST's body as it came.
            self.relay.send(job, relayed)
        return web.json_response({"status": "ok"})
