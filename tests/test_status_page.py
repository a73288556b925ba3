"""The status page (/admin/, gateway/status_page.py): its sampler, its auth and headers through
the gateway, and what a real browser (Debian's chromium, headless, driven over the DevTools
protocol with aiohttp's websocket client: no new dependency) shows.

The browser test FAILS when chromium is missing under CI (CI=true; .ci/run installs it) and
is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.admission.engine import AdmissionEngine
from gateway.admission.limits import RANK_WINDOW, window_limit
from gateway.admission.memory import MemoryStore
from gateway.app import (
    CATALOG,
    ENGINE,
    LEDGER,
    METRICS,
    RELOADER,
    STORE,
    TRANSCRIPTS,
    build_app,
    errors_middleware,
)
from gateway.clock import ManualClock, SystemClock, settle
from gateway.config import Limits
from gateway.errors import StoreUnavailable
from gateway.identity import project_owner
from gateway.ledger import Event, Line
from gateway.products.catalog import Catalog
from gateway.status_page import (
    HISTORY_S,
    SAMPLE_EVERY_S,
    UseHistory,
    owner_name,
    status_routes,
)
from tests.helpers import gateway_config, running_sim

TOKEN = "status-page-admin-token-8c1f"
HOSTILE = "<script>alert(1)</script>"
HOSTILE_CUSTOMER = "<img src=x onerror=window.__pwned=1>"
PROJECTS = [{"name": "ci", "monthly_spend_cap_usd": 10}, {"name": "web"}]


@asynccontextmanager
async def status_gateway(
    token: str = TOKEN, managed: bool = True
) -> AsyncIterator[tuple[str, web.Application]]:
    """A managed gateway (build_app) with two projects (or a pass-through one, with a cap per
    client key), serving the status page. Until
    app.py registers status_routes, they are served here, on a small app beside it, over the
    gateway's own objects (and its errors middleware)."""
    async with running_sim() as (_, sim_url):
        caps: dict[str, Any] = {"projects": PROJECTS} if managed else {"key_monthly_spend_cap_usd": 5}
        config = gateway_config(sim_url, spend_cap_usd=100, **caps)
        app = build_app(
            config, registry=CollectorRegistry(), admin_token=token, upstream_key="sk-upstream-test"
        )
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            if any(getattr(r.handler, "status_page", False) for r in app.router.routes()):
                yield str(server.make_url("")).rstrip("/"), app
                return
            catalog = app[CATALOG]
            history = UseHistory(app[STORE], catalog, SystemClock())
            await history.sample()
            side = web.Application(middlewares=[errors_middleware(app[METRICS])])
            for method, path, handler in status_routes(
                token, ledger=lambda: app[LEDGER], config=lambda: app[RELOADER].config,
                store=app[STORE], catalog=catalog, engine=app[ENGINE], transcripts=app[TRANSCRIPTS],
                history=history,
            ):  # fmt: skip
                side.router.add_route(method, path, handler)
            page = TestServer(side, host="127.0.0.1")
            await page.start_server()
            try:
                yield str(page.make_url("")).rstrip("/"), app
            finally:
                await page.close()
        finally:
            await server.close()


async def record_usage(app: web.Application) -> None:
    """Two hours of Universal-3-Pro for project ci today ($0.42), a streaming half hour for
    web three days ago, and LLM tokens (unpriced) for a project with a hostile name."""
    ledger, now = app[LEDGER], time.time()
    line = Line("ci", "ci/main", "transcription", "universal-3-pro", "")
    await ledger.record(Event("transcript:status-1", now, line, {"audio_seconds": 7200.0, "transcripts": 1}))
    line = Line("web", "web/main", "streaming", "universal-streaming", "")
    amounts = {"session_seconds": 1800.0, "audio_seconds": 1700.0, "sessions": 1}
    await ledger.record(Event("session:status-2", now - 3 * 86400, line, amounts))
    line = Line(HOSTILE, f"{HOSTILE}/k", "llm", "gpt-5", HOSTILE_CUSTOMER)
    await ledger.record(Event("llm:status-3", now, line, {"input_tokens": 1000.0, "requests": 1}))


# -- the sampler ---------------------------------------------------------------------------
async def test_history_keeps_one_hour_of_samples() -> None:
    clock = ManualClock()
    catalog = Catalog(Limits.model_validate({}))
    history = UseHistory(MemoryStore(clock), catalog, clock)
    for _ in range(int(HISTORY_S / SAMPLE_EVERY_S) + 30):
        await history.sample()
        clock._now += SAMPLE_EVERY_S  # (no task waits on this clock)
    names = [limit.name for limit in catalog.fixed_limits()]
    series = history.series(names[0])
    assert len(series) == int(HISTORY_S / SAMPLE_EVERY_S)  # the last hour, not one sample more
    assert clock.now() - series[0].at <= HISTORY_S
    assert all(s.out == 0 and s.waiting == 0 for s in series)
    assert history.series("no-such-limit") == []


# -- auth and headers, without a browser ---------------------------------------------------
async def test_login_auth_headers_and_escaping() -> None:
    async with status_gateway() as (url, app), aiohttp.ClientSession() as http:
        await record_usage(app)
        async with http.get(url + "/admin/") as r:
            form = await r.text()
            assert r.status == 200 and 'name="token"' in form and 'method="post"' in form
            assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Referrer-Policy"] == "no-referrer"
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "img-src data:" in csp and "script-src" not in csp
        async with http.get(url + "/admin/", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 403 and "error" in await r.json()
        async with http.post(url + "/admin/", data={"token": "wrong"}) as r:
            text = await r.text()
            assert r.status == 403 and "not the admin token" in text and 'name="token"' in text
            assert r.headers["Cache-Control"] == "no-store"
        async with http.post(url + "/admin/", data={"token": "x" * 5000}) as r:
            assert r.status == 413
        for method, path, kw in [
            ("POST", "/admin/", {"data": {"token": TOKEN}}),
            ("GET", "/admin/", {"headers": {"Authorization": f"Bearer {TOKEN}"}}),
            ("GET", "/admin", {"headers": {"Authorization": f"Bearer {TOKEN}"}}),
        ]:
            async with http.request(method, url + path, **kw) as r:
                page = await r.text()
                assert r.status == 200, (method, path, page[:300])
                assert r.headers["Content-Security-Policy"] == csp
                assert "requests" in page and "Spend this month" in page
                assert HOSTILE not in page and HOSTILE_CUSTOMER not in page
                assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
                assert "<script" not in page.lower()


async def test_no_admin_token_no_page() -> None:
    async with status_gateway(token="") as (url, _), aiohttp.ClientSession() as http:
        for method in ("GET", "POST"):
            async with http.request(method, url + "/admin/", data={"token": ""}) as r:
                assert r.status == 404 and "error" in await r.json()


# -- in a real browser ---------------------------------------------------------------------
def chromium_or_skip() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return exe


class Cdp:
    """Just enough of the Chrome DevTools Protocol, over one page target's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            data = json.loads(msg.data)
            if "id" in data:
                call = self._calls.pop(data["id"], None)
                if call is not None and not call.done():
                    call.set_result(data)
            else:
                self.events.append(data)
                self._changed.set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        self._calls[n] = asyncio.get_running_loop().create_future()
        await self._ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        reply = await asyncio.wait_for(self._calls[n], 10)
        assert "error" not in reply, (method, reply)
        return dict(reply["result"])

    async def event(self, method: str, since: int) -> dict[str, Any]:
        """The first ``method`` event from index ``since`` on (waiting for it, at most 10 s)."""
        async with asyncio.timeout(10):
            while True:
                self._changed.clear()
                for e in self.events[since:]:
                    if e["method"] == method:
                        return e
                await self._changed.wait()

    async def js(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in out, out
        return out["result"].get("value")

    async def load(self, action: str, **params: Any) -> int:
        """Run a navigation (Page.navigate, or a script that submits a form); wait for the
        load; the document's HTTP status."""
        mark = len(self.events)
        if action == "Page.navigate":
            await self.call(action, **params)
        else:
            await self.js(action)
        await self.event("Page.loadEventFired", mark)
        for e in self.events[mark:]:
            if e["method"] == "Network.responseReceived" and e["params"]["type"] == "Document":
                return int(e["params"]["response"]["status"])
        raise AssertionError("no document was received")

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@asynccontextmanager
async def chromium(exe: str, profile: Path) -> AsyncIterator[Cdp]:
    """Headless chromium on a port of its own choosing (read from its stderr), its page
    target's protocol; killed with its process group at the end."""
    proc = await asyncio.create_subprocess_exec(
        exe, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-sandbox",
        "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[bytes] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(15):
            port = None
            while port is None:
                line = await proc.stderr.readline()
                assert line, b"chromium ended before listening: " + b"".join(seen[-20:])
                seen.append(line)
                found = re.search(rb"DevTools listening on ws://[^ ]*?:(\d+)/", line)
                port = int(found.group(1)) if found else None

        async def swallow() -> None:  # chromium's later stderr, so its pipe never fills
            assert proc.stderr is not None
            while await proc.stderr.read(65536):
                pass

        drain = asyncio.create_task(swallow())
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(10):
                while True:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page"]
                    if pages:
                        break
                    await asyncio.sleep(0.05)
            ws = await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            cdp = Cdp(ws)
            try:
                yield cdp
            finally:
                await cdp.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if drain is not None:
            await drain


async def test_status_page_in_chromium(tmp_path: Path) -> None:
    exe = chromium_or_skip()
    started = time.monotonic()
    async with status_gateway() as (url, app), chromium(exe, tmp_path / "profile") as cdp:
        await record_usage(app)
        for domain in ("Page", "Network", "Runtime"):
            await cdp.call(f"{domain}.enable")

        # Without a token: the login form, and nothing else.
        assert await cdp.load("Page.navigate", url=url + "/admin/") == 200
        assert await cdp.js("document.querySelectorAll('form.login input[name=token]').length") == 1
        assert "Admin token" in await cdp.js("document.body.innerText")

        submit = (
            "document.querySelector('#token').value = {!r};"
            "document.querySelector('form.login button').click();"
        )
        # A wrong token: the form again, with an error, 403.
        assert await cdp.load(submit.format("not-the-token")) == 403
        assert "That token is not the admin token" in await cdp.js("document.body.innerText")
        assert await cdp.js("location.href") == url + "/admin/"  # the token was never in a URL

        # The right one: the page.
        assert await cdp.load(submit.format(TOKEN)) == 200
        text = await cdp.js("document.body.innerText")
        catalog = app[CATALOG]
        for limit in catalog.fixed_limits():
            assert limit.name in text
        requests = catalog.requests
        assert f"{requests.capacity} per {requests.window_ms // 1000} s" in text
        assert f"{catalog.async_jobs.capacity} at once" in text
        rows = await cdp.js("[...document.querySelectorAll('tr')].map(r => r.innerText)")
        ci = [r for r in rows if r.startswith("ci\t")]
        assert ci and "$0.4200" in ci[0] and "$10.00" in ci[0], rows
        account = [r for r in rows if r.startswith("account")]
        assert account and "$100.00" in account[0], rows
        assert any(r.startswith("web\t") and "no cap" in r for r in rows), rows
        assert "this instance's view" in text

        sparks = await cdp.js("document.querySelectorAll('svg.spark').length")
        assert sparks == len(catalog.fixed_limits())
        ci_bar = await cdp.js(
            "[...document.querySelectorAll('svg.spend')].find(s => s.getAttribute('aria-label') === 'ci')"
            ".querySelector('rect.bar').getAttribute('width')"
        )
        assert float(ci_bar) > 0
        assert await cdp.js("document.querySelectorAll('svg.daily rect.bar').length") >= 3

        # User data stays text: shown as written, never run.
        assert HOSTILE in text
        assert await cdp.js("document.querySelectorAll('script').length") == 0
        assert await cdp.js("typeof window.__pwned") == "undefined"
        assert not [e for e in cdp.events if e["method"] == "Page.javascriptDialogOpening"]
        # The inline CSS applied (its hash is in the CSP): the body has its max width.
        assert await cdp.js("getComputedStyle(document.body).maxWidth") != "none"

        # No request left the gateway (no CDN, no font, no favicon elsewhere).
        urls = [
            e["params"]["request"]["url"] for e in cdp.events if e["method"] == "Network.requestWillBeSent"
        ]
        assert urls and all(u.startswith(url + "/") or u.startswith("data:") for u in urls), urls
    assert time.monotonic() - started < 20


async def test_the_engine_says_who_waits_here_per_limit_and_project() -> None:
    """The queue per project is this instance's engine's waiters, by owner (a project, or a
    key's fingerprint in pass-through mode)."""
    clock = ManualClock()
    engine = AdmissionEngine(MemoryStore(clock), clock)
    await engine.start()
    one = window_limit("one", 1, 60, 0, rank=RANK_WINDOW)
    try:
        await engine.admit([one], max_wait_s=30)
        waiting = [
            asyncio.create_task(engine.admit([one], max_wait_s=30, owner=owner, max_owner_depth=5))
            for owner in (project_owner("ci"), project_owner("ci"), "f" * 64)
        ]
        await settle()
        assert engine.waiting() == {"one": {"project:ci": 2, "f" * 64: 1}}
        assert [owner_name(o) for o in ("project:ci", "f" * 64, "")] == [
            "ci",
            "key " + "f" * 16,
            "(no owner share)",
        ]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert engine.waiting() == {}
    finally:
        await engine.close()


async def test_pass_through_spend_is_per_client_key() -> None:
    async with status_gateway(managed=False) as (url, app), aiohttp.ClientSession() as http:
        line = Line("", "ab12" * 16, "transcription", "universal-2", "")
        await app[LEDGER].record(Event("transcript:pt-1", time.time(), line, {"audio_seconds": 3600.0}))
        async with http.post(url + "/admin/", data={"token": TOKEN}) as r:
            page = await r.text()
        assert r.status == 200
        assert "client key (fingerprint)" in page and "ab12" * 16 in page
        assert "$0.1500" in page and "$5.00" in page  # one hour of universal-2, the key's cap


async def test_store_away_the_page_says_so() -> None:
    """Redis away: the page still answers, naming what it could not read."""

    async def away(*args: Any) -> Any:
        raise StoreUnavailable("connection refused")

    async with status_gateway() as (url, app), aiohttp.ClientSession() as http:
        store, ledger = app[STORE], app[LEDGER]
        store.usage = away  # type: ignore[method-assign]
        ledger.rows = away  # type: ignore[method-assign]
        async with http.post(url + "/admin/", data={"token": TOKEN}) as r:
            page = await r.text()
        assert r.status == 200
        assert "the store did not answer (connection refused)" in page
        assert "the ledger did not answer (connection refused)" in page
        assert "requests" in page and "No usage recorded" in page
