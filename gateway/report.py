"""The usage and spend report: the ledger's rows summed by the dimensions asked for, priced.

    report(rows, ["project", "product"], prices) ->
        {"rows": [{"project": "ci", "product": "llm", "requests": 3, ..., "cost_usd": 0.0123,
                   "unpriced": 0}, ...],
         "totals": {"requests": ..., ..., "cost_usd": ..., "unpriced": ...},
         "unpriced_models": [...], "prices_taken": "2026-05"}

Columns (every row, and the totals):

- ``requests``: requests the gateway served, by route group (``rest`` counts as
  transcription, ``llm``, ``token`` as streaming); ``waited``: those admitted after waiting;
  ``refused``: the gateway's own 429s (usage.Tally);
- ``transcripts``: transcripts completed (billed); ``sessions``: streaming sessions ended;
- ``audio_seconds``: audio transcribed (pre-recorded, × channels when multichannel) and
  streamed; an add-on feature's line (``speaker_labels``...) bills the same seconds again,
  so its seconds are shown apart, in ``addon_seconds``, and audio is never counted twice;
- ``session_seconds``: streaming sessions' open time (what upstream bills);
- ``input_tokens``, ``output_tokens``: LLM Gateway tokens;
- ``cost_usd``: usage × price (gateway/pricing.py), rounded to the micro-dollar;
- ``unpriced``: how many ledger lines (day × project × key × product × model × customer) in
  the group have usage with no price: their cost is counted as 0. 0 means fully priced;
  ``unpriced_models`` names what to add to ``pricing:``.

In pass-through mode (no projects) the project is "" and the key is the client key's
fingerprint: "" is shown as it is (JSON, CSV and table alike), never replaced by a word that
could be a project's name.

``usage_route`` serves it: ``GET /admin/v1/usage?from=&to=&group_by=&format=json|csv``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web

from .config import Pricing
from .errors import BadRequest
from .ledger import RETENTION_DAYS, Ledger, Row
from .pricing import price
from .usage import BILLED_FEATURES

DIMENSIONS = ("project", "product", "model", "key", "customer", "day")
COLUMNS = ("requests", "waited", "refused", "transcripts", "sessions", "audio_seconds", "addon_seconds",
           "session_seconds", "input_tokens", "output_tokens", "cost_usd", "unpriced")  # fmt: skip
DEFAULT_GROUP_BY = ("project", "product")
FORMATS = ("json", "csv")
MAX_SPAN_DAYS = RETENTION_DAYS  # to - from, at most: what the ledger keeps

_SUMMED = frozenset(COLUMNS) - {"audio_seconds", "addon_seconds", "cost_usd", "unpriced"}  # metric = column
_FEATURES = frozenset(BILLED_FEATURES.values())
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def group_by_of(value: str | Sequence[str] | None) -> list[str]:
    """The dimensions asked for ("project,product" or a list), in order, once each.
    ValueError naming the allowed words for any other."""
    if value is None:
        return list(DEFAULT_GROUP_BY)
    words = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for word in (w.strip() for w in words):
        if not word:
            continue
        if word not in DIMENSIONS:
            raise ValueError(f"group_by: {word!r} is not one of {', '.join(DIMENSIONS)}")
        if word not in out:
            out.append(word)
    return out


def _column(row: Row) -> str | None:
    """Which column a ledger row adds to (None: none, e.g. ``unreported_sessions``)."""
    if row.metric == "audio_seconds":
        return (
            "addon_seconds" if row.product == "transcription" and row.model in _FEATURES else "audio_seconds"
        )
    return row.metric if row.metric in _SUMMED else None


def _empty() -> dict[str, Any]:
    return {c: 0.0 for c in COLUMNS} | {"_unpriced": set()}


def _add(acc: dict[str, Any], row: Row, prices: Pricing) -> None:
    column = _column(row)
    if column is not None:
        acc[column] += row.value
    cost, unpriced = price(row, prices)
    acc["cost_usd"] += cost
    if unpriced:
        acc["_unpriced"].add(row[:6])  # the line: day, project, key, product, model, customer


def _finish(acc: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in COLUMNS:
        if column == "unpriced":
            out[column] = len(acc["_unpriced"])
        elif column == "cost_usd":
            out[column] = round(acc[column], 6)
        elif column.endswith("_seconds"):
            out[column] = round(acc[column], 3)
        else:
            out[column] = int(round(acc[column]))
    return out


def report(rows: Iterable[Row], group_by: Sequence[str], prices: Pricing) -> dict[str, Any]:
    """The rows summed per distinct value of ``group_by`` (sorted by it), and the totals."""
    group_by = group_by_of(group_by)
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    total = _empty()
    missing: set[str] = set()
    for row in rows:
        key = tuple(getattr(row, d) for d in group_by)
        _add(groups.setdefault(key, _empty()), row, prices)
        before = len(total["_unpriced"])
        _add(total, row, prices)
        if len(total["_unpriced"]) > before:
            missing.add(f"{row.product}:{row.model}")
    return {
        "rows": [dict(zip(group_by, key, strict=True)) | _finish(acc) for key, acc in sorted(groups.items())],
        "totals": _finish(total),
        "unpriced_models": sorted(missing),
        "prices_taken": prices.taken,
    }


def to_csv(result: Mapping[str, Any], group_by: Sequence[str]) -> str:
    """The report's rows as CSV: a header of the group keys and COLUMNS, then one line each."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*group_by, *COLUMNS])
    for row in result["rows"]:
        writer.writerow([row[c] for c in (*group_by, *COLUMNS)])
    return out.getvalue()


def to_table(result: Mapping[str, Any], group_by: Sequence[str]) -> str:
    """The report as aligned text columns (numbers right-aligned), with a TOTAL line."""
    header = [*group_by, *COLUMNS]

    def cell(row: Mapping[str, Any], column: str) -> str:
        return f"{row[column]:.6f}" if column == "cost_usd" else str(row[column])

    lines = [[cell(row, c) for c in header] for row in result["rows"]]
    total = ["TOTAL" if i == 0 else "" for i in range(len(group_by))]
    lines.append(total + [cell(result["totals"], c) for c in COLUMNS])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    keys = len(group_by)

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < keys else c.rjust(w) for i, (c, w) in
                         enumerate(zip(cells, widths, strict=True))).rstrip()  # fmt: skip

    rule = "  ".join("-" * w for w in widths)
    out = [fmt(header), rule, *(fmt(line) for line in lines[:-1]), rule, fmt(lines[-1])]
    if result["unpriced_models"]:
        out.append(
            f"unpriced (cost counted as 0; add them to pricing:): {', '.join(result['unpriced_models'])}"
        )
    out.append(f"prices as of {result['prices_taken']}; check the Rates table on your AssemblyAI dashboard")
    return "\n".join(out) + "\n"


def span(first: str | None, last: str | None, today: dt.date) -> tuple[str, str]:
    """The days asked for: ``first`` (default: the 1st of today's UTC month) to ``last``
    (default: today), YYYY-MM-DD, in order, at most MAX_SPAN_DAYS apart. ValueError else."""
    start = _day("from", first) if first is not None else today.replace(day=1)
    end = _day("to", last) if last is not None else today
    if end < start:
        raise ValueError(f"to ({end}) is before from ({start})")
    if (end - start).days > MAX_SPAN_DAYS:
        raise ValueError(f"from {start} to {end} is {(end - start).days} days: at most {MAX_SPAN_DAYS}")
    return start.isoformat(), end.isoformat()


def _day(name: str, text: str) -> dt.date:
    try:
        if _DATE.fullmatch(text):
            return dt.date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"{name}: {text!r} is not a date (YYYY-MM-DD)")


def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def usage_route(
    ledger: Callable[[], Ledger],
    prices: Callable[[], Pricing],
    check_admin: Callable[[web.Request], None],
    *,
    today: Callable[[], dt.date] = utc_today,
) -> Handler:
    """``GET /admin/v1/usage``: the report as JSON (``from``, ``to``, ``group_by`` and the
    report) or CSV. ``check_admin`` (admin.require_admin) guards it; a bad parameter is a 400
    naming it. The prices are read per request, so a reloaded ``pricing:`` applies at once."""

    async def usage(request: web.Request) -> web.StreamResponse:
        check_admin(request)
        query = request.query
        try:
            first, last = span(query.get("from"), query.get("to"), today())
            group_by = group_by_of(query.get("group_by"))
            fmt = query.get("format", "json")
            if fmt not in FORMATS:
                raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        result = report(await ledger().rows(first, last), group_by, prices())
        if fmt == "csv":
            name = f"aai-usage-{first}-to-{last}.csv"
            disposition = {"Content-Disposition": f'attachment; filename="{name}"'}
            return web.Response(text=to_csv(result, group_by), content_type="text/csv", headers=disposition)
        body = {"from": first, "to": last, "group_by": group_by, **result}
        return web.Response(text=json.dumps(body), content_type="application/json")

    return usage
