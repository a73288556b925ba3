"""``GET /v2/transcript`` in managed mode: one project's transcripts, paged across upstream's.

Upstream lists the whole account; a project owns only some of it. So one client page is
gathered from as many upstream pages as it takes (asked ``PAGE_SIZE`` at a time, with the
client's filters) to find ``limit`` of the caller's, but never more than ``MAX_PAGES``
upstream requests per client request: each counts against the account's shared request
budget and waits for admission like any other. A page cut short by that bound may hold
fewer than ``limit`` (even none); its URL onward continues from the last transcript the
scan READ, not the last it kept, so following it loses nothing and shows nothing twice.

Directions are upstream's (openapi.yml): newest first; ``before_id`` = older than,
``after_id`` = newer than; ``prev_url`` leads to older transcripts, ``next_url`` to newer.
A page asked with ``after_id`` alone holds the caller's transcripts just after it (walking
``next_url`` skips none); with both cursors, the newest between them. The URL onward in the
direction scanned is null once upstream has nothing more that way, as is every URL of an
empty page that reached the end.

Cursors a client sees are its own job ids where the transcript is the caller's. Where the
scan stopped on anyone else's, the cursor is ``gw_`` + the upstream id encrypted by the
vault: another project's ids never show (an upstream id would let a client ask upstream
for that transcript through the gateway). Whatever else the client sent (``status``,
``created_on``, ``throttled_only``) goes on every upstream page and into every URL.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from ...errors import BadRequest
from ...proxy.handler import Fetched
from ...vault import SecretError, Vault
from .ids import swap

log = logging.getLogger(__name__)

MAX_PAGES = 5  # upstream requests one client request may spend
PAGE_SIZE = 200  # upstream's largest page: the fewest requests for a scan
DEFAULT_LIMIT, MAX_LIMIT = 10, 200  # upstream's
CURSOR_PREFIX = "gw_"
CURSORS = ("before_id", "after_id")

Fetch = Callable[[str], Awaitable[Fetched]]  # an admitted GET upstream of a path with query
Owned = Callable[[list[str]], Awaitable[dict[str, str]]]  # upstream ids -> the caller's job ids
ToUpstream = Callable[[str], Awaitable[str]]  # the caller's job id -> its upstream id; else as is


@dataclass
class Listed:
    """The answer: ``doc`` (the page, ids the client's, URLs under upstream's base) when the
    list was read; else upstream's own first answer (``status``, ``body``) as it came."""

    status: int
    rate_headers: dict[str, str]
    doc: dict[str, Any] | None = None
    body: bytes = b""
    content_type: str | None = None


@dataclass
class _Scan:
    """What a scan read: the caller's items in scan order, and where it began and ended."""

    kept: list[dict[str, Any]] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # the caller's upstream ids -> job ids
    first_read: str = ""
    last_read: str = ""
    exhausted: bool = False  # upstream has nothing beyond last_read


class Cursors:
    """Opaque cursors for scan positions on transcripts that are not the caller's."""

    def __init__(self, vault: Vault) -> None:
        self._vault = vault

    def hide(self, upstream_id: str) -> str:
        return CURSOR_PREFIX + self._vault.encrypt(upstream_id)

    def reveal(self, cursor: str) -> str | None:
        """The upstream id in one of ours; None for any other cursor; 400 for a broken one."""
        if not cursor.startswith(CURSOR_PREFIX):
            return None
        try:
            return self._vault.decrypt(cursor[len(CURSOR_PREFIX) :])
        except SecretError:
            raise BadRequest("This list cursor was not given by this gateway (or has been altered)") from None


async def list_page(
    query: Mapping[str, str],
    *,
    fetch: Fetch,
    owned: Owned,
    to_upstream: ToUpstream,
    cursors: Cursors,
    api_url: str,
    max_pages: int | None = None,
    page_size: int | None = None,
) -> Listed:
    """One page of the caller's transcripts for the client's ``query`` (see the module);
    ``max_pages`` and ``page_size`` default to MAX_PAGES and PAGE_SIZE (read at each call)."""
    max_pages = max_pages or MAX_PAGES
    page_size = page_size or PAGE_SIZE
    limit = _limit(query.get("limit"))
    filters = {k: v for k, v in query.items() if k != "limit" and k not in CURSORS}
    given = {k: query[k] for k in CURSORS if k in query}
    upstream = {k: await _to_upstream(v, cursors, to_upstream) for k, v in given.items()}
    newer = "after_id" in given and "before_id" not in given  # walking toward the newest

    scan, rate = _Scan(), {}
    position = upstream.get("after_id" if newer else "before_id", "")
    for n in range(max_pages):
        params: dict[str, Any] = {"limit": page_size, **filters}
        if not newer and "after_id" in upstream:
            params["after_id"] = upstream["after_id"]  # both cursors: a floor on every page
        if position:
            params["after_id" if newer else "before_id"] = position
        fetched = await fetch("/v2/transcript?" + urlencode(params))
        rate = fetched.rate_headers
        page = _page(fetched, page_size)
        if page is None:
            if n == 0:  # nothing read yet: upstream's answer is the answer
                ctype = fetched.headers.get("Content-Type")
                return Listed(fetched.status, rate, body=fetched.body, content_type=ctype)
            log.warning("transcript list: upstream answered %d mid-scan; the page ends early", fetched.status)
            break
        items, cap = page
        if newer:
            items.reverse()  # upstream shows newest first; this scan reads oldest first
        scan.names.update(await owned([item["id"] for item in items]))
        for item in items:
            scan.first_read = scan.first_read or item["id"]
            scan.last_read = item["id"]
            if item["id"] in scan.names:
                scan.kept.append(item)
                if len(scan.kept) == limit:
                    break
        read_all = not items or scan.last_read == items[-1]["id"]
        scan.exhausted = read_all and len(items) < cap
        if len(scan.kept) == limit or scan.exhausted:
            break
        position = scan.last_read
    return Listed(200, rate, doc=_doc(scan, limit, filters, given, newer, cursors, api_url))


def _doc(
    scan: _Scan,
    limit: int,
    filters: dict[str, str],
    given: dict[str, str],
    newer: bool,
    cursors: Cursors,
    api_url: str,
) -> dict[str, Any]:
    def cursor(upstream_id: str) -> str:
        return scan.names.get(upstream_id) or cursors.hide(upstream_id)

    def url(**where: str) -> str:
        return f"{api_url}/v2/transcript?" + urlencode({"limit": limit, **where, **filters})

    # Onward: where the scan stopped. Back: the page's edge nearest where it began.
    onward = cursor(scan.last_read) if scan.last_read and not scan.exhausted else None
    edge = scan.kept[0]["id"] if scan.kept else scan.first_read
    back = cursor(edge) if edge and not (scan.exhausted and not scan.kept) else None
    if newer:
        older, newest = back, onward
    else:
        older, newest = onward, back
    floor = {"after_id": given["after_id"]} if "after_id" in given and not newer else {}
    shown = [swap(item, scan.names) for item in (reversed(scan.kept) if newer else scan.kept)]
    return {
        "page_details": {
            "limit": limit,
            "result_count": len(shown),
            "current_url": url(**given),
            "prev_url": url(before_id=older, **floor) if older else None,
            "next_url": url(after_id=newest) if newest else None,
        },
        "transcripts": shown,
    }


def _page(fetched: Fetched, asked: int) -> tuple[list[dict[str, Any]], int] | None:
    """A 200's transcripts (those with an id) and the page size upstream says it applied;
    None for any other answer."""
    if fetched.status != 200:
        return None
    try:
        doc = json.loads(fetched.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    items = doc.get("transcripts") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return None
    details = doc.get("page_details")
    cap = details.get("limit") if isinstance(details, dict) else None
    kept = [t for t in items if isinstance(t, dict) and isinstance(t.get("id"), str)]
    # A page shorter than the size upstream applied is its last (the size asked if it says none).
    return kept, cap if isinstance(cap, int) and cap > 0 else asked


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"`limit` must be an integer from 1 to {MAX_LIMIT}") from None
    return max(1, min(MAX_LIMIT, value))


async def _to_upstream(cursor: str, cursors: Cursors, to_upstream: ToUpstream) -> str:
    revealed = cursors.reveal(cursor)
    return revealed if revealed is not None else await to_upstream(cursor)
