"""The reconciler: knowing that a job ended when nobody told the gateway.

Client polls and webhooks usually say when a job ends. For the rest, every instance runs a
reconciler that looks at running jobs nobody has heard of for ``reconcile_after_s`` (one
instance takes each, by compare-and-set on the job's last-heard time):

- a submitted job is looked up upstream with its own credential (a window token like any
  request): ended -> its lease is released; still running -> its lease is renewed; unknown
  upstream (404: a restarted simulator, a purged account) -> it ends in error at once, its
  lease freed and its webhook told, rather than waiting out ``lease_ttl_s``;
- a claimed job whose claim lapsed before its upstream id was recorded (its dispatcher died
  mid-POST, or its POST timed out, lost its connection or got a 5xx) is not requeued
  blindly: upstream's recent transcripts are searched for it (the same audio, created during
  the claim; with ``public_url`` set, confirmed by the job's own webhook receiver, which the
  POST named and upstream keeps). Found once -> adopted; not found -> requeued; found more
  than once -> it cannot be decided: counted, and the job ends in error saying so. When the dispatcher saw the
  outcome go unknown, it asks for this search at once (``settle``): it runs as soon as the
  claim has lapsed, rather than at the next sweep ``reconcile_after_s`` later.

The last resort is the lease's own expiry (``lease_ttl_s``): a lease never leaks forever.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs

from ...admission.health import stop_tasks, supervise
from ...config import Config
from ...errors import GatewayError, StoreUnavailable
from ...metrics import Metrics
from ...proxy.handler import ProxyHandler
from ...proxy.plan import Plan
from ...vault import SecretError, Vault
from ..catalog import Catalog
from .dispatch import Dispatcher, claim_margin_s
from .jobs import Job, JobStore, State
from .webhooks import RECEIVER_PATH

log = logging.getLogger(__name__)

ENDED = frozenset({"completed", "error"})
SEARCH_PAGE = 100
SEARCH_PAGES = 20  # at most 2,000 transcripts back; past that, "absent" is not shown

Lookup = Callable[[Job, str], Awaitable["dict[str, Any] | None"]]


class Forgotten(Exception):
    """Upstream answered 404 for a job's upstream id: it does not know the job (any more)."""


Finish = Callable[[Job, "dict[str, Any] | None", str], Awaitable[None]]


class Reconciler:
    def __init__(
        self,
        cfg: Config,
        *,
        jobs: JobStore,
        catalog: Catalog,
        handler: ProxyHandler,
        vault: Vault,
        dispatcher: Dispatcher,
        metrics: Metrics,
        lookup: Lookup,
        finish: Finish,
        renew: Callable[[Job], Awaitable[None]],
        forgotten: Callable[[Job], Awaitable[None]],
        wall: Callable[[], float] = time.time,
        credential: Callable[[Job], str | None] | None = None,
    ) -> None:
        """``credential(job)``: the key its lookups carry (the account's in managed mode; by
        default the client's, decrypted)."""
        self._cfg = cfg
        self._credential = credential or (lambda job: vault.decrypt(job.cred) if job.cred else None)
        self._t = cfg.transcripts
        self._jobs = jobs
        self._catalog = catalog
        self._handler = handler
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._lookup = lookup
        self._finish = finish
        self._renew = renew
        self._forgotten = forgotten
        self._wall = wall
        self._task: asyncio.Task[None] | None = None
        self._settling: dict[str, asyncio.Task[None]] = {}
        dispatcher.on_unknown = self.settle

    @property
    def _margin_s(self) -> float:
        return claim_margin_s(self._t.claim_s)

    @property
    def every_s(self) -> float:
        return min(max(self._t.reconcile_after_s / 2, 0.05), 5.0)

    async def start(self) -> None:
        self._task = supervise("transcript-reconciler", self._run)

    async def close(self) -> None:
        await stop_tasks(self._task, *self._settling.values())

    def settle(self, job: Job) -> None:
        """A claimed job's POST may or may not have created it upstream: search for it as
        soon as its claim has lapsed (no POST of that claim can arrive after it)."""
        if job.id not in self._settling:
            task = asyncio.create_task(self._settle(job), name=f"aai-gateway-settle-{job.id}")
            self._settling[job.id] = task

    async def _settle(self, job: Job) -> None:
        try:
            while True:
                due_s = job.claim_until_ms / 1000 + self._margin_s
                await asyncio.sleep(max(0.0, due_s - self._wall()) + 0.05)
                current = await self._jobs.get(job.id)
                if current is None or current.state is not State.CLAIMED or current.claimer != job.claimer:
                    return  # settled meanwhile (adopted, requeued, ended)
                now = int(self._wall() * 1000)
                if not await self._jobs.heard(job.id, before_ms=now, now_ms=now):
                    return  # another instance is looking it up
                await self._renew(current)  # the slot stays taken while the job may run upstream
                try:
                    await self._resolve_claim(current)
                    return
                except (GatewayError, SecretError) as exc:
                    log.info("reconciler: job %s not settled yet (%s); retrying", job.id, exc)
                await asyncio.sleep(self.every_s)
        except StoreUnavailable as exc:  # the sweep takes it up later
            log.warning("reconciler: job %s not settled (store unavailable: %s)", job.id, exc.detail)
        except Exception:
            log.exception("reconciler: settling job %s failed", job.id)
        finally:
            self._settling.pop(job.id, None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("reconciler: store unavailable (%s)", exc.detail)
            except Exception:
                log.exception("reconciler sweep failed")

    async def sweep(self) -> int:
        """Look up the running jobs nobody heard of lately; how many this instance took."""
        now = int(self._wall() * 1000)
        before = now - int(self._t.reconcile_after_s * 1000)
        taken = 0
        for job_id in await self._jobs.running(before, 50):
            if not await self._jobs.heard(job_id, before_ms=before, now_ms=now):
                continue  # another instance has it
            job = await self._jobs.get(job_id)
            if job is None or (job.cred is None and not self._cfg.managed):
                continue
            taken += 1
            try:
                if job.state is State.SUBMITTED:
                    await self._check_running(job)
                elif job.state is State.CLAIMED and now > job.claim_until_ms + self._margin_s * 1000:
                    await self._resolve_claim(job)
            except (GatewayError, SecretError) as exc:
                log.info("reconciler: job %s not resolved this round (%s)", job.id, exc)
        return taken

    def _outcome(self, outcome: str) -> None:
        self._metrics.child(self._metrics.reconciler_polls, outcome).inc()

    async def _check_running(self, job: Job) -> None:
        key = self._credential(job) or ""
        try:
            snapshot = await self._lookup(job, key)
        except Forgotten:
            self._outcome("forgotten")
            await self._forgotten(job)
            return
        if snapshot is None:
            self._outcome("unreachable")
            return
        if snapshot.get("status") in ENDED:
            self._outcome("ended")
            await self._finish(job, snapshot, "")
        else:
            self._outcome("running")
            await self._jobs.refreshed(job.id, snapshot)
            await self._renew(job)

    async def _resolve_claim(self, job: Job) -> None:
        """Its dispatcher vanished mid-POST: did the POST reach upstream?"""
        key = self._credential(job) or ""
        found, complete = await self._search(job, key)
        if len(found) == 1:
            self._outcome("adopted")
            log.warning(
                "job %s: found upstream after its claim lapsed mid-POST; adopted %s", job.id, found[0]
            )
            doc = {"id": found[0], "status": "processing"}
            await self._jobs.submitted(job.id, found[0], doc)
            adopted = await self._jobs.get(job.id)
            if adopted is not None:
                await self._renew(adopted)
        elif not found and complete:
            self._outcome("requeued")
            await self._dispatcher.requeue(job)
        else:
            self._outcome("undecidable")
            why = f"{len(found)} candidates" if found else "too many newer transcripts to search"
            message = (
                "The gateway could not tell whether this transcript reached AssemblyAI "
                f"({why}); submit it again if it does not appear in your list"
            )
            await self._finish(job, None, message)

    async def _search(self, job: Job, key: str) -> tuple[list[str], bool]:
        """The upstream transcripts that may be this job's, and whether the search reached
        back past the claim's start (only then does finding none show it absent). Upstream
        lists newest first: pages are read back (``before_id``) until one ends before it."""
        plan = Plan(
            "rest", self._cfg.upstream.api_url, self._catalog.account_window("rest", "GET"), 10.0, b""
        )
        start_s = (job.claim_until_ms / 1000) - self._t.claim_s - 2
        end_s = job.claim_until_ms / 1000 + self._margin_s
        candidates: list[str] = []
        complete, before = False, ""
        for _ in range(SEARCH_PAGES):
            path = f"/v2/transcript?limit={SEARCH_PAGE}" + (f"&before_id={before}" if before else "")
            status, _, data = await self._handler.fetch(plan, "GET", path, {hdrs.AUTHORIZATION: key})
            if status != 200:
                raise GatewayError(f"upstream list answered {status}")
            items = json.loads(data).get("transcripts", [])
            candidates += [
                item["id"]
                for item in items
                if item.get("audio_url") == job.body.get("audio_url") and start_s <= _created(item) <= end_s
            ]
            if len(items) < SEARCH_PAGE or (items and _created(items[-1]) < start_s):
                complete = True  # the list ended, or reached back before the claim
                break
            before = str(items[-1].get("id") or "")
        known = await self._jobs.by_upstream(candidates)
        candidates = [c for c in candidates if c not in known]
        if self._cfg.public_url is None or not candidates:
            return candidates, complete
        # The marker: with public_url set, the POST named this job's own webhook receiver
        # (its path holds the job id), which upstream keeps and shows in the transcript (not
        # in the list). A candidate naming another job's receiver is not this job; one naming
        # this job's is it, whatever else matches. One GET per candidate (usually one).
        mine, unmarked = [], []
        for candidate in candidates:
            hook = await self._webhook_url(plan, candidate, key)
            if f"{RECEIVER_PATH}/{job.id}/" in hook:
                mine.append(candidate)
            elif RECEIVER_PATH not in hook:  # sent without a receiver (public_url set since)
                unmarked.append(candidate)
        return mine or unmarked, complete

    async def _webhook_url(self, plan: Plan, upstream_id: str, key: str) -> str:
        status, _, data = await self._handler.fetch(
            plan, "GET", f"/v2/transcript/{upstream_id}", {hdrs.AUTHORIZATION: key}
        )
        if status != 200:
            raise GatewayError(f"upstream answered {status} for candidate {upstream_id}")
        doc = json.loads(data)
        return str(doc.get("webhook_url") or "") if isinstance(doc, dict) else ""


def _created(item: dict[str, Any]) -> float:
    """Upstream's ``created`` (ISO 8601, UTC, with or without a fraction) as epoch seconds."""
    text = str(item.get("created") or "")[:19]
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return 0.0
