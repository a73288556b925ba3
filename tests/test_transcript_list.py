"""Managed mode's transcript list (gateway/products/transcripts/listing.py): a project pages
through its own transcripts across upstream's pages, both ways, with ``limit``, cursors,
``status`` and page_details as upstream's list behaves for a key of its own; a long run of
other transcripts costs at most MAX_PAGES upstream requests per client request, and the page
cut short there continues where the scan stopped; no other project's id ever shows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from gateway.identity import key_digest, new_key
from gateway.products.transcripts import listing
from gateway.products.transcripts.listing import CURSOR_PREFIX, MAX_PAGES, PAGE_SIZE
from gateway.sim.app import SimConfig
from gateway.sim.transcripts import Job as SimJob
from tests.helpers import Running, stack

UPSTREAM = "sk-the-account-key-0123456789abcdef"
A1, A2, B1 = new_key(), new_key(), new_key()
RUNNING = "https://example.com/a.mp3?sim_seconds=600"  # stays "processing" for the test
FAILING = "https://example.com/a.mp3?sim_seconds=0.05&sim_fail=1"


@pytest.fixture(autouse=True)
def account_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AAI_GATEWAY_UPSTREAM_KEY", UPSTREAM)
    yield


@asynccontextmanager
async def managed() -> AsyncIterator[Running]:
    alpha = [{"name": "one", "sha256": key_digest(A1)}, {"name": "two", "sha256": key_digest(A2)}]
    projects = [
        {"name": "alpha", "keys": alpha},
        {"name": "beta", "keys": [{"name": "one", "sha256": key_digest(B1)}]},
    ]
    async with stack(SimConfig(job_seconds=600), projects=projects) as s:
        yield s


async def submit(http: aiohttp.ClientSession, s: Running, key: str, audio_url: str = RUNNING) -> str:
    async with http.post(
        s.url + "/v2/transcript", json={"audio_url": audio_url}, headers={"Authorization": key}
    ) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


def foreign_run(s: Running, n: int) -> list[str]:
    """``n`` transcripts made upstream outside the gateway (no project's), completed."""
    ids = []
    for _ in range(n):
        job = SimJob(
            uuid.uuid4().hex,
            UPSTREAM,
            {"audio_url": "https://example.com/x.mp3"},
            time.monotonic(),
            0.0,
            False,
            1,
        )
        job.status = "completed"
        s.sim.transcripts.jobs[job.id] = job
        s.sim.transcripts.order.append(job.id)
        ids.append(job.id)
    return ids


def list_requests(s: Running) -> int:
    return sum(1 for x in s.sim.seen if x["method"] == "GET" and x["path"] == "/v2/transcript")


async def walk(
    http: aiohttp.ClientSession, s: Running, key: str, url: str, follow: str, *, pages: int = 50
) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Follow ``follow`` (prev_url or next_url) from ``url`` until it is null: each page's
    ids, and each page's page_details. Checks every page on the way."""
    ids: list[list[str]] = []
    details: list[dict[str, Any]] = []
    for _ in range(pages):
        before = list_requests(s)
        async with http.get(url, headers={"Authorization": key}) as r:
            text = await r.text()
            assert r.status == 200, text
            doc = await r.json()
        assert list_requests(s) - before <= MAX_PAGES
        page = doc["page_details"]
        assert page["result_count"] == len(doc["transcripts"]) <= page["limit"]
        assert page["current_url"].startswith(s.url + "/v2/transcript?")
        for other in ("prev_url", "next_url"):
            assert page[other] is None or page[other].startswith(s.url + "/v2/transcript?")
        for upstream_id in s.sim.transcripts.order:  # never an upstream id, ours or not
            assert upstream_id not in text
        ids.append([t["id"] for t in doc["transcripts"]])
        details.append(page)
        if page[follow] is None:
            return ids, details
        url = page[follow]
    raise AssertionError(f"{follow} still not null after {pages} pages")


@pytest.mark.parametrize("page_size", [PAGE_SIZE, 5], ids=["one-upstream-page", "upstream-pages-of-5"])
async def test_a_project_pages_through_its_own_both_ways_and_sees_nothing_else(
    page_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing, "PAGE_SIZE", page_size)
    async with managed() as s, aiohttp.ClientSession() as http:
        made: dict[str, list[str]] = {A1: [], B1: []}
        for _ in range(30):
            for key in (A1, B1):
                made[key].append(await submit(http, s, key))
        newest_first = made[A1][::-1]

        # Older and older (prev_url, as the SDK pages), read with the project's other key.
        pages, details = await walk(http, s, A2, s.url + "/v2/transcript?limit=7", "prev_url")
        assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
        assert [i for p in pages for i in p] == newest_first
        assert all(d["limit"] == 7 for d in details)
        assert details[0]["next_url"] == f"{s.url}/v2/transcript?limit=7&after_id={newest_first[0]}"
        assert details[0]["prev_url"] == f"{s.url}/v2/transcript?limit=7&before_id={newest_first[6]}"

        # Back toward the newest (next_url) from the oldest: each page newest first.
        start = f"{s.url}/v2/transcript?limit=7&after_id={made[A1][0]}"
        pages, details = await walk(http, s, A1, start, "next_url")
        assert [len(p) for p in pages] == [7, 7, 7, 7, 1]
        assert [i for p in pages for i in reversed(p)] == made[A1][1:]
        assert details[0]["prev_url"] == f"{s.url}/v2/transcript?limit=7&before_id={made[A1][1]}"

        # A page's prev_url and next_url lead to its neighbours.
        async with http.get(
            f"{s.url}/v2/transcript?limit=7&before_id={made[A1][15]}", headers={"Authorization": A1}
        ) as r:
            page = await r.json()
        assert [t["id"] for t in page["transcripts"]] == made[A1][14:7:-1]
        async with http.get(page["page_details"]["next_url"], headers={"Authorization": A1}) as r:
            assert [t["id"] for t in (await r.json())["transcripts"]] == made[A1][21:14:-1]

        # Both cursors: the newest between them, and prev_url keeps the floor.
        pages, _ = await walk(
            http,
            s,
            A1,
            f"{s.url}/v2/transcript?limit=4&before_id={made[A1][15]}&after_id={made[A1][5]}",
            "prev_url",
        )
        assert pages == [made[A1][14:10:-1], made[A1][10:6:-1], made[A1][6:5:-1]]

        # The other project the same, and an empty page is upstream's empty page.
        pages, _ = await walk(http, s, B1, s.url + "/v2/transcript?limit=200", "prev_url")
        assert [i for p in pages for i in p] == made[B1][::-1]
        assert len(pages) == (1 if page_size == PAGE_SIZE else 3)  # 25 read a time: 13, 12, 5
        async with http.get(
            f"{s.url}/v2/transcript?before_id={made[A1][0]}", headers={"Authorization": A1}
        ) as r:
            doc = await r.json()
        assert doc["transcripts"] == [] and doc["page_details"]["prev_url"] is None
        assert doc["page_details"]["next_url"] is None and doc["page_details"]["limit"] == 10


async def test_the_status_filter_holds_across_pages_and_in_every_url() -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        failing: list[str] = []
        for i in range(12):
            for key in (A1, B1):
                job_id = await submit(http, s, key, FAILING if i % 3 == 0 else RUNNING)
                if key == A1 and i % 3 == 0:
                    failing.append(job_id)
        deadline = time.monotonic() + 5
        while sum(j.status == "error" for j in s.sim.transcripts.jobs.values()) < 8:
            assert time.monotonic() < deadline, "the simulator's failing jobs did not end"
            await asyncio.sleep(0.02)
        pages, details = await walk(http, s, A1, s.url + "/v2/transcript?limit=3&status=error", "prev_url")
        assert [i for p in pages for i in p] == failing[::-1]
        assert all("status=error" in d["current_url"] for d in details)
        assert all("status=error" in d["prev_url"] for d in details[:-1])
        async with http.get(
            s.url + "/v2/transcript?limit=200&status=processing", headers={"Authorization": A1}
        ) as r:
            doc = await r.json()
        assert len(doc["transcripts"]) == 8 and {t["status"] for t in doc["transcripts"]} == {"processing"}


async def test_a_long_run_of_others_bounds_the_upstream_requests_and_the_page_continues() -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        old = [await submit(http, s, A1) for _ in range(4)]
        run = foreign_run(s, 2 * MAX_PAGES * PAGE_SIZE + 100)  # no project's: never shown
        b = await submit(http, s, B1)
        new = [await submit(http, s, A1) for _ in range(3)]

        before = list_requests(s)
        pages, details = await walk(http, s, A1, s.url + "/v2/transcript?limit=5", "prev_url")
        assert list_requests(s) - before == 2 * MAX_PAGES + 1
        # Cut short twice (3 found, then none in 1000 read), then the rest: none lost, none twice.
        assert pages == [new[::-1], [], old[::-1]]
        for page in details[:2]:
            cursor = page["prev_url"].split("before_id=")[1].split("&")[0]
            assert cursor.startswith(CURSOR_PREFIX) and not any(i in cursor for i in run + [b])

        # And back toward the newest across the same run.
        pages, _ = await walk(http, s, A1, f"{s.url}/v2/transcript?limit=5&after_id={old[0]}", "next_url")
        assert [i for p in pages for i in reversed(p)] == old[1:] + new
        assert all(len(p) <= 5 for p in pages) and len(pages) >= 3


async def test_a_cursor_the_gateway_did_not_give_is_a_400() -> None:
    async with managed() as s, aiohttp.ClientSession() as http:
        await submit(http, s, A1)
        async with http.get(
            f"{s.url}/v2/transcript?before_id={CURSOR_PREFIX}not-a-token", headers={"Authorization": A1}
        ) as r:
            assert r.status == 400
            assert "error" in await r.json()
        async with http.get(s.url + "/v2/transcript?limit=many", headers={"Authorization": A1}) as r:
            assert r.status == 400
