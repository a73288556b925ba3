"""The soak test's machinery (tests/test_soak.py): a simulator process that can tell what
arrived when, gateway processes with their own webhook receivers, a private Redis that can
be paused, and the analysis of what the simulator saw.

Run as ``python -m tests.soak_support --port N --sim-config JSON``: the upstream simulator
with two additions, ``/_sim/soak`` (every request's arrival time, the accepted arrivals of
each window, each transcript job) and a middleware in front of everything that notes each
request's arrival (``X-Soak-Id`` tells the client's request apart). Times are
``time.monotonic()``, which on Linux every process shares, so the test compares them with
its own.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.sim.app import SIM, Sim, SimConfig, build_sim_app
from tests.helpers import Process, free_port
from tests.test_redis_trouble import PrivateRedis

SOAK_ID = "X-Soak-Id"
ROOT = Path(__file__).resolve().parent.parent
ARRIVALS: web.AppKey[list[list[Any]]] = web.AppKey("soak_arrivals", list)


# -- the simulator process ------------------------------------------------------------------
def sim_app(config: SimConfig) -> web.Application:
    app = build_sim_app(Sim(config))
    app[ARRIVALS] = []

    @web.middleware
    async def note(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith("/_sim"):
            return await handler(request)
        entry = [time.monotonic(), request.method, request.path, request.headers.get(SOAK_ID, ""), 0]
        app[ARRIVALS].append(entry)
        resp = await handler(request)
        entry[4] = resp.status
        return resp

    app.middlewares.insert(0, note)  # outermost: the arrival, before the account's window counts it

    async def dump(request: web.Request) -> web.Response:
        sim = request.app[SIM]
        attempts: dict[str, int] = {}
        for entry in sim.transcripts.webhook_log:
            attempts[entry["transcript_id"]] = attempts.get(entry["transcript_id"], 0) + 1
        jobs = [
            {
                "id": j.id,
                "audio_url": j.body.get("audio_url"),
                "created": j.created,
                "ended": j.ended,
                "status": j.status,
                "webhooks": attempts.get(j.id, 0),
            }
            for j in sim.transcripts.jobs.values()
        ]
        windows = {
            "requests": sim.requests.arrivals,
            "streaming": sim.streaming.window.arrivals,
            **{w.name: w.arrivals for w in sim.llm.values()},
        }
        report = sim.report()
        return web.json_response(
            {"arrivals": request.app[ARRIVALS], "windows": windows, "jobs": jobs, "report": report}
        )

    app.router.add_get("/_sim/soak", dump)
    return app


def main(argv: Sequence[str] | None = None, app: Callable[[SimConfig], web.Application] = sim_app) -> None:
    """``python -m <module> --port N --sim-config JSON``: serve ``app`` (this simulator, or
    one built on it: tests/faults/rig.py's)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sim-config", default="{}")
    args = parser.parse_args(argv)
    config = SimConfig.from_dict(json.loads(args.sim_config))
    web.run_app(app(config), host="127.0.0.1", port=args.port, print=None)


class SimProcess(Process):
    """The simulator above in a process of its own (``Process``'s readiness, log and kill).
    ``module``: the one whose ``main`` serves it (``tests.faults.rig`` for the fault suite's)."""

    def __init__(self, config: SimConfig, module: str = "tests.soak_support") -> None:  # not Process's
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="aai-sim-", suffix=".log", delete=False)
        args = ["--port", str(self.port), "--sim-config", json.dumps(asdict(config))]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=dict(os.environ),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )


class PausableRedis(PrivateRedis):
    """The test's own redis-server (never the shared one), which SIGSTOP freezes."""

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)


# -- what the client saw ------------------------------------------------------------------
@dataclass
class Call:
    """One client request. ``limits``: the limits it needs (empty: it needs none, or left
    before it could wait). ``arrived``: when upstream saw it (0: never)."""

    kind: str
    soak_id: str
    limits: tuple[str, ...]
    start: float
    end: float = 0.0
    status: int = 0  # 0: no answer (cancelled, dropped, a client error)
    outcome: str = ""
    arrived: float = 0.0


@dataclass
class ClientJob:
    soak_id: str
    audio_url: str
    priority: int
    expect: str  # completed | error
    start: float
    job_id: str = ""
    status: str = ""
    dispatched: float = 0.0  # upstream created it (simulator time)
    creates: list[int] = field(default_factory=list)  # statuses of the create attempts


# -- capacity as upstream saw it -----------------------------------------------------------
class Timeline:
    """Free capacity on a grid of ``step`` seconds over [t0, t1), per limit, from what
    upstream saw. A window limit (N per W, the gateway's leases W + guard long) had room at t
    when fewer than N arrivals fell in (t - W - guard - slack, t + slack]: ``slack`` covers
    the transit between admission and arrival. A concurrency limit had room when fewer than
    C leases were held, a lease spanning [start, end) given by the caller."""

    def __init__(self, t0: float, t1: float, step: float = 0.05) -> None:
        self.t0, self.step = t0, step
        self.n = max(1, int((t1 - t0) / step) + 1)
        self.free: dict[str, list[bool]] = {}
        self.blind = [False] * self.n  # no judgement here (the store paused, and its recovery)

    def at(self, i: int) -> float:
        return self.t0 + i * self.step

    def index(self, t: float) -> int:
        return min(self.n - 1, max(0, int((t - self.t0) / self.step)))

    def window(self, name: str, arrivals: Iterable[float], limit: int, span_s: float, slack: float) -> None:
        times = sorted(arrivals)
        row = []
        for i in range(self.n):
            t = self.at(i)
            count = bisect.bisect_right(times, t + slack) - bisect.bisect_right(times, t - span_s - slack)
            row.append(count < limit)
        self.free[name] = row

    def concurrency(self, name: str, leases: Iterable[tuple[float, float]], limit: int) -> None:
        held = [0] * (self.n + 1)
        for start, end in leases:
            a, b = self.index(start), self.index(end) + 1
            held[a] += 1
            held[b] -= 1
        row, running = [], 0
        for i in range(self.n):
            running += held[i]
            row.append(running < limit)
        self.free[name] = row

    def exclude(self, start: float, end: float) -> None:
        for i in range(self.index(start), self.index(end) + 1):
            self.blind[i] = True

    def stranded_s(self, limits: Sequence[str], start: float, end: float) -> float:
        """The longest stretch inside [start, end] during which every one of ``limits`` had
        room (outside the blind stretches): a waiter needing them should have been admitted."""
        best = run = 0
        for i in range(self.index(start), self.index(end) + 1):
            if not self.blind[i] and all(self.free[name][i] for name in limits):
                run += 1
                best = max(best, run)
            else:
                run = 0
        return best * self.step


if __name__ == "__main__":
    main()
