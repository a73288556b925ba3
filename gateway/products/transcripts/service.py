"""Pre-recorded transcription through the gateway: the account's concurrency held until each
job ends, a durable queue in front of it, and polling coalesced.

``POST /v2/transcript`` records a job (jobs.py) before anything else. When the account has a
free concurrency lease and no older job waits, the job is submitted at once and the client
gets upstream's answer; otherwise the client gets, at once, what upstream answers for a
queued job (200, ``status: "queued"``), and a dispatcher on some instance submits it when
its turn comes. Either way the client only ever sees the gateway's job id.

While a job runs, a client's GET is answered from what the gateway knows, refreshed from
upstream at most once per ``transcripts.poll_refresh_s`` per job; when upstream reports the
job ended, its concurrency lease is released and the client gets upstream's real response.

How a job ends, whoever learns it first, is ending.py's; the transcript list is
list_route.py's. This module holds the jobs' own routes and the parts wired together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import hdrs, web

from ...admission.engine import AdmissionEngine
from ...admission.health import stop_tasks, supervise
from ...clock import Clock
from ...config import Config
from ...errors import BadRequest, Conflict, GatewayError, NotFound, StoreUnavailable
from ...identity import Auth, identity_of, owner_of
from ...metrics import Metrics
from ...proxy.forward import Upstream
from ...proxy.handler import ProxyHandler
from ...proxy.headers import admitted_headers, policy
from ...proxy.plan import Plan
from ...usage import Usage, billing_of, customer_of, line_of
from ...vault import Vault
from ..bodies import read_object
from ..catalog import Catalog
from ..uploads import Uploads
from .dispatch import Dispatcher
from .ending import ENDED, Ending
from .ids import is_job_id, new_job_id, swap
from .jobs import Job, JobStore, State
from .journal import Journal
from .list_route import ListRoute
from .recent import RecentJobs
from .reconcile import Forgotten, Reconciler
from .webhooks import Relay, client_fields, split_webhook

log = logging.getLogger(__name__)

JOURNAL_EVERY_S = 0.5  # how often jobs kept while Redis was away are offered to it again

PRIORITY_HEADER = "X-AAI-Gateway-Priority"


class Transcripts:
    def __init__(
        self,
        cfg: Config,
        *,
        jobs: JobStore,
        engine: AdmissionEngine,
        catalog: Catalog,
        handler: ProxyHandler,
        upstream: Upstream,
        vault: Vault,
        metrics: Metrics,
        clock: Clock,
        wall: Callable[[], float] = time.time,
        journal: Journal | None = None,
        auth: Auth | None = None,
        uploads: Uploads | None = None,
        usage: Usage | None = None,
    ) -> None:
        """``journal``: where new submissions wait while Redis is away (fail_open), or None.
        ``auth``: who owns what (identity.py), and the account's key in managed mode.
        ``usage``: where a completed transcript's billed seconds are recorded (usage.py)."""
        self._cfg = cfg
        self._usage = usage
        self._auth = auth
        self._uploads = uploads
        self.journal = journal
        self._journal_task: asyncio.Task[None] | None = None
        self._t = cfg.transcripts
        self.jobs = jobs
        self._engine = engine
        self._catalog = catalog
        self._handler = handler
        self._vault = vault
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self._refreshing: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self.recent = RecentJobs()  # answers polls while Redis is away (recent.py)
        self.relay = Relay(cfg, vault, metrics)
        self.ending = Ending(
            cfg, jobs=jobs, engine=engine, catalog=catalog, handler=handler, vault=vault,
            metrics=metrics, relay=self.relay, credential=self.credential, wall=wall, usage=usage,
        )  # fmt: skip
        self.lists = ListRoute(
            cfg, jobs=jobs, recent=self.recent, catalog=catalog, handler=handler, vault=vault,
            find=self._find, owned=self._owned, auth=auth,
        )  # fmt: skip
        self.dispatcher = Dispatcher(
            cfg, jobs=jobs, engine=engine, catalog=catalog, upstream=upstream, vault=vault, clock=clock,
            metrics=metrics, wall=wall, on_end=self.ending.finish, on_submitted=self.recent.saw,
            credential=self.credential,
        )  # fmt: skip
        self.reconciler = Reconciler(
            cfg, jobs=jobs, catalog=catalog, handler=handler, vault=vault, dispatcher=self.dispatcher,
            metrics=metrics, lookup=self.ending.lookup, finish=self.ending.finish, renew=self.renew,
            forgotten=self.ending.forgotten, wall=wall, credential=self.credential,
        )  # fmt: skip

    def use_config(self, cfg: Config) -> None:
        """A reloaded config (gateway/reload.py): queue and proxy settings apply to requests
        from now on; ``transcripts.*``, ``upstream.*`` and ``public_url`` need a restart."""
        self._cfg = cfg
        self.ending.use_config(cfg)
        self.lists.use_config(cfg)

    def drain(self) -> None:
        """SIGTERM: dispatch nothing new (gateway/products/transcripts/dispatch.py)."""
        self.dispatcher.drain()

    async def start(self) -> None:
        await self.relay.start()
        await self.dispatcher.start()
        await self.reconciler.start()
        if self.journal is not None:
            self._journal_task = supervise("transcript-journal", self._move_journal)

    async def close(self) -> None:
        await stop_tasks(self._journal_task)
        await self.reconciler.close()
        await self.dispatcher.close()
        await self.relay.close()

    async def _move_journal(self) -> None:
        """Jobs kept while Redis was away go into it, in the order they came, once it answers."""
        assert self.journal is not None
        while True:
            await asyncio.sleep(JOURNAL_EVERY_S)
            moved = 0
            for entry, job, idem in self.journal.first(100):
                try:
                    await self.jobs.create(job, idempotency=idem or f"journal:{job.id}")
                except StoreUnavailable:
                    break
                self.journal.delete(entry)
                moved += 1
            if moved:
                log.warning("transcripts: %d jobs kept while Redis was away are queued in it now "
                            "(%d still kept)", moved, len(self.journal))  # fmt: skip
                self.dispatcher.kick()

    async def renew(self, job: Job) -> None:
        """The job still runs: its concurrency lease lasts another ``lease_ttl_s`` (restored if
        a Redis failover lost it: the work is running, so the store must count it)."""
        ttl_ms = int(self._t.lease_ttl_s * 1000)
        await self._engine.store.renew(job.ticket, self._catalog.async_jobs, ttl_ms, create=True)

    def credential(self, job: Job) -> str | None:
        """The key a job's upstream calls carry: the account's (managed mode), else the
        client's own, decrypted (None once the job ended and it was deleted)."""
        if self._auth is not None and self._auth.managed:
            return self._auth.upstream_key
        return self._vault.decrypt(job.cred) if job.cred else None

    # -- ids and ownership ---------------------------------------------------------------
    def _owned(self, job: Job, request: web.Request) -> bool:
        """Whether the caller owns the job: the same key (pass-through) or project (managed)."""
        owner = owner_of(request)
        return bool(owner) and self._vault.same(job.key_fp, owner)

    async def _job(self, request: web.Request, job_id: str) -> Job | None:
        """The gateway's job for ``job_id`` if the caller's key created it; None when the id
        is not the gateway's (an upstream id: forwarded as is); 404 for someone else's.
        While Redis is away: the journal's or this instance's last copy (StoreUnavailable
        when neither has it)."""
        managed = self._auth is not None and self._auth.managed
        if not is_job_id(job_id):
            if managed:  # upstream's own id: every project's, under the account key: nobody's here
                raise NotFound("Transcript not found")
            return None
        job = await self._find(job_id)
        if job is None:
            if managed:
                raise NotFound("Transcript not found")
            return None
        if not self._owned(job, request):
            raise NotFound("Transcript not found")
        return job

    async def _find(self, job_id: str) -> Job | None:
        try:
            job = await self.jobs.get(job_id)
        except StoreUnavailable:
            job = self.journal.get(job_id) if self.journal is not None else None
            if job is None:
                job = self.recent.get(job_id)
            if job is None:
                raise
            return job
        if job is None and self.journal is not None:  # kept here, not moved into Redis yet
            job = self.journal.get(job_id)
        elif job is not None:
            self.recent.saw(job)
        return job

    def _to_client(self, job: Job) -> dict[str, str]:
        return {job.upstream_id: job.id} if job.upstream_id else {}

    # -- POST /v2/transcript -------------------------------------------------------------
    async def create(self, request: web.Request) -> web.StreamResponse:
        # JSON whatever the Content-Type says (curl's default is form-encoded; upstream reads
        # it as JSON too), inflated if the client compressed it, and never more than a
        # transcript request needs: a larger body (as sent or inflated) is a 413, nothing stored.
        body = await read_object(request, self._t.max_request_bytes)
        if not isinstance(body.get("audio_url"), str) or not body["audio_url"].strip():
            raise BadRequest("`audio_url` is required: the URL of the audio or video file to transcribe")
        key = request.headers[hdrs.AUTHORIZATION]
        owner = owner_of(request)
        managed = self._auth is not None and self._auth.managed
        if managed and self._uploads is not None:  # another project's upload: 403, as upstream
            await self._uploads.check(body["audio_url"], owner)
        # The client's webhook stays here (checked now: one that can never be delivered is a 400).
        upstream_body, hook = split_webhook(body, self._vault, self.relay.policy)
        job = Job(
            id=new_job_id(),
            key_fp=owner,
            body=upstream_body,
            created_ms=int(self._wall() * 1000),
            priority=self._priority(request),
            cred=None if managed else self._vault.encrypt(key),  # managed: the account's key is used
            extra={"webhook": hook} if hook else {},
        )
        # What is billed when it completes (the body is not kept once submitted), and whose.
        line = line_of(identity_of(request), "transcription")
        billing = billing_of(body, customer_of(request))
        if self._usage is not None:  # held against the spend caps until it completes
            billing["hold"] = self._usage.transcript_hold(billing)
        job.extra["billing"] = {**billing, "project": line.project, "key": line.key}
        idem = request.headers.get("Idempotency-Key")
        idempotency = f"{owner}:{idem}" if idem else None
        try:
            created = await self.jobs.create(job, idempotency=idempotency)
        except StoreUnavailable:
            if self.journal is None:
                raise
            # Redis is away (fail_open): kept here, moved into Redis in order when it returns.
            kept = self.journal.add(job, idempotency)
            log.warning("transcripts: Redis unavailable; job %s kept in the local journal", kept.id)
            return web.json_response(
                self.view(kept), headers={"RateLimit-Policy": policy(self._catalog.async_jobs)}
            )
        if created.id != job.id:  # the same Idempotency-Key again: the same job
            return await self.get(request, created.id) or web.json_response(self.view(created))
        if self._usage is not None:
            await self._usage.hold(created.id, line, job.extra["billing"])
        self._metrics.child(self._metrics.jobs_created).inc()
        self.recent.saw(created)
        answer = await self.dispatcher.try_now(created)
        if answer is None:  # queued in the gateway: answered the way upstream answers a queued job
            limit = self._catalog.async_jobs
            return web.json_response(self.view(created), headers={"RateLimit-Policy": policy(limit)})
        headers = admitted_headers(answer.grant.limits, answer.grant.states) if answer.grant else {}
        if answer.job is None:  # upstream refused it at once: the client sees upstream's answer
            return web.json_response(answer.doc, status=answer.status, headers=headers)
        return web.json_response(self.view(answer.job), headers=headers)

    def _priority(self, request: web.Request) -> int:
        if not self._t.trust_priority_header:
            return 0
        try:
            return min(max(int(request.headers.get(PRIORITY_HEADER, "0")), 0), 99)
        except ValueError:
            raise BadRequest(f"{PRIORITY_HEADER} must be an integer from 0 to 99") from None

    def view(self, job: Job) -> dict[str, Any]:
        """What the client sees: upstream's last view of a running job under the client's
        id, or the shape upstream gives a transcript, from what the gateway keeps (a queued
        job's body; an ended job's ids, status and error: never its body, never its text)."""
        if job.snapshot is not None and job.state is not State.ENDED:
            return dict(self.client_doc(job, job.snapshot))
        out: dict[str, Any] = {"audio_url": ""}  # the SDK needs a string
        out.update(job.body)
        out.update(id=job.id, status=job.status, text=None, words=None, utterances=None, confidence=None)
        out.update(audio_duration=None, error=job.error or None, webhook_status_code=None)
        if job.state is State.ENDED and job.snapshot is not None:
            out.update(self.client_doc(job, job.snapshot))
            out["id"] = job.id
        out.update(client_fields(job))
        return out

    def client_doc(self, job: Job, doc: Any) -> Any:
        """An upstream document as the client should see it: its ids, its own webhook."""
        doc = swap(doc, self._to_client(job))
        if isinstance(doc, dict) and "webhook_url" in doc:
            doc.update(client_fields(job))
        return doc

    # -- GET /v2/transcript/{id} ---------------------------------------------------------
    async def get(self, request: web.Request, job_id: str) -> web.StreamResponse | None:
        try:
            job = await self._job(request, job_id)
        except StoreUnavailable:
            if self.journal is None:  # fail_closed
                raise
            # Redis is away and this instance never saw the job: "queued" until it returns
            # (an SDK waiting for the job keeps waiting; a 503 would end its wait in error).
            log.info("transcripts: Redis unavailable; job %s unknown here, answered as queued", job_id)
            return web.json_response(self.view(Job(id=job_id, key_fp="", body={}, created_ms=0)))
        if job is None:
            return None
        self._metrics.child(self._metrics.job_polls).inc()
        if job.state is State.SUBMITTED:
            every_s = self._t.poll_refresh_with_webhooks_s if self._cfg.public_url else self._t.poll_refresh_s
            stale = self._wall() * 1000 - job.refreshed_ms >= every_s * 1000
            if stale:
                snapshot = await self._refresh(job, request)
                if snapshot is not None:
                    job.snapshot = snapshot
                elif job.extra.get("forgotten"):  # it ended now: its view is the gateway's
                    job = await self.jobs.get(job.id) or job
            return web.json_response(self.view(job))
        if job.state is State.ENDED and job.upstream_id and not job.extra.get("forgotten"):
            return await self._forward(request, job, f"/v2/transcript/{job.upstream_id}")
        return web.json_response(self.view(job))

    async def _refresh(self, job: Job, request: web.Request) -> dict[str, Any] | None:
        """Upstream's view of a running job, once for every poll that asks meanwhile."""
        pending = self._refreshing.get(job.id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._refreshing[job.id] = fut
        snapshot = None
        try:
            try:
                snapshot = await self.ending.lookup(job, request.headers[hdrs.AUTHORIZATION])
            except Forgotten:
                await self.ending.forgotten(job)
            if snapshot is not None:
                # This instance's copy too: while Redis is away it is all there is, and the
                # next poll within poll_refresh_s is answered from it.
                job.refreshed_ms = int(self._wall() * 1000)
                if snapshot.get("status") in ENDED:
                    await self.ending.finish(job, snapshot)
                else:
                    await self.jobs.refreshed(job.id, snapshot)
                    await self.renew(job)
        except GatewayError as exc:
            # Redis away (StoreUnavailable) included: the client still gets upstream's view;
            # the job's end is learnt again from upstream once Redis answers (a poll, the
            # reconciler).
            log.info("refreshing job %s failed (%s); answering from what the gateway knows", job.id, exc)
        finally:
            del self._refreshing[job.id]
            fut.set_result(snapshot)
        return snapshot

    # -- the routes of ending.py and list_route.py ------------------------------------
    async def webhook(self, request: web.Request, job_id: str, token: str) -> web.Response:
        """Upstream's webhook for a job (ending.py)."""
        return await self.ending.webhook(request, job_id, token)

    async def list_transcripts(self, request: web.Request) -> web.StreamResponse:
        """``GET /v2/transcript`` (list_route.py)."""
        return await self.lists.list_transcripts(request)

    # -- the other transcript routes ----------------------------------------------------
    async def delete(self, request: web.Request, job_id: str) -> web.StreamResponse | None:
        job = await self._job(request, job_id)
        if job is None:
            return None
        if job.state is State.QUEUED:
            message = "Deleted while queued in the gateway: it was never submitted"
            await self.ending.finish(job, None, error=message, notify=False)
            ended = await self.jobs.get(job.id)
            return web.json_response(self.view(ended or job))
        if job.state is State.CLAIMED:
            raise Conflict("The transcript is being submitted right now; delete it again in a moment")
        return await self._forward(request, job, f"/v2/transcript/{job.upstream_id}")

    async def sub_resource(self, request: web.Request, job_id: str, sub: str) -> web.StreamResponse | None:
        job = await self._job(request, job_id)
        if job is None:
            return None
        if not job.upstream_id:
            raise BadRequest(f"Transcript is not completed (status: {job.status})")
        raw = request.rel_url.raw_query_string  # as the client encoded it
        query = f"?{raw}" if raw else ""
        return await self._forward(request, job, f"/v2/transcript/{job.upstream_id}/{sub}{query}")

    async def _forward(self, request: web.Request, job: Job, path: str) -> web.StreamResponse:
        plan = Plan(
            "rest", self._cfg.upstream.api_url,
            self._catalog.account_window("rest", request.method), self._cfg.queue.max_wait_s, b"",
            path=path, rewrite=lambda doc: self.client_doc(job, doc),
        )  # fmt: skip
        resp = await self._handler.forward(request, plan)
        if request.method == hdrs.METH_DELETE and resp.status == 200:
            self.recent.forget(job.id)
            try:
                if job.state is not State.ENDED:
                    await self.ending.finish(job, None)
                await self.jobs.purge(job.id)  # deleted upstream: nothing of it stays here either
            except StoreUnavailable as exc:
                # Deleted upstream all the same: once Redis answers, the reconciler finds it
                # ended there and frees its lease; its record goes with its retention.
                log.warning("transcripts: job %s deleted upstream; its record stays for now: %s", job.id, exc)
        return resp

    # -- ids in other products' bodies (LLM Gateway) -------------------------------------
    async def to_upstream(self, ids: list[str], owner: str) -> dict[str, str]:
        """Job ids in a request body -> upstream ids (only the caller's: ``owner``, as
        identity.py names it). A job not submitted yet is a 400."""
        out: dict[str, str] = {}
        managed = self._auth is not None and self._auth.managed
        for job_id in ids:
            job = await self._find(job_id) if is_job_id(job_id) else None
            if job is None:
                if managed:  # not a job of the gateway's: no project's (upstream's id included)
                    raise NotFound("Transcript not found")
                continue
            if not owner or not self._vault.same(job.key_fp, owner):
                if self._auth is not None and self._auth.managed:  # another project's: as upstream
                    raise NotFound("Transcript not found")
                continue
            if not job.upstream_id:
                raise BadRequest(f"Transcript {job_id} is still queued in the gateway (status: {job.status})")
            out[job_id] = job.upstream_id
        return out
