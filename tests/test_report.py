"""The usage report: the ledger's rows summed by any subset of the dimensions, priced; and the
admin route that serves it (a tiny app over a SqliteLedger filled with recorded events)."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.admin import require_admin
from gateway.app import errors_middleware
from gateway.config import Pricing
from gateway.ledger import Event, Line, Row, SqliteLedger
from gateway.metrics import Metrics
from gateway.report import COLUMNS, DIMENSIONS, group_by_of, report, span, to_csv, to_table, usage_route

PRICES = Pricing.model_validate(
    {
        "taken": "2026-05",
        "transcription": {"universal-3-pro": 0.36, "speaker_labels": 0.072},
        "streaming": {"universal-streaming": 0.18},
        "llm": {"claude-x": {"input": 2.0, "output": 10.0}},
    }
)
TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TODAY = dt.date(2026, 12, 15)
DAY1, DAY2 = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC), dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC)


def events() -> list[Event]:
    """Two projects and pass-through: a transcript with speaker labels, a streaming session,
    LLM calls on a priced and an unpriced model, a transcript on an unpriced model, and the
    request counts usage.Tally records (on the product's line, with no model)."""
    a, b = ("alpha", "alpha/ci"), ("beta", "beta/web")
    return [
        Event("transcript:1", DAY1.timestamp(), Line(*a, "transcription", "universal-3-pro", "acme"),
              {"audio_seconds": 3600, "transcripts": 1}),
        Event("transcript:1:speaker_labels", DAY1.timestamp(),
              Line(*a, "transcription", "speaker_labels", "acme"), {"audio_seconds": 3600}),
        Event("session:1", DAY1.timestamp(), Line(*a, "streaming", "", "acme"),
              {"sessions": 1, "session_seconds": 1200, "audio_seconds": 900}),
        Event("llm:1", DAY2.timestamp(), Line(*b, "llm", "claude-x", ""),
              {"input_tokens": 500_000, "output_tokens": 10_000}),
        Event("llm:2", DAY2.timestamp(), Line(*b, "llm", "gpt-unknown", ""),
              {"input_tokens": 100, "output_tokens": 50}),
        Event("transcript:2", DAY2.timestamp(), Line("", "a1b2c3d4", "transcription", "slam-9", ""),
              {"audio_seconds": 60, "transcripts": 1}),
        Event("tally:1", DAY1.timestamp(), Line(*a, "transcription"),
              {"requests": 3, "waited": 1, "wait_seconds": 0.5}),
        Event("tally:2", DAY2.timestamp(), Line(*b, "llm"), {"requests": 4, "refused": 2}),
        Event("tally:3", DAY2.timestamp(), Line("", "a1b2c3d4", "transcription"), {"requests": 2}),
    ]  # fmt: skip


def rows() -> list[Row]:
    """What a ledger would give back for events() (one row per line and metric)."""
    out = []
    for e in events():
        day = dt.datetime.fromtimestamp(e.at, dt.UTC).date().isoformat()
        out += [Row(day, *e.line, metric, float(value)) for metric, value in e.amounts.items()]
    return sorted(out)


def by(result: dict[str, Any], **keys: str) -> dict[str, Any]:
    [found] = [r for r in result["rows"] if all(r[k] == v for k, v in keys.items())]
    return found


def test_by_project_and_product() -> None:
    result = report(rows(), ["project", "product"], PRICES)
    assert [(r["project"], r["product"]) for r in result["rows"]] == [
        ("", "transcription"), ("alpha", "streaming"), ("alpha", "transcription"), ("beta", "llm")
    ]  # fmt: skip
    alpha = by(result, project="alpha", product="transcription")
    assert alpha == {
        "project": "alpha", "product": "transcription", "requests": 3, "waited": 1, "refused": 0,
        "transcripts": 1, "sessions": 0, "audio_seconds": 3600.0, "addon_seconds": 3600.0,
        "session_seconds": 0.0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.432, "unpriced": 0,
    }  # fmt: skip
    stream = by(result, project="alpha", product="streaming")
    assert (stream["sessions"], stream["session_seconds"], stream["audio_seconds"]) == (1, 1200.0, 900.0)
    assert stream["cost_usd"] == 0.06  # 1200 s at $0.18/h, the default streaming model
    llm = by(result, project="beta")
    assert (llm["requests"], llm["refused"], llm["input_tokens"], llm["output_tokens"]) == (
        4,
        2,
        500_100,
        10_050,
    )
    assert llm["cost_usd"] == 1.1 and llm["unpriced"] == 1  # gpt-unknown: counted, not priced
    passthrough = by(result, project="")
    assert (passthrough["requests"], passthrough["transcripts"], passthrough["audio_seconds"]) == (2, 1, 60)
    assert passthrough["cost_usd"] == 0 and passthrough["unpriced"] == 1


def test_totals_are_the_sums_whatever_the_grouping() -> None:
    totals = report(rows(), ["project"], PRICES)["totals"]
    assert totals == {
        "requests": 9, "waited": 1, "refused": 2, "transcripts": 2, "sessions": 1,
        "audio_seconds": 3600.0 + 900 + 60, "addon_seconds": 3600.0, "session_seconds": 1200.0,
        "input_tokens": 500_100, "output_tokens": 10_050, "cost_usd": 0.432 + 0.06 + 1.1, "unpriced": 2,
    }  # fmt: skip
    for group_by in ([], ["day"], ["model", "key"], list(DIMENSIONS)):
        assert report(rows(), group_by, PRICES)["totals"] == totals, group_by


def test_unpriced_models_are_named_and_prices_dated() -> None:
    result = report(rows(), ["model"], PRICES)
    assert result["unpriced_models"] == ["llm:gpt-unknown", "transcription:slam-9"]
    assert result["prices_taken"] == "2026-05"
    assert by(result, model="speaker_labels")["addon_seconds"] == 3600.0


def test_no_grouping_is_one_row_and_no_rows_is_no_rows() -> None:
    result = report(rows(), [], PRICES)
    assert len(result["rows"]) == 1 and result["rows"][0] == result["totals"]
    empty = report([], ["project"], PRICES)
    assert empty["rows"] == [] and empty["totals"]["cost_usd"] == 0 and empty["totals"]["unpriced"] == 0


def test_group_by_takes_only_its_vocabulary() -> None:
    assert group_by_of("project,product") == ["project", "product"]
    assert group_by_of(" day, project,day,") == ["day", "project"]
    assert group_by_of(None) == ["project", "product"]
    with pytest.raises(
        ValueError, match="'account' is not one of project, product, model, key, customer, day"
    ):
        group_by_of("project,account")
    with pytest.raises(ValueError, match="'metric'"):
        report(rows(), ["metric"], PRICES)


def test_csv_has_the_same_columns() -> None:
    result = report(rows(), ["project", "product"], PRICES)
    parsed = list(csv.DictReader(io.StringIO(to_csv(result, ["project", "product"]))))
    assert list(parsed[0]) == ["project", "product", *COLUMNS]
    assert [r["project"] for r in parsed] == ["", "alpha", "alpha", "beta"]  # pass-through: ""
    assert parsed[3]["cost_usd"] == "1.1" and parsed[3]["unpriced"] == "1"


def test_table_is_aligned_with_a_total_line() -> None:
    text = to_table(report(rows(), ["project", "product"], PRICES), ["project", "product"])
    lines = text.splitlines()
    assert lines[0].split() == ["project", "product", *COLUMNS]
    body = lines[: lines.index(next(x for x in lines if x.startswith("TOTAL"))) + 1]
    assert len({len(x) for x in body if not x.startswith("-")}) <= 2  # right-aligned to one width
    assert "unpriced (cost counted as 0; add them to pricing:): llm:gpt-unknown, transcription:slam-9" in text
    assert "prices as of 2026-05" in text


def test_span_defaults_and_limits() -> None:
    assert span(None, None, TODAY) == ("2026-12-01", "2026-12-15")
    assert span("2025-11-15", "2026-12-20", TODAY) == ("2025-11-15", "2026-12-20")  # 400 days
    for first, last, message in [
        ("2025-11-14", "2026-12-20", "401 days: at most 400"),
        ("2026-12-02", "2026-12-01", "is before from"),
        ("2026-13-01", None, "from: '2026-13-01' is not a date"),
        ("20261201", None, "from: '20261201' is not a date"),
        (None, "yesterday", "to: 'yesterday' is not a date"),
    ]:
        with pytest.raises(ValueError, match=message):
            span(first, last, TODAY)


# -- the admin route ---------------------------------------------------------------------


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[str]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    for event in events():
        assert await ledger.record(event)
    app = web.Application(middlewares=[errors_middleware(Metrics(CollectorRegistry()))])
    route = usage_route(lambda: ledger, lambda: PRICES, require_admin(TOKEN), today=lambda: TODAY)
    app.router.add_get("/admin/v1/usage", route)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/admin/v1/usage"))
    finally:
        await server.close()
        await ledger.close()


async def get(url: str, headers: dict[str, str] | None = AUTH, **query: str) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url, params=query, headers=headers) as resp:
        text = await resp.text()
        body = await resp.json() if resp.content_type == "application/json" else text
        return resp.status, resp.content_type, body


async def test_route_defaults_to_this_month_by_project_and_product(gateway: str) -> None:
    status, _, body = await get(gateway)
    assert status == 200
    assert (body["from"], body["to"], body["group_by"]) == (
        "2026-12-01",
        "2026-12-15",
        ["project", "product"],
    )
    assert body == {"from": "2026-12-01", "to": "2026-12-15", "group_by": ["project", "product"],
                    **report(rows(), ["project", "product"], PRICES)}  # fmt: skip


async def test_route_groups_filters_by_day_and_renders_csv(gateway: str) -> None:
    status, _, body = await get(
        gateway, **{"from": "2026-12-02", "to": "2026-12-02", "group_by": "customer,day"}
    )
    assert status == 200
    assert [(r["customer"], r["day"]) for r in body["rows"]] == [("", "2026-12-02")]
    assert body["totals"]["input_tokens"] == 500_100 and body["totals"]["audio_seconds"] == 60
    status, ctype, text = await get(gateway, group_by="project", format="csv")
    assert status == 200 and ctype == "text/csv"
    assert text.splitlines()[0] == ",".join(["project", *COLUMNS])
    assert [line.split(",")[0] for line in text.splitlines()[1:]] == ["", "alpha", "beta"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"from": "2026-12-40"}, "from: '2026-12-40' is not a date (YYYY-MM-DD)"),
        ({"from": "2026-12-10", "to": "2026-12-01"}, "to (2026-12-01) is before from (2026-12-10)"),
        ({"from": "2025-01-01", "to": "2026-12-01"},
         "from 2025-01-01 to 2026-12-01 is 699 days: at most 400"),
        ({"group_by": "project,secret"},
         "group_by: 'secret' is not one of project, product, model, key, customer, day"),
        ({"format": "xml"}, "format: 'xml' is not one of json, csv"),
    ],
)  # fmt: skip
async def test_route_bad_parameters_are_400(gateway: str, query: dict[str, str], message: str) -> None:
    assert await get(gateway, **query) == (400, "application/json", {"error": message})


async def test_route_needs_the_admin_token(gateway: str) -> None:
    status, _, body = await get(gateway, headers=None)
    assert status == 401 and "Admin token missing" in body["error"]
    status, _, body = await get(gateway, headers={"Authorization": "Bearer wrong"})
    assert (status, body) == (403, {"error": "Admin token invalid"})


async def test_route_without_an_admin_token_configured_is_404(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    app = web.Application(middlewares=[errors_middleware(Metrics(CollectorRegistry()))])
    app.router.add_get("/u", usage_route(lambda: ledger, lambda: PRICES, require_admin("")))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        status, _, _ = await get(str(server.make_url("/u")))
        assert status == 404
    finally:
        await server.close()
        await ledger.close()
