"""Exactness and use of each window under 5x overload, with three gateway instances.

Three ``aai-gateway serve`` processes share one private redis-server in front of the upstream
simulator, a process of its own and the judge (tests/soak_support.py's: the plain simulator
plus the arrival time of every request in each of its windows, which ``/_sim/report`` does
not give). Limits are short (3 s windows) and small, so a 25 s run turns each window over
eight times. A client offers OVERLOAD times every limit at once, spread evenly over the
instances, in open loops:

- the account's requests window: ``GET /v2/transcript/{id}`` making up the rest of OVERLOAD x
  its capacity (chat and transcript POSTs count in it too);
- each model's LLM window: ``POST /v1/chat/completions``;
- the transcripts' concurrency: ``POST /v2/transcript`` (queued in the gateway, dispatched
  as slots free; jobs run JOB_S upstream, their ends come back as webhooks);
- the streaming sessions' window of new sessions: ``/v3/ws`` sessions (Begin, 100 ms of
  audio, Terminate).

For each limit it prints what upstream saw: its violations (must be 0), its busiest window
against the capacity, and how much of the capacity was used on average while saturated
(after the first lease life, until the load stops; sampled every 0.1 s): arrivals in the
trailing W (upstream's own window: the gateway's guard caps it at W / (W + guard)) and in
the trailing W + guard (a window lease's life, the most the gateway's schedule allows, as
tests/test_soak.py judges it); for the concurrency, the mean of the jobs running upstream.

    python bench/overload_exactness.py                  # ~45 s: 25 s of load
    python bench/overload_exactness.py --seconds 12 --overload 5 --guard-ms 100 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.sim.recorder import busiest_window  # noqa: E402
from tests.helpers import Limits, Process, start_gateways  # noqa: E402
from tests.soak_support import SimProcess  # noqa: E402
from tests.test_redis_trouble import PrivateRedis  # noqa: E402

INSTANCES = 3
W = 3.0  # every window limit's length (s)
REQUESTS, MODEL, JOBS, SESSIONS = 60, 6, 4, 4  # per W (the whole account), per W per model, at once, per W
MODELS = ("gpt-5", "claude-sonnet-4-6")
JOB_S = 1.0  # how long a transcript runs upstream
MAX_WAIT_S = 3.0  # every queue's (requests, chat, streaming): then 429 / 3009
KEY = "bench-overload-key"
STEP_S = 0.1  # sampling step of the averages


class Load:
    """The client: open loops at fixed rates, every answer's outcome counted per kind."""

    def __init__(self, gateways: list[Process], http: aiohttp.ClientSession) -> None:
        self.targets = itertools.cycle(g.url for g in gateways)
        self.http = http
        self.outcomes: dict[str, Counter[str]] = {}

    def note(self, kind: str, outcome: str) -> None:
        self.outcomes.setdefault(kind, Counter())[outcome] += 1

    async def request(self, kind: str, method: str, path: str, body: Any = None) -> None:
        try:
            async with self.http.request(
                method, next(self.targets) + path, json=body, headers={"Authorization": KEY}
            ) as r:
                await r.read()
                self.note(kind, str(r.status))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.note(kind, type(exc).__name__)

    async def get(self, _: int) -> None:
        await self.request("GET", "GET", f"/v2/transcript/{uuid.uuid4().hex}")

    def chat(self, model: str) -> Callable[[int], Awaitable[None]]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return lambda _: self.request(f"chat {model}", "POST", "/v1/chat/completions", body)

    async def transcript(self, i: int) -> None:
        audio = f"https://example.com/bench/{i}.mp3?sim_seconds={JOB_S}"
        await self.request("transcript POST", "POST", "/v2/transcript", {"audio_url": audio})

    async def session(self, _: int) -> None:
        """Begin, 100 ms of audio, Terminate; or the gateway's 3009 after MAX_WAIT_S."""
        url = "ws" + next(self.targets).removeprefix("http") + "/v3/ws?sample_rate=16000"
        outcome = "closed before Begin"
        try:
            async with self.http.ws_connect(url, headers={"Authorization": KEY}) as ws:
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    event = json.loads(msg.data)
                    if event.get("type") == "Begin":
                        outcome = "begun, not terminated"
                        await ws.send_bytes(bytes(3200))  # 100 ms of 16 kHz pcm_s16le
                        await ws.send_str(json.dumps({"type": "Terminate"}))
                    elif event.get("type") == "Termination":
                        outcome = "Begin..Termination"
                        break
                    elif event.get("type") == "Error":
                        outcome = f"Error {event.get('error_code')}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = type(exc).__name__
        self.note("streaming session", outcome)


async def at_rate(rate: float, seconds: float, call: Callable[[int], Awaitable[None]], phase: float) -> None:
    """``call(0)``, ``call(1)``, ... started on schedule (``rate`` a second from ``phase``
    seconds in, for ``seconds``) whatever the earlier ones are doing; then all awaited."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for i in itertools.count():
        at = start + phase + i / rate
        if at - start >= seconds:
            break
        await asyncio.sleep(max(0.0, at - loop.time()))
        tasks.append(asyncio.ensure_future(call(i)))
    await asyncio.gather(*tasks)


def window_use(arrivals: list[float], limit: int, span: float, a: float, b: float) -> float:
    """Mean over t in [a, b) (every STEP_S) of the arrivals in (t - span, t], over ``limit``."""
    times = sorted(arrivals)
    samples = [a + i * STEP_S for i in range(max(0, int((b - a) / STEP_S)))]
    held = sum(bisect.bisect_right(times, t) - bisect.bisect_right(times, t - span) for t in samples)
    return held / (len(samples) * limit) if samples else 0.0


def running_use(jobs: list[dict[str, Any]], limit: int, a: float, b: float) -> float:
    """Mean over t in [a, b) of the jobs running upstream at t (created..ended), over ``limit``."""
    spans = [(j["created"], j["ended"] or b) for j in jobs]
    samples = [a + i * STEP_S for i in range(max(0, int((b - a) / STEP_S)))]
    held = sum(sum(1 for s, e in spans if s <= t < e) for t in samples)
    return held / (len(samples) * limit) if samples else 0.0


async def run(args: argparse.Namespace) -> int:
    guard = args.guard_ms / 1000
    span = W + guard
    limits = Limits(REQUESTS, MODEL, W, MODELS, guard_ms=args.guard_ms)
    x = args.overload
    rates = {
        "chat": x * MODEL / W,  # per model
        "transcript": x * JOBS / JOB_S,
        "session": x * SESSIONS / W,
    }
    rates["GET"] = max(1.0, x * REQUESTS / W - len(MODELS) * rates["chat"] - rates["transcript"])
    print(
        f"{INSTANCES} gateway processes, one private Redis, the simulator as the judge; "
        f"{x:g}x every limit for {args.seconds:g} s (windows of {W:g} s, guard {args.guard_ms} ms, "
        f"max wait {MAX_WAIT_S:g} s, seed {args.seed})"
    )
    print(
        f"offered: GET {rates['GET']:.1f}/s, chat {rates['chat']:.1f}/s per model ({len(MODELS)} models), "
        f"transcript POSTs {rates['transcript']:.1f}/s (jobs of {JOB_S:g} s), "
        f"streaming sessions {rates['session']:.1f}/s; load average {os.getloadavg()[0]:.2f}\n",
        flush=True,
    )
    redis = PrivateRedis()
    await redis.start()
    sim = SimProcess(
        limits.sim_config(
            async_concurrency=JOBS, streaming_limit=SESSIONS, streaming_window_s=W, job_seconds=JOB_S
        )
    )
    raw = limits.gateway_config(
        sim.url,
        {"url": redis.url, "key_prefix": "overload"},
        limits={"async_concurrency": JOBS, "streaming_sessions": {"limit": SESSIONS, "window_s": W}},
        queue={"max_wait_s": MAX_WAIT_S, "llm_max_wait_s": MAX_WAIT_S},
        streaming={"max_wait_s": MAX_WAIT_S},
    )
    gateways: list[Process] = []
    try:
        await sim.ready("/_sim/report")
        gateways = await start_gateways(raw, INSTANCES, public_url=True)
        timeout = aiohttp.ClientTimeout(total=MAX_WAIT_S + 30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
            load = Load(gateways, http)
            rng = random.Random(args.seed)
            streams = [
                (rates["GET"], load.get),
                *((rates["chat"], load.chat(m)) for m in MODELS),
                (rates["transcript"], load.transcript),
                (rates["session"], load.session),
            ]
            t0 = time.monotonic()
            await asyncio.gather(
                *(at_rate(rate, args.seconds, call, rng.uniform(0, 1 / rate)) for rate, call in streams)
            )
            t1 = t0 + args.seconds
            # Then transcripts alone (the backlog keeps their concurrency saturated), the
            # account window no longer full once the waiters above are answered.
            await asyncio.sleep(max(0.0, t1 + MAX_WAIT_S + 0.5 - time.monotonic()))
            t2 = time.monotonic()
            await at_rate(rates["transcript"], args.alone_seconds, load.transcript, 0.0)
            t3 = t2 + args.alone_seconds
            async with http.get(sim.url + "/_sim/soak") as r:
                dump = await r.json()
    finally:
        for p in [*gateways, sim]:
            p.kill()
        redis.kill()

    if args.dump:  # everything upstream saw, for a closer look
        text = json.dumps({"t": [t0, t1, t2, t3], "dump": dump})
        await asyncio.to_thread(Path(args.dump).write_text, text)
    report, windows = dump["report"], dump["windows"]
    a = t0 + span  # saturated from the first lease life on (the window carries what came before)
    violations = Counter(v["limit"] for v in report["violations"])
    # (the name shown, the simulator's window and its violations' limit, the capacity)
    rows = [("requests", "requests", "requests", REQUESTS)]
    rows += [(f"llm:{m}", f"llm:{m}", f"llm:{m}", MODEL) for m in MODELS]
    rows.append(("streaming sessions", "streaming", "streaming_sessions", SESSIONS))
    print(f"{'limit':<22} {'capacity':<14} {'violations':>10}  {'busiest window':<16} {'use per W':>9}  "
          f"{'use per W+guard':>15}")  # fmt: skip
    for name, key, judged, limit in rows:
        arrivals = windows.get(key, [])
        busiest = busiest_window(arrivals, W)
        bad = violations[judged]
        per_w, per_span = window_use(arrivals, limit, W, a, t1), window_use(arrivals, limit, span, a, t1)
        print(
            f"{name:<22} {f'{limit} per {W:g} s':<14} {bad:>10}  {f'{busiest} of {limit}':<16} "
            f"{per_w:>9.1%}  {per_span:>15.1%}"
        )
    jobs = dump["jobs"]
    use = running_use(jobs, JOBS, t0 + 2 * JOB_S, t1)
    alone = running_use(jobs, JOBS, t2 + JOB_S, t3)
    most = report["transcripts"]["max_running"]
    print(
        f"{'transcripts running':<22} {f'{JOBS} at once':<14} {violations['async_concurrency']:>10}  "
        f"{f'{most} of {JOBS} at once':<16} {use:>9.1%}  (mean jobs running upstream / {JOBS})"
    )
    print(
        f"{'  then alone':<22} {'':<14} {'':>10}  {'':<16} {alone:>9.1%}  (the {args.alone_seconds:g} s "
        "after: transcripts only, the account window not full)"
    )
    print(f"\n(use per W is at most W / (W + guard) = {W / span:.1%}: the guard keeps each lease "
          f"{args.guard_ms} ms longer than upstream's window)")  # fmt: skip
    print("answers:")
    for kind, counts in load.outcomes.items():
        print(f"  {kind}: " + ", ".join(f"{k} x {v}" for k, v in counts.most_common()))
    streaming = report["streaming"]
    print(
        f"upstream: {report['requests']['arrivals']} requests, {report['transcripts']['submitted']} jobs "
        f"created, {streaming['sessions']} sessions ({streaming['terminated']} terminated, "
        f"{streaming['left_open']} left open)"
    )
    total = sum(violations.values())
    print(f"\n[{'met' if total == 0 else 'NOT MET'}] no violation upstream: {total}")
    if total:
        print("violations:", report["violations"][:10])
    full = all(busiest_window(windows.get(key, []), W) == limit for _, key, _, limit in rows) and most == JOBS
    print(f"[{'met' if full else 'NOT MET'}] every limit's busiest window reached its capacity")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=25.0, help="how long the load is offered")
    parser.add_argument(
        "--alone-seconds", type=float, default=10.0, help="then transcripts alone, for their concurrency"
    )
    parser.add_argument("--overload", type=float, default=5.0, help="offered load, times every limit")
    parser.add_argument("--guard-ms", type=int, default=100, help="limits.guard_ms (the shipped default)")
    parser.add_argument("--seed", type=int, default=1, help="the loops' phases")
    parser.add_argument("--dump", help="write what upstream saw (arrivals, jobs, report) to this JSON file")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
