"""The status page: ``GET /admin/``, one server-rendered HTML page for operators.

    GET  /admin/   Authorization: Bearer <admin token>  -> the page
    GET  /admin/   (no header)                          -> a small login form (a token field)
    POST /admin/   token=<admin token> (form body)      -> the page; a wrong token: the form, 403

It shows each limit's use now and over the last hour (``UseHistory``, a ring buffer in this
process), the queue (per limit, per project, transcripts), spend per project this month
against its cap, and usage per day for the last 30 days. Everything is read from what this
gateway already has (store, engine, job store, ledger, config): nothing is asked of upstream.

Why it is built this way:

- The gateway may have no internet, so nothing is fetched: no CDN, no fonts, no script. The
  CSS is inline (allowed by its hash in the Content-Security-Policy), the charts are inline
  SVG, and ``default-src 'none'`` forbids the page every other load.
- No cookie, no session: the token travels in a POST body (never in a URL, which logs and
  Referer headers keep), and the page is the answer to that POST. Nothing survives it, so
  there is nothing to steal or to forge a request with (no CSRF), and a reload asks again.
- Project, key and customer names are user data: every value goes through ``esc``.
- No admin token configured: 404, like every admin route (the surface nobody enabled does
  not exist).

Reading order: the numbers come from status_data.py (``UseHistory``, the sampler; ``gather``,
every number, in one function); here, the ``render_*`` functions (plain string building),
then ``status_routes``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import html
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import parse_qs

from aiohttp import hdrs, web

from .admin import require_admin
from .admission.engine import AdmissionEngine
from .admission.limits import Kind
from .admission.store import Store
from .config import Config
from .errors import NotFound
from .ledger import Ledger
from .products.catalog import Catalog
from .products.transcripts.service import Transcripts
from .report import utc_today
from .status_data import HISTORY_S, SAMPLE_EVERY_S, Sample, Spend, Status, UseHistory, gather, owner_name

# Names that lived here before the numbers moved to status_data.py, imported from here by
# app.py, lifecycle.py and the tests.
__all__ = [
    "HISTORY_S",
    "SAMPLE_EVERY_S",
    "UseHistory",
    "owner_name",
    "status_routes",
]

MAX_FORM = 4096  # bytes of a login form's body
PRODUCTS = ("transcription", "streaming", "llm")
COLORS = {"transcription": "#3b6fd4", "streaming": "#2a9d6f", "llm": "#c77d1a"}
OTHER_COLOR = "#888"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def esc(value: object) -> str:
    """Any value as HTML text (attributes included): user data is never markup."""
    return html.escape(str(value), quote=True)


# -- rendering: plain functions returning HTML text ----------------------------------------
CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:70em;
color:#1d2330;background:#fafbfc;padding:0 1em}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em;border-bottom:1px solid #dde}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;vertical-align:middle}
th{font-weight:600;color:#556;border-bottom:1px solid #dde}
td.n{text-align:right;font-variant-numeric:tabular-nums}
tr+tr td{border-top:1px solid #eef}.note{color:#667;font-size:.9em}.bad{color:#b3261e;font-weight:600}
.problem{background:#fdecea;border:1px solid #f5c2c0;padding:.5em .8em;margin:.5em 0}
form.login{max-width:22em;margin:4em auto;padding:1.5em;background:#fff;border:1px solid #dde}
form.login input{width:100%;box-sizing:border-box;padding:.4em;margin:.4em 0 .8em;font:inherit}
form.login button{padding:.4em 1.2em;font:inherit}.legend span{margin-right:1em}
""".strip()
CSS_HASH = "sha256-" + base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Nothing loads but the inline CSS (by its hash) and data: images (the favicon).
    "Content-Security-Policy": (
        f"default-src 'none'; style-src '{CSS_HASH}'; img-src data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


def document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}</style></head>'
        f"<body>{body}</body></html>"
    )


def render_login(error: str = "") -> str:
    """The token form. It posts to /admin/ (the token in the body, never the URL)."""
    problem = f'<p class="bad" role="alert">{esc(error)}</p>' if error else ""
    return document(
        "aai-gateway status: sign in",
        '<form class="login" method="post" action="/admin/" autocomplete="off">'
        "<h1>aai-gateway status</h1>"
        f"{problem}"
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" required autofocus>'
        '<button type="submit">Show status</button>'
        '<p class="note">Nothing is kept: no cookie, no session. Reloading asks again.</p>'
        "</form>",
    )


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.4f}"


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}".rstrip("0").rstrip(".")


def sparkline(samples: Sequence[Sample], capacity: int, now: float, keep_s: float) -> str:
    """Tokens out (blue line) and tickets waiting (orange) over the last ``keep_s``; the
    dashed line is the capacity."""
    w, h = 240, 40
    top = max([capacity, 1, *(s.out for s in samples), *(s.waiting for s in samples)])

    def points(values: Sequence[tuple[float, int]]) -> str:
        return " ".join(
            f"{w * (1 - (now - at) / keep_s):.1f},{h - 2 - (h - 4) * v / top:.1f}" for at, v in values
        )

    cap_y = h - 2 - (h - 4) * capacity / top
    label = f"use over the last {keep_s / 60:.0f} minutes: {len(samples)} samples"
    parts = [
        f'<svg class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{esc(label)}"><title>{esc(label)}</title>',
        f'<rect width="{w}" height="{h}" fill="#f1f3f7"/>',
        f'<line x1="0" x2="{w}" y1="{cap_y:.1f}" y2="{cap_y:.1f}" stroke="#99a" stroke-dasharray="3 3"/>',
    ]
    if samples:
        parts.append(
            '<polyline fill="none" stroke="#d9822b" stroke-width="1" '
            f'points="{points([(s.at, s.waiting) for s in samples])}"/>'
        )
        parts.append(
            f'<polyline fill="none" stroke="#3b6fd4" stroke-width="1.5" '
            f'points="{points([(s.at, s.out) for s in samples])}"/>'
        )
        x, y = points([(samples[-1].at, samples[-1].out)]).split(",")
        parts.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="#3b6fd4"/>')  # the latest reading
    else:
        parts.append(f'<text x="6" y="{h / 2 + 4}" font-size="11" fill="#667">no samples yet</text>')
    return "".join(parts) + "</svg>"


def spend_bar(spend: Spend, scale: float) -> str:
    """Spend against the cap (red once reached); without a cap, against ``scale`` (gray)."""
    w, h = 260, 14
    if spend.cap_usd:
        share = spend.cost_usd / spend.cap_usd
        fill = "#b3261e" if share >= 1 else "#d9822b" if share >= 0.8 else "#2a9d6f"
    else:
        share = spend.cost_usd / scale if scale else 0.0
        fill = "#99a"
    width = w * min(max(share, 0.0), 1.0)
    return (
        f'<svg class="spend" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{esc(spend.name)}"><rect width="{w}" height="{h}" fill="#eef0f4"/>'
        f'<rect class="bar" width="{width:.1f}" height="{h}" fill="{fill}"/></svg>'
    )


def daily_chart(days: Sequence[str], series: dict[str, list[float]], unit: Callable[[float], str]) -> str:
    """One stacked bar per day (one colour per product), a ``<title>`` on each for its value."""
    w, h, pad = 720, 150, 18
    step = w / len(days)
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    top = max([*totals, 0.0]) or 1.0
    parts = [
        f'<svg class="daily" width="{w}" height="{h + pad}" viewBox="0 0 {w} {h + pad}" role="img" '
        f'aria-label="per day"><rect width="{w}" height="{h}" fill="#f1f3f7"/>',
        f'<text x="4" y="12" font-size="11" fill="#556">max {esc(unit(top))}</text>',
    ]
    order = [p for p in PRODUCTS if p in series] + sorted(set(series) - set(PRODUCTS))
    for i, day in enumerate(days):
        y = float(h)
        for product in order:
            value = series[product][i]
            if value <= 0:
                continue
            bar_h = (h - 16) * value / top
            y -= bar_h
            parts.append(
                f'<rect class="bar" x="{i * step + 1:.1f}" y="{y:.1f}" width="{step - 2:.1f}" '
                f'height="{bar_h:.1f}" fill="{COLORS.get(product, OTHER_COLOR)}">'
                f"<title>{esc(day)} {esc(product)}: {esc(unit(value))}</title></rect>"
            )
    parts.append(f'<text x="0" y="{h + 13}" font-size="11" fill="#556">{esc(days[0])}</text>')
    parts.append(
        f'<text x="{w}" y="{h + 13}" font-size="11" fill="#556" text-anchor="end">{esc(days[-1])}</text>'
    )
    legend = "".join(
        f'<span><svg width="10" height="10"><rect width="10" height="10" '
        f'fill="{COLORS.get(p, OTHER_COLOR)}"/></svg> {esc(p)}</span>'
        for p in order
    )
    return "".join(parts) + f'</svg><div class="legend note">{legend}</div>'


def _limit_rows(status: Status) -> str:
    rows = []
    for v in status.limits:
        size = (
            f"{v.capacity} per {_num(v.window_s)} s"
            if v.kind == Kind.WINDOW.value
            else f"{v.capacity} at once"
        )
        now = "?" if v.out is None else f"{v.out} / {v.capacity}"
        waiting = "?" if v.waiting is None else str(v.waiting)
        shadow = ' <span class="note">(shadow: not enforced)</span>' if v.shadow else ""
        rows.append(
            f"<tr><td>{esc(v.name)}{shadow}</td><td>{esc(size)}</td><td class=n>{esc(now)}</td>"
            f"<td class=n>{esc(waiting)}</td><td class=n>{v.waiting_here}</td>"
            f"<td>{sparkline(v.history, v.capacity, status.clock_now, status.keep_s)}</td></tr>"
        )
    return "".join(rows)


def _queue_section(status: Status) -> str:
    out = ['<h2>Queue</h2><p class="note">Waiting per project: <b>this instance\'s view</b> (requests '
           f"instance {esc(status.instance)} holds waiting); the limits' table above counts every "
           "instance's.</p>"]  # fmt: skip
    if status.waiting_by_owner:
        out.append("<table><tr><th>project / key</th><th>limit</th><th>waiting here</th></tr>")
        for owner in sorted(status.waiting_by_owner):
            for limit, n in sorted(status.waiting_by_owner[owner].items()):
                out.append(f"<tr><td>{esc(owner)}</td><td>{esc(limit)}</td><td class=n>{n}</td></tr>")
        out.append("</table>")
    else:
        out.append("<p>No request is waiting on this instance.</p>")
    if status.jobs is not None:
        scope = (
            "this instance's job file"
            if status.store_kind == "memory"
            else "every instance (the shared store)"
        )
        out.append(
            f"<p>Transcripts: <b>{status.jobs.get('queued', 0)}</b> queued in the gateway, "
            f"<b>{status.jobs.get('running', 0)}</b> running upstream "
            f"<span class=note>({esc(scope)})</span></p>"
        )
    if status.dispatch_paused:
        out.append(f'<p class="bad">Dispatch paused: {esc(status.dispatch_paused)}</p>')
    return "".join(out)


def _spend_section(status: Status) -> str:
    who = "project" if status.managed else "client key (fingerprint)"
    out = [
        f"<h2>Spend this month ({esc(status.month)}, UTC)</h2>",
        f'<p class="note">Recorded usage × prices (taken {esc(status.prices_taken)}); work admitted '
        "and not yet billed is not included.</p>",
        f"<table><tr><th>{esc(who)}</th><th>spent</th><th>cap</th><th></th></tr>",
    ]
    scale = max([s.cost_usd for s in status.spend] + [0.0])
    for s in [*status.spend, status.account]:
        name = esc(s.name) if s.name else '<span class="note">(none: pass-through)</span>'
        if s is status.account:
            name = "<b>account (all together)</b>"
        cap = _usd(s.cap_usd) if s.cap_usd is not None else '<span class="note">no cap</span>'
        over = s.cap_usd is not None and s.cost_usd >= s.cap_usd
        flag = ' <span class="bad">cap reached</span>' if over else ""
        unpriced = f' <span class="note">({s.unpriced} unpriced lines)</span>' if s.unpriced else ""
        out.append(
            f"<tr><td>{name}</td><td class=n>{esc(_usd(s.cost_usd))}{unpriced}</td><td class=n>{cap}</td>"
            f"<td>{spend_bar(s, scale or 1.0)}{flag}</td></tr>"
        )
    out.append("</table>")
    if status.unpriced_models:
        out.append(
            f'<p class="note">Unpriced (counted as $0; add them to pricing:): '
            f"{esc(', '.join(status.unpriced_models))}</p>"
        )
    return "".join(out)


def render_page(status: Status) -> str:
    problems = "".join(f'<p class="problem">{esc(p)}</p>' for p in status.problems)
    shared = "shared (Redis)" if status.store_kind != "memory" else "embedded (this instance only)"
    head = (
        f"<h1>aai-gateway status</h1><p class=note>Instance {esc(status.instance)} · store "
        f"{esc(status.store_kind)}, {esc(shared)} · {esc(status.today)} UTC · "
        f"{'managed (projects)' if status.managed else 'pass-through'} mode</p>{problems}"
    )
    limits = (
        "<h2>Limits</h2>"
        f'<p class="note">Use now is the store\'s count (every instance); the line is the last '
        f"{status.keep_s / 60:.0f} minutes as sampled by this instance (blue: in use, orange: "
        "waiting, dashed: capacity).</p>"
        "<table><tr><th>limit</th><th>capacity</th><th>in use</th><th>waiting (all)</th>"
        f"<th>waiting here</th><th>last hour</th></tr>{_limit_rows(status)}</table>"
    )
    cost = status.cost_by_product
    hours = status.hours_by_product
    daily = (
        f"<h2>Usage per day (last {len(status.days)} days, UTC)</h2><h3>Cost</h3>"
        + (daily_chart(status.days, cost, _usd) if cost else "<p>No usage recorded.</p>")
        + "<h3>Audio hours (transcribed and streamed)</h3>"
        + (daily_chart(status.days, hours, lambda v: f"{v:.2f} h") if hours else "<p>No audio.</p>")
    )
    body = head + limits + _queue_section(status) + _spend_section(status) + daily
    return document("aai-gateway status", body)


# -- the routes ----------------------------------------------------------------------------
def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", headers=HEADERS)


def status_routes(
    token: str,
    *,
    ledger: Callable[[], Ledger],
    config: Callable[[], Config],
    store: Store,
    catalog: Catalog,
    engine: AdmissionEngine,
    transcripts: Transcripts,
    history: UseHistory,
    today: Callable[[], dt.date] = utc_today,
) -> list[tuple[str, str, Handler]]:
    """(method, path, handler) for GET and POST ``/admin/`` (and ``/admin``: one resource, so
    the gateway's trailing-slash check finds the same route either way). ``ledger`` and
    ``config`` are read per request (a reload changes them)."""
    check = require_admin(token)
    digest = hashlib.sha256(token.encode()).digest()

    async def page() -> web.Response:
        status = await gather(
            ledger=ledger(), config=config(), store=store, catalog=catalog, engine=engine,
            transcripts=transcripts, history=history, today=today(),
        )  # fmt: skip
        return _html(render_page(status))

    async def get(request: web.Request) -> web.StreamResponse:
        if not token:
            raise NotFound()
        if hdrs.AUTHORIZATION not in request.headers:
            return _html(render_login())
        check(request)  # a wrong bearer: the admin API's JSON 401/403
        return await page()

    async def post(request: web.Request) -> web.StreamResponse:
        if not token:
            raise NotFound()
        if request.content_length is None or request.content_length > MAX_FORM:
            return _html(render_login("The form was too large or had no length."), 413)
        try:
            form = parse_qs((await request.read()).decode("utf-8", "replace"), max_num_fields=8)
        except ValueError:
            form = {}
        given = (form.get("token") or [""])[0].strip()
        # Compared as require_admin compares the header: SHA-256 digests, in constant time.
        if not given or not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), digest):
            return _html(render_login("That token is not the admin token."), 403)
        return await page()

    get.status_page = True  # type: ignore[attr-defined]  # tests find the routes by it
    path = "/admin{slash:/?}"
    return [("GET", path, get), ("POST", path, post)]
