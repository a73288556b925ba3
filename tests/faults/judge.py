"""The fault suite's judge: the one invariant checker every scenario runs after its load.

``judge()`` checks the seven invariants listed in tests/faults/harness.py, each a numbered
section below, once the load has stopped and a lease life has passed; its ``Verdict`` holds
the findings and the run's figures, ``explain()`` is what a failing scenario prints.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from tests.faults.load import Job, Load
from tests.faults.rig import SPAN, Rig
from tests.test_soak import background_restarts, inspect_store


@dataclass
class Verdict:
    failures: list[str]
    statuses: Counter[str]
    dump: dict[str, Any]
    jobs: list[Job]
    store: dict[str, Any]
    ledger: dict[str, float]
    logs: str = ""  # the live gateways' log tails, when something failed

    def summary(self) -> str:
        report = self.dump["report"]
        faults = Counter(f["kind"] for f in report["faults"])
        unterminated = [s["query"].get("faults_tag") for s in self.dump["sessions"] if not s["terminated"]]
        found_later = [j.n for j in self.jobs if j.not_found and j.status != "404"]
        return (
            f"answers {dict(sorted(self.statuses.items()))}; "
            f"jobs upstream {report['transcripts']['submitted']}; sessions {report['streaming']} "
            f"(never terminated: {unterminated}); jobs answered 404 then found: {found_later}; "
            f"faults {dict(faults)}; ledger {self.ledger}"
        )


async def ledger_totals(url: str, prefix: str) -> dict[str, float]:
    """The usage ledger's amounts summed per ``product.metric`` over every day it holds."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    totals: dict[str, float] = {}
    try:
        async for key in client.scan_iter(match=f"{prefix}:*:ledger:*"):
            fields = await client.hgetall(key)
            for name, value in fields.items():
                parts = str(name).split("|")
                metric = f"{parts[2]}.{parts[-1]}"
                totals[metric] = totals.get(metric, 0.0) + float(value)
    finally:
        await client.aclose()
    return totals


def llm_error(doc: Any) -> bool:
    """The LLM Gateway's own error shape (upstream's, passed through as it sent it)."""
    return isinstance(doc, dict) and isinstance(doc.get("message"), str) and "code" in doc


async def judge(
    the_rig: Rig,
    load: Load,
    *,
    exact_ledger: bool = True,
    lost_records_ok: Callable[[Job], bool] = lambda job: False,
    foreign_jobs: bool = False,
) -> Verdict:
    """The invariants of tests/faults/harness.py, once the load has stopped. ``exact_ledger``:
    the ledger must equal what upstream billed for work whose answer reached the gateway (else
    only never exceed it). ``foreign_jobs``: upstream may hold jobs ``load`` did not make (a
    fuzzer's; the store must still end with each of them ended). ``lost_records_ok(job)``:
    that job's record may be gone (a Redis that came back empty: README, "Through a Redis
    outage"), and the job with it if it was still queued in Redis: it must have run upstream
    at most once."""
    await asyncio.sleep(SPAN + 2.0)  # the last window leases end, and idle queue keys with them
    failures: list[str] = []
    r = the_rig
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        # 1. Alive, healthy, no background task died.
        for i, g in enumerate(r.gateways):
            if i in r.killed:
                continue
            if g.proc.poll() is not None:
                failures.append(f"gateway {i} exited {g.proc.returncode}: {g.output()}")
                continue
            try:
                async with http.get(g.url + "/healthz") as resp:
                    if resp.status != 200:
                        failures.append(f"gateway {i} /healthz {resp.status}")
                restarts = await background_restarts(http, g.url)
                if restarts:
                    failures.append(f"gateway {i}: {restarts:.0f} background task restarts")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"gateway {i} /healthz: {exc!r}")
        async with http.get(r.sim.url + "/_sim/faults") as resp:
            dump = await resp.json()
    report = dump["report"]
    faults = report["faults"]

    # 2. Every error JSON; no silence but from an instance the scenario disrupted.
    statuses: Counter[str] = Counter()
    bad: list[str] = []
    truncated = 0
    for c in load.calls:
        statuses[f"{c.kind}:{c.status or c.outcome.split(':')[0]}"] += 1
        if c.outcome == "dropped":
            continue
        if c.outcome.startswith("truncated"):
            truncated += 1
        if not c.status:
            if c.gateway not in r.disrupted:
                bad.append(f"{c.kind} on gateway {c.gateway}: {c.outcome}")
            continue
        if c.status < 300 or c.status == 101:
            continue
        try:
            doc = json.loads(c.body)
        except ValueError:
            doc = None
        ok = isinstance(doc, dict) and isinstance(doc.get("error"), str)
        if not ok and not (c.kind == "chat" and llm_error(doc)):
            bad.append(f"{c.kind} {c.status} {c.ctype}: {c.body[:200]!r}")
    if bad:
        failures.append(f"{len(bad)} answers neither JSON errors nor excused: {bad[:6]}")
    cuts = sum(1 for f in faults if f["kind"] in ("cut", "reset"))
    if truncated > cuts:
        failures.append(f"{truncated} answers cut short, upstream cut or reset only {cuts}")

    # 3. Every job a client was told of ran upstream exactly once and ended as its audio said.
    upstream = Counter(j["audio_url"] for j in dump["jobs"])
    known = {job.audio_url for job in load.jobs}
    if set(upstream) - known and not foreign_jobs:
        failures.append(f"upstream jobs no client asked for: {sorted(set(upstream) - known)[:3]}")
    wrong = []
    for job in load.jobs:
        runs = upstream[job.audio_url]
        if not job.job_id:  # (its client retried on every live instance for 30 s)
            wrong.append(f"job {job.n} never created (ran {runs} times upstream): {job.creates}")
            continue
        if job.status != job.expect and lost_records_ok(job):
            if runs > 1:  # its record is gone, and maybe the job with it; never run twice
                wrong.append(f"job {job.n}: record lost, yet {runs} upstream runs")
            continue
        if runs != 1 or job.status != job.expect:
            wrong.append(
                f"job {job.n}: {runs} upstream runs, ended {job.status or 'never'} (expected {job.expect})"
            )
    if wrong:
        failures.append(f"{len(wrong)} of {len(load.jobs)} jobs went wrong: {wrong[:6]}")

    # 4. Nothing held in the store.
    store = await inspect_store(r.redis.url, r.prefix)
    if store["problems"]:
        problems = sorted(store["problems"], key=lambda p: (":leases:" not in p, p))
        failures.append(f"{len(problems)} things left in the store: {problems[:6]}")

    # 5. Nothing charged for work that never ran upstream.
    ledger = await ledger_totals(r.redis.url, r.prefix)
    cut = {i for f in faults for i in f["cut_bills"]}
    bills = report["llm_billed"]  # chat and understanding: the ledger's product "llm"
    delivered = [b for i, b in enumerate(bills) if i not in cut]
    billed = {
        "llm.input_tokens": (
            sum(b["input_tokens"] for b in delivered),
            sum(b["input_tokens"] for b in bills),
        ),
        "llm.output_tokens": (
            sum(b["output_tokens"] for b in delivered),
            sum(b["output_tokens"] for b in bills),
        ),
        "transcription.transcripts": (len(dump["transcripts_billed"]),) * 2,
        "transcription.audio_seconds": (sum(b["seconds"] for b in dump["transcripts_billed"]),) * 2,
        "streaming.sessions": (len(dump["sessions"]),) * 2,
        "streaming.session_seconds": (sum(b["session_duration_seconds"] for b in dump["streaming_billed"]),)
        * 2,
    }
    for name, (floor, ceiling) in billed.items():
        got = ledger.get(name, 0.0)
        if got > ceiling + 1e-6:
            failures.append(f"ledger {name} = {got:g}, more than upstream ran ({ceiling:g})")
        elif exact_ledger and got < floor - 1e-6:
            failures.append(f"ledger {name} = {got:g}, less than upstream billed and answered ({floor:g})")

    # 6. Every upstream streaming session ended with Terminate (a killed instance's excepted).
    open_ = [
        s["query"].get("faults_tag", "?")
        for s in dump["sessions"]
        if not (s["closed"] and s["terminated"])
        and not _killed_tag(s["query"].get("faults_tag", ""), r.killed)
    ]
    if open_:
        failures.append(f"{len(open_)} upstream sessions never terminated: {open_[:6]}")

    # 7. No violation upstream.
    if report["violations"]:
        failures.append(f"upstream saw {len(report['violations'])} violations: {report['violations'][:4]}")
    logs = ""
    if failures:
        logs = "\n".join(
            f"--- gateway {i} log (tail) ---\n{g.output(3000)}"
            for i, g in enumerate(r.gateways)
            if i not in r.killed
        )
    return Verdict(failures, statuses, dump, load.jobs, store, ledger, logs)


def _killed_tag(tag: str, killed: set[int]) -> bool:
    return any(tag.startswith(f"g{i}-") for i in killed)


def explain(verdict: Verdict) -> str:
    """What a failing scenario prints: the findings, the run's figures, the gateways' logs."""
    return "\n".join(verdict.failures) + "\n" + verdict.summary() + "\n" + verdict.logs
