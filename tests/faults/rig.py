"""The fault suite's rig: a private Redis, the simulator in a process of its own, three gateways.

``rig()`` starts a private redis-server (``PausableRedis``: its own port, SIGSTOP-able,
killable), the simulator (the judge's witness, with the fault hook of ``gateway/sim/app.py``)
and three gateway processes on them with short windows and small limits; the ``Rig`` it yields
kills, freezes and thaws instances and re-arms the simulator's faults mid-run.

Run as ``python -m tests.faults.rig --port N --sim-config JSON`` (``FaultSim`` does): the
soak's simulator (tests/soak_support.py) plus ``/_sim/faults``, every job and streaming session
upstream saw.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.sim.app import SIM, SimConfig
from tests.helpers import Limits, Process, _merge, start_gateways
from tests.soak_support import PausableRedis, SimProcess, sim_app
from tests.soak_support import main as soak_main

if TYPE_CHECKING:  # (load.py imports this module)
    from tests.faults.load import Load

INSTANCES = 3
W, GUARD = 3.0, 0.3  # the soak's: a loaded 2-core machine stalls event loops 100+ ms
SPAN = W + GUARD  # a window lease's life
REQUESTS, MODEL, JOBS, SESSIONS = 40, 8, 3, 4
MODELS = ("gpt-5", "claude-sonnet-4-6")
LIMITS = Limits(REQUESTS, MODEL, W, MODELS, guard_ms=int(GUARD * 1000))
MAX_WAIT_S = 3.0


# -- the simulator process ---------------------------------------------------------------------
def fault_sim_app(config: SimConfig) -> web.Application:
    app = sim_app(config)

    async def dump(request: web.Request) -> web.Response:
        sim = request.app[SIM]
        jobs = [
            {"id": j.id, "audio_url": j.body.get("audio_url"), "status": j.status}
            for j in sim.transcripts.jobs.values()
        ]
        sessions = [
            {"id": s.id, "query": s.query, "terminated": s.terminated, "closed": s.closed is not None}
            for s in sim.streaming.sessions.values()
        ]
        return web.json_response(
            {
                "report": sim.report(),
                "jobs": jobs,
                "sessions": sessions,
                "streaming_billed": sim.streaming.billed,
                "transcripts_billed": [
                    {"id": b["id"], "seconds": b["seconds"]} for b in sim.transcripts.billed
                ],
            }
        )

    app.router.add_get("/_sim/faults", dump)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m tests.faults.rig --port N --sim-config JSON``: the simulator above."""
    soak_main(argv, app=fault_sim_app)


class FaultSim(SimProcess):
    """The simulator above in a process of its own."""

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config, module="tests.faults.rig")


# -- the rig -------------------------------------------------------------------------------------
@dataclass
class Rig:
    redis: PausableRedis
    sim: FaultSim
    gateways: list[Process]
    prefix: str
    down: set[int] = field(default_factory=set)  # instances the load avoids now (killed, frozen)
    killed: set[int] = field(default_factory=set)
    disrupted: set[int] = field(default_factory=set)  # killed or frozen at some point

    def live(self) -> list[int]:
        return [i for i in range(len(self.gateways)) if i not in self.down]

    async def busy(self, load: Load, i: int, within: float = 4.0) -> None:
        """Until instance ``i`` relays a streaming session that has begun (a fault then hits
        one mid-stream), or ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        while asyncio.get_running_loop().time() < deadline:
            if any(s.gateway == i and s.begun and not s.outcome for s in load.sessions):
                return
            await asyncio.sleep(0.05)

    def kill(self, i: int) -> None:
        """kill -9: no shutdown, no Terminate, leases left to expire."""
        self.down.add(i)
        self.killed.add(i)
        self.disrupted.add(i)
        os.kill(self.gateways[i].proc.pid, signal.SIGKILL)
        self.gateways[i].proc.wait()

    def freeze(self, i: int) -> None:
        self.down.add(i)
        self.disrupted.add(i)
        os.kill(self.gateways[i].proc.pid, signal.SIGSTOP)

    def thaw(self, i: int) -> None:
        os.kill(self.gateways[i].proc.pid, signal.SIGCONT)
        self.down.discard(i)

    async def sim_config(self, changes: dict[str, Any]) -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.sim.url + "/_sim/config", json=changes) as r,
        ):
            assert r.status == 200, await r.text()


def gateway_config(sim_url: str, redis_url: str, prefix: str, **more: Any) -> dict[str, Any]:
    """What the three instances share: the suite's limits, short claims and refreshes (a job's
    fate is settled within seconds), streaming pings every second; ``more`` merges into it."""
    raw = LIMITS.gateway_config(
        sim_url,
        {"url": redis_url, "key_prefix": prefix},
        limits={
            "async_concurrency": JOBS,
            "streaming_sessions": {"limit": SESSIONS, "window_s": W},
            "llm_requests": {"understanding": {"limit": MODEL, "window_s": W}},  # (default: 60 s)
        },
        queue={"max_wait_s": MAX_WAIT_S, "llm_max_wait_s": MAX_WAIT_S, "ticket_ttl_ms": 2000},
        streaming={"max_wait_s": 4.0, "ping_interval_s": 1.0, "terminate_wait_s": 2.0},
        transcripts={
            "claim_s": 2.0,
            "poll_refresh_s": 0.5,
            "poll_refresh_with_webhooks_s": 2.0,
            "reconcile_after_s": 2.0,
        },
    )
    return _merge(raw, more)


@asynccontextmanager
async def rig(*, sim: dict[str, Any] | None = None, **more: Any) -> AsyncIterator[Rig]:
    """The private Redis, the simulator and three gateways; ``more`` merges into the gateways'
    config (e.g. ``redis={"on_outage": ...}``, ``upstream={"read_timeout_s": 2}``), ``sim``
    into the simulator's."""
    redis = PausableRedis()
    await redis.start()
    config = LIMITS.sim_config(
        async_concurrency=JOBS,
        streaming_limit=SESSIONS,
        streaming_window_s=W,
        webhook_retry_s=1.0,
        **(sim or {}),
    )
    fake = FaultSim(config)
    prefix = "faults" + uuid.uuid4().hex[:6]
    raw = gateway_config(fake.url, redis.url, prefix, **more)
    gateways: list[Process] = []
    try:
        await fake.ready("/_sim/report")
        gateways = await start_gateways(raw, INSTANCES, public_url=True)
        await asyncio.sleep(1.2)  # heartbeats: every instance counts three (fallback parts)
        yield Rig(redis, fake, gateways, prefix)
    finally:
        redis.resume()
        for g in gateways:
            if g.proc.poll() is None:  # (a frozen one must run to hear SIGTERM)
                os.kill(g.proc.pid, signal.SIGCONT)
            g.kill()
        fake.kill()
        redis.kill()


if __name__ == "__main__":
    main()
