"""The dispatcher: submits queued jobs upstream, in order, as the account's concurrency frees.

Every instance runs one. It waits, through the admission engine, on the first jobs of the
durable queue (the engine orders them by arrival across instances and wakes the right one
when a lease frees); the instance whose wait ends first claims the job (compare-and-set)
and POSTs it upstream with the job's own credential. The job's concurrency lease is held
under its ticket until the job ends; its window token is a fresh one per attempt.

Outcomes of a POST:
- 200: the upstream id is recorded (the job is now running); the lease is renewed from the
  short claim-time TTL to ``lease_ttl_s``;
- nothing left (the connect failed, or the request cannot be written at all): the window
  token goes back; a failed connect requeues the job, an unsendable request ends it in error;
- 429: upstream refused it (AssemblyAI throttles before creating anything): requeued under a
  new attempt (the window token stays spent);
- the outcome is unknown once bytes may have been written: a timeout, a lost connection, a
  5xx (a proxy in front of upstream may have lost the answer of a POST that created the
  job), a body cut short. The job is NOT requeued: it stays claimed, both leases kept, and
  is settled by the reconciler's search once its claim has lapsed (``Reconciler.settle``):
  found upstream -> adopted, shown absent -> requeued, found twice -> ended in error;
- upstream's negative-balance 400: requeued, and dispatching pauses, retried periodically;
- any other 4xx (a body upstream refuses, a key it does not know): the job ends in error with
  upstream's message, keeping only its id, status and error; or, when it was submitted at
  once while its client waited, it is deleted: the client has upstream's answer already, and
  nothing of a refused request is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from aiohttp import hdrs
from yarl import URL

from ...admission.engine import AdmissionEngine, Grant
from ...admission.health import stop_tasks, supervise
from ...admission.limits import Limit
from ...clock import Clock
from ...config import Config
from ...errors import GatewayError, StoreUnavailable, WaitTimeout
from ...metrics import Metrics
from ...proxy.forward import Connection, NeverLeft, Unsendable, Upstream, guard_s, translate
from ...vault import Vault
from ..catalog import Catalog
from .jobs import Job, JobStore, State
from .webhooks import receiver_url

log = logging.getLogger(__name__)

NEGATIVE_BALANCE = "balance is negative"


def claim_margin_s(claim_s: float) -> float:
    """Slack around a claim's deadline: a dispatch's POST ends this long before it, and the
    reconciler waits this long after it."""
    return min(2.0, claim_s / 5)


SCAN_S = 1.0

OnEnd = Callable[[Job, dict[str, Any] | None, str], Awaitable[None]]
OnUnknown = Callable[[Job], None]


def ahead_of_clients(priority: int) -> int:
    """A job's place in the engine's queues: its own priority, one step above clients'
    requests (0). A dispatcher first takes a concurrency slot, then waits for a requests
    token: behind a client saturating the window it held the slot idle for seconds
    (bench/overload_exactness.py: transcripts used ~30% of their slots). Jobs keep their
    order among themselves (99 and 98 alike are the highest)."""
    return min(99, max(0, priority) + 1)


class Submitted(NamedTuple):
    """What upstream answered a POST: its status and body, and the job as recorded (None
    when upstream refused it and the job ended)."""

    status: int
    doc: dict[str, Any]
    job: Job | None
    grant: Grant | None = None


class Dispatcher:
    def __init__(
        self,
        cfg: Config,
        *,
        jobs: JobStore,
        engine: AdmissionEngine,
        catalog: Catalog,
        upstream: Upstream,
        vault: Vault,
        clock: Clock,
        metrics: Metrics,
        wall: Callable[[], float] = time.time,
        on_end: OnEnd,
        on_submitted: Callable[[Job], None] | None = None,
        credential: Callable[[Job], str | None] | None = None,
    ) -> None:
        """``on_submitted(job)``: the job's record once upstream took it (this instance's
        copy for while Redis is away: recent.py). ``credential(job)``: the key its POST
        carries (the account's in managed mode; by default the client's, decrypted)."""
        self._cfg = cfg
        self._t = cfg.transcripts
        self._jobs = jobs
        self._engine = engine
        self._catalog = catalog
        self._upstream = upstream
        self._vault = vault
        self._clock = clock
        self._wall = wall
        self._on_end = on_end
        self._on_submitted = on_submitted
        self._credential = credential or (lambda job: vault.decrypt(job.cred) if job.cred else None)
        self._metrics = metrics
        self._waiting: dict[str, asyncio.Task[None]] = {}
        self._sending: set[str] = set()  # jobs of _waiting past their admission (claiming, POSTing)
        self._loop_task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self.paused_until = 0.0  # wall seconds; upstream reported a negative balance
        self.pause_reason = ""
        # Settles a job whose POST's outcome is unknown (the reconciler sets it).
        self.on_unknown: OnUnknown | None = None

    @property
    def limits(self) -> list[Limit]:
        return [self._catalog.async_jobs, *self._catalog.account_window("rest", "POST")]

    @property
    def _lookahead(self) -> int:
        return max(1, min(2 * self._catalog.async_jobs.capacity, 500))

    async def start(self) -> None:
        if self._engine.store.kind == "memory":
            await self._restore_leases()
        self._loop_task = supervise("transcript-dispatcher", self._run)

    def kick(self) -> None:
        """Look at the queue now (jobs were just added to it)."""
        self._kick.set()

    def drain(self) -> None:
        """SIGTERM: take no new job, wait for none; a job already admitted finishes its POST
        (within the shutdown grace; ``close`` ends the rest). Queued jobs stay queued in the
        store, in their place, for the dispatchers of the other instances."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        for job_id, task in list(self._waiting.items()):
            if job_id not in self._sending:
                task.cancel()

    async def close(self) -> None:
        await stop_tasks(self._loop_task, *self._waiting.values())

    async def _restore_leases(self) -> None:
        """The embedded store forgets leases on restart; jobs still running upstream keep theirs."""
        now_ms = int(self._wall() * 1000) + 1
        for job_id in await self._jobs.running(now_ms, 100_000):
            job = await self._jobs.get(job_id)
            if job is not None:
                ttl = int(self._t.lease_ttl_s * 1000)
                await self._engine.store.renew(job.ticket, self._catalog.async_jobs, ttl, create=True)

    # -- the POST path: submit at once when the job's turn is now ---------------------------
    async def try_now(self, job: Job) -> Submitted | None:
        """Submit a just-created job now if it is first in line and a lease is free: what
        upstream answered, or None when the job stays queued (the client hears "queued")."""
        if self.paused or await self._jobs.queued(1) != [job.id]:
            self._kick.set()
            return None
        try:
            grant = await self._admit(job, max_wait_s=0.0)
        except (WaitTimeout, StoreUnavailable):
            self._kick.set()
            return None
        answer = await self._claim_and_submit(job.id, grant, time.perf_counter(), at_once=True)
        return answer._replace(grant=grant) if answer is not None else None

    # -- the loop ------------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._wall() < self.paused_until

    async def _run(self) -> None:
        while True:
            try:
                await self._scan()
            except StoreUnavailable as exc:
                log.warning("dispatcher: store unavailable (%s)", exc.detail)
            except Exception:
                log.exception("dispatcher scan failed")
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), SCAN_S)

    async def _scan(self) -> None:
        if self.paused:
            return
        for job_id in await self._jobs.queued(self._lookahead):
            if job_id not in self._waiting:
                self._waiting[job_id] = asyncio.create_task(self._wait_and_submit(job_id))

    async def _wait_and_submit(self, job_id: str) -> None:
        try:
            job = await self._jobs.get(job_id)
            if job is None or job.state is not State.QUEUED:
                return
            age_s = self._wall() - job.created_ms / 1000
            if age_s > self._t.max_queue_age_s:
                await self._on_end(
                    job, None, f"Queued in the gateway for more than {self._t.max_queue_age_s:g}s"
                )
                return
            grant = await self._admit(job, max_wait_s=self._t.max_queue_age_s - age_s)
            self._sending.add(job_id)
            await self._claim_and_submit(job_id, grant, time.perf_counter())
        except WaitTimeout:
            self._kick.set()
        except GatewayError as exc:
            log.debug("dispatcher stopped waiting for %s: %s", job_id, exc)
        finally:
            self._waiting.pop(job_id, None)
            self._sending.discard(job_id)

    async def _admit(self, job: Job, *, max_wait_s: float) -> Grant:
        return await self._engine.admit(
            self.limits,
            ticket=job.ticket,
            seq=job.seq,
            priority=ahead_of_clients(job.priority),
            durable=True,
            max_wait_s=max_wait_s,
            max_depth=10**9,
            group="transcripts",
        )

    async def _claim_and_submit(
        self, job_id: str, grant: Grant, admitted_at: float, *, at_once: bool = False
    ) -> Submitted | None:
        """Claim the job, then have a connection in hand within the guard of the admission
        (ADMISSION.md I1: upstream counts the POST when it arrives), then submit it.

        Only the claim's holder gives the admission back: dispatchers on other instances may
        hold the same ticket (admission is idempotent per ticket), and a refund by one that
        lost the claim would cancel the token of the one that sent. If connecting outlasted
        the guard, nothing is sent: the admission goes back, the connection goes to the pool
        (warm for the job's next attempt), and the job is requeued in its place."""
        claim_ms = int(self._t.claim_s * 1000)
        claimed_at = self._clock.now()
        # The claimer is unique to this claim: a replayed claim script (a lost reply) finds
        # its own claim and returns it; two dispatch tasks of one instance never share one.
        claimer = f"{self._engine.instance}/{uuid.uuid4().hex[:12]}"
        job = await self._jobs.claim(job_id, claimer, claim_ms)
        if job is None:
            return None  # claimed elsewhere, cancelled, or ended: that owner holds the leases
        if self.paused:  # admitted meanwhile, but upstream refuses new work for now
            await self._engine.release(grant)
            await self.requeue(job)
            return None
        key = self._credential(job)
        if key is None:
            await self._on_end(job, None, "The job's credential is gone; it cannot be submitted")
            return None
        try:
            conn = self._upstream.idle(self._post_url, job.key_fp)
            conn = conn or await self._upstream.connect(self._post_url, job.key_fp)
        except NeverLeft as exc:  # nothing reached upstream: both tokens back
            log.warning("job %s: cannot connect upstream (%s); requeued", job.id, exc)
            await self._engine.release(grant)
            await self.requeue(job)
            return None
        if time.perf_counter() - admitted_at > guard_s(grant):
            self._upstream.give_back(conn)
            await self._engine.release(grant)
            log.info("job %s: connecting outlasted the guard; requeued, the connection kept warm", job.id)
            await self.requeue(job)
            return None
        return await self._submit(job, grant, conn, admitted_at, claimed_at, at_once=at_once)

    @property
    def _post_url(self) -> URL:
        return URL(self._cfg.upstream.api_url + "/v2/transcript", encoded=True)

    # -- submitting ------------------------------------------------------------------------
    async def _submit(
        self,
        job: Job,
        grant: Grant,
        conn: Connection,
        admitted_at: float,
        claimed_at: float,
        *,
        at_once: bool,
    ) -> Submitted | None:
        # The POST must be over before the claim lapses (the reconciler then takes the job):
        # give up rather than POST with too little of the claim left.
        margin = claim_margin_s(self._t.claim_s)
        left = self._t.claim_s - (self._clock.now() - claimed_at) - margin
        if left < margin:
            self._upstream.give_back(conn)
            await self._engine.release(grant)
            await self.requeue(job)
            return None
        key = self._credential(job)
        assert key is not None  # checked before the claim
        headers = {hdrs.AUTHORIZATION: key, hdrs.CONTENT_TYPE: "application/json"}
        body = dict(job.body)
        receiver = receiver_url(self._cfg, job.id, self._vault)
        if receiver is not None:  # upstream tells the gateway; the gateway tells the client
            body["webhook_url"] = receiver
        try:
            resp = await self._upstream.send(
                "POST", self._post_url, headers=headers, data=json.dumps(body).encode(),  # type: ignore[arg-type]
                group="rest", admitted_at=admitted_at, timeout_s=left, identity=job.key_fp, conn=conn,
            )  # fmt: skip
        except NeverLeft:
            self._upstream.give_back(conn)
            await self._engine.release(grant)  # nothing reached upstream: both tokens back
            await self.requeue(job)
            return None
        except Unsendable as exc:  # never sent, and never will be: both tokens back
            self._upstream.give_back(conn)
            await self._engine.release(grant)
            doc = {"error": f"The request cannot be sent upstream: {exc.message}"}
            return await self._outcome(job, 400, json.dumps(doc).encode(), at_once=at_once)
        except GatewayError as exc:  # bytes may have been written: upstream may have the job
            self._unknown(job, "timeout" if exc.status == 504 else "lost", str(exc))
            return None
        status = resp.status
        try:
            data = await resp.read()
        except (OSError, TimeoutError) as exc:  # the answer's body was lost on the way
            lost = translate(exc)
            if status == 200 or status >= 500:  # the job exists upstream, or may
                self._unknown(job, "cut", f"upstream's {status} was cut short ({lost})")
                return None
            log.warning("job %s: upstream's %s to the POST was cut short (%s); requeued",
                        job.id, status, lost)  # fmt: skip
            await self.requeue(job)
            return None
        finally:
            resp.release()
        return await self._outcome(job, status, data, at_once=at_once)

    async def _outcome(
        self, job: Job, status: int, data: bytes, *, at_once: bool = False
    ) -> Submitted | None:
        doc = _json(data)
        if status == 200 and isinstance(doc.get("id"), str):
            await self._jobs.submitted(job.id, doc["id"], doc)
            self._metrics.job_queue_wait.observe(max(0.0, self._wall() - job.created_ms / 1000))
            ttl = int(self._t.lease_ttl_s * 1000)  # it runs upstream: a lapsed claim lease is restored
            await self._engine.store.renew(job.ticket, self._catalog.async_jobs, ttl, create=True)
            submitted = await self._jobs.get(job.id)
            if submitted is not None and self._on_submitted is not None:
                self._on_submitted(submitted)
            if doc.get("status") in ("completed", "error") and submitted is not None:
                await self._on_end(submitted, doc, "")
            return Submitted(status, doc, submitted)
        message = str(doc.get("error") or doc.get("message") or f"upstream answered {status}")
        if status == 400 and NEGATIVE_BALANCE in message:
            self.paused_until = self._wall() + self._t.balance_retry_s
            self.pause_reason = message
            log.error(
                "upstream reports a negative balance: dispatching paused, jobs stay queued (%s)", message
            )
            await self.requeue(job)
            return None
        if status == 429:  # refused before anything was created: a definite no
            log.warning("job %s: upstream answered %s; requeued", job.id, status)
            await self.requeue(job)
            return None
        if status >= 500:  # a proxy in front may have lost the answer of a POST that created it
            self._unknown(job, "5xx", f"upstream answered {status}")
            return None
        if at_once and 400 <= status < 500:
            await self._discard(job)
        else:
            await self._on_end(job, {"id": job.id, "status": "error", "error": message}, message)
        return Submitted(status, doc, None)

    def _unknown(self, job: Job, cause: str, why: str) -> None:
        """The POST may have created the job upstream: it is not submitted again. It stays
        claimed with both its leases (the window token may have counted upstream; the job may
        be running) until the reconciler settles it by searching upstream for it, as soon as
        its claim lapses (no POST of this claim can arrive later than that)."""
        log.warning("job %s: outcome of its POST unknown (%s); kept claimed until found upstream "
                    "or shown absent", job.id, why)  # fmt: skip
        self._metrics.child(self._metrics.dispatch_unknown, cause).inc()
        if self.on_unknown is not None:
            self.on_unknown(job)

    async def _discard(self, job: Job) -> None:
        """Upstream refused a job submitted while its client waited: the client gets
        upstream's answer; the gateway keeps nothing of it, and its lease goes back."""
        await self._jobs.delete(job.id)
        await self._engine.give_back(job.ticket, [self._catalog.async_jobs], tombstone=True)
        self._metrics.child(self._metrics.jobs_ended, "refused").inc()

    async def requeue(self, job: Job) -> None:
        """Back in line under a new attempt; the old attempt's concurrency lease goes back.
        Only if the job is still this claim's: a dispatcher that stalled past its claim may
        find it adopted by the reconciler (running upstream: its lease stays)."""
        if await self._jobs.requeue(job.id, attempt=job.attempt + 1, claimer=job.claimer):
            await self._engine.give_back(job.ticket, [self._catalog.async_jobs], tombstone=True)
        self._kick.set()


def _json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}
