"""``GET /v2/transcript``: the transcript list, with every upstream id the gateway knows
shown as the client's id (pass-through), or, in managed mode, only the caller's project's
transcripts gathered across upstream's pages (listing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import hdrs, web

from ...config import Config
from ...errors import StoreUnavailable
from ...identity import Auth, owner_of
from ...proxy.handler import Fetched, ProxyHandler
from ...proxy.plan import Plan
from ...proxy.urls import gateway_base, rewrite_page_details
from ...vault import Vault
from ..catalog import Catalog
from .ids import is_job_id, listed_ids, swap
from .jobs import Job, JobStore
from .listing import Cursors, list_page
from .recent import RecentJobs


class ListRoute:
    def __init__(
        self,
        cfg: Config,
        *,
        jobs: JobStore,
        recent: RecentJobs,
        catalog: Catalog,
        handler: ProxyHandler,
        vault: Vault,
        find: Callable[[str], Awaitable[Job | None]],
        owned: Callable[[Job, web.Request], bool],
        auth: Auth | None = None,
    ) -> None:
        """``find``: a job by its id, from the store or, while Redis is away, this instance's
        copies; ``owned``: whether the caller owns it (both Transcripts')."""
        self._cfg = cfg
        self.jobs = jobs
        self.recent = recent
        self._catalog = catalog
        self._handler = handler
        self._vault = vault
        self._find = find
        self._owned = owned
        self._auth = auth

    def use_config(self, cfg: Config) -> None:
        """A reloaded config (Transcripts.use_config)."""
        self._cfg = cfg

    async def list_transcripts(self, request: web.Request) -> web.StreamResponse:
        """The list, with every upstream id the gateway knows shown as the client's id. A
        cursor naming one of the caller's jobs is its upstream id; any other is passed on as
        is (another key's job id is not mapped: upstream answers for it as for any id).
        Managed mode: only the caller's project's transcripts, gathered across upstream's
        pages (listing.py)."""
        if self._auth is not None and self._auth.managed:
            return await self._list_projects(request)
        query = dict(request.query)
        for cursor in ("before_id", "after_id"):
            if cursor in query:
                query[cursor] = await self._cursor(request, query[cursor])
        path = "/v2/transcript" + (f"?{urlencode(query)}" if query else "")
        status, headers, data, rate = await self._fetch_list(request, path)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return web.Response(
                status=status, body=data, content_type=headers.get(hdrs.CONTENT_TYPE), headers=rate
            )
        try:
            ours = await self.jobs.by_upstream(listed_ids(doc))
        except StoreUnavailable:  # Redis is away: the jobs this instance saw last
            ours = self.recent.by_upstream(listed_ids(doc))
        return self._list_answer(request, status, swap(doc, ours), rate)

    async def _list_projects(self, request: web.Request) -> web.StreamResponse:
        owner = owner_of(request)

        async def fetch(path: str) -> Fetched:
            return await self._fetch_list(request, path)

        async def cursor(value: str) -> str:
            return await self._cursor(request, value)

        listed = await list_page(
            request.query, fetch=fetch, owned=lambda ids: self._callers(ids, owner), to_upstream=cursor,
            cursors=Cursors(self._vault), api_url=self._cfg.upstream.api_url,
        )  # fmt: skip
        if listed.doc is None:  # upstream's own answer (an error): nothing of a list in it
            return web.Response(
                status=listed.status, body=listed.body, content_type=listed.content_type,
                headers=listed.rate_headers,
            )  # fmt: skip
        return self._list_answer(request, listed.status, listed.doc, listed.rate_headers)

    async def _cursor(self, request: web.Request, value: str) -> str:
        """A list cursor naming one of the caller's jobs: its upstream id; any other: as is."""
        if is_job_id(value):
            with contextlib.suppress(StoreUnavailable):  # unknown while Redis is away: as is
                job = await self._find(value)
                if job is not None and job.upstream_id and self._owned(job, request):
                    return job.upstream_id
        return value

    async def _fetch_list(self, request: web.Request, path: str) -> Fetched:
        plan = Plan("rest", self._cfg.upstream.api_url, self._catalog.account_window("rest", "GET"),
                    self._cfg.queue.max_wait_s, b"")  # fmt: skip
        return await self._handler.fetch_admitted(
            plan,
            "GET",
            path,
            {hdrs.AUTHORIZATION: request.headers[hdrs.AUTHORIZATION]},
            owner=owner_of(request),
        )

    def _list_answer(self, request: web.Request, status: int, doc: Any, rate: dict[str, str]) -> web.Response:
        body = rewrite_page_details(
            json.dumps(doc).encode(),
            api_url=self._cfg.upstream.api_url,
            base=gateway_base(
                request,
                public_url=self._cfg.public_url,
                trust_forwarded=self._cfg.proxy.trust_forwarded_headers,
            ),
        )
        return web.Response(status=status, body=body, content_type="application/json", headers=rate)

    async def _callers(self, upstream_ids: list[str], owner: str) -> dict[str, str]:
        """Managed mode: which of these upstream ids are the caller's project's (-> job ids).
        One made outside the gateway belongs to no project."""
        try:
            ours = await self.jobs.by_upstream(upstream_ids)
        except StoreUnavailable:  # Redis is away: the jobs this instance saw last
            ours = self.recent.by_upstream(upstream_ids)

        async def find(job_id: str) -> Job | None:
            try:
                return await self._find(job_id)
            except StoreUnavailable:
                return None

        jobs = await asyncio.gather(*(find(job_id) for job_id in ours.values()))
        return {
            upstream_id: job_id
            for (upstream_id, job_id), job in zip(ours.items(), jobs, strict=True)
            if job is not None and owner and self._vault.same(job.key_fp, owner)
        }
