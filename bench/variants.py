"""The setups proxy_overhead.py compares, and how each is measured: every variant (the bare
proxy and the gateway, on uvloop and asyncio, the gateway's scripts pipelined or through
redis-py) is a server process in front of the same fast upstream; ``Bench`` starts them,
measures one slice of one load at a time (the proxy's CPU, Redis's commandstats, the
gateway's own store counts) and interleaves the slices across variants in rotating order."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from loadgen import Slice, closed_loop, get_text, new_session, no_gc, open_loop, send, wait_ready
from processes import HERE, Proc, Processes, cpu_seconds, free_port, script_commands, start_redis


def metric_value(text: str, sample: str) -> float:
    """The value of one Prometheus sample, e.g. ``aai_gateway_admissions_total{limit="requests"}``."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Variant:
    name: str
    kind: str  # bare | gateway
    loop: str
    parser: str = ""
    baseline: str = ""  # the bare variant it is compared with ("" for a bare one)
    port: int = 0
    proc: Proc | None = None
    stats_file: Path | None = None
    session: aiohttp.ClientSession | None = None
    results: dict[str, list[Slice]] = field(default_factory=dict)  # load -> slices
    admitted: int = 0
    commands: Counter[str] = field(default_factory=Counter)  # Redis commandstats deltas
    verbs: Counter[str] = field(default_factory=Counter)  # its store's own count
    background: Counter[str] = field(default_factory=Counter)  # the other gateways' meanwhile

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


ADMITTED = 'aai_gateway_admissions_total{limit="requests"}'


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.py = sys.executable
        self.script_cmds = script_commands()
        self.variants = [
            Variant("bare uvloop", "bare", "uvloop"),
            Variant("gateway uvloop pipelined", "gateway", "uvloop", "pipelined", baseline="bare uvloop"),
            Variant("bare asyncio", "bare", "asyncio"),
            Variant("gateway asyncio pipelined", "gateway", "asyncio", "pipelined", baseline="bare asyncio"),
            Variant("gateway uvloop redis-py", "gateway", "uvloop", "hiredis", baseline="bare uvloop"),
        ]

    def by_name(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    async def start(self) -> None:
        self.redis, self.redis_port, self.info = start_redis(self.procs)
        up_port = free_port()
        self.upstream = self.procs.start(
            "upstream", [self.py, str(HERE / "fast_upstream.py"), "--port", str(up_port)]
        )
        self.upstream_url = f"http://127.0.0.1:{up_port}"
        await wait_ready(self.upstream, f"{self.upstream_url}/v2/transcript/ready")

        for v in self.variants:
            v.port = free_port()
            slug = v.name.replace(" ", "-")
            if v.kind == "bare":
                argv = [self.py, str(HERE / "bare_proxy.py"), "--loop", v.loop]
            else:
                v.stats_file = self.workdir / f"{slug}.stats.json"
                argv = [self.py, str(HERE / "serve_gateway.py"), "--loop", v.loop, "--parser", v.parser]
                argv += [
                    "--redis",
                    f"redis://127.0.0.1:{self.redis_port}/0",
                    "--stats-file",
                    str(v.stats_file),
                ]
                if self.args.cprofile and v.name == "gateway uvloop pipelined":
                    argv += ["--cprofile", self.args.cprofile]
            argv += ["--port", str(v.port), "--upstream", self.upstream_url]
            v.proc = self.procs.start(slug, argv)
        for v in self.variants:
            assert v.proc is not None
            await wait_ready(v.proc, f"{v.base}/v2/transcript/ready")
            v.session = new_session()

    async def close(self) -> None:
        for v in self.variants:
            if v.session is not None:
                await v.session.close()

    # -- the gateway's own counts --------------------------------------------------------------
    async def gateway_stats(self, v: Variant) -> dict[str, Any]:
        assert v.proc is not None and v.stats_file is not None
        before = v.stats_file.stat().st_mtime_ns if v.stats_file.exists() else 0
        v.proc.popen.send_signal(signal.SIGUSR1)
        for _ in range(500):
            if v.stats_file.exists() and v.stats_file.stat().st_mtime_ns != before:
                return dict(json.loads(v.stats_file.read_text()))
            await asyncio.sleep(0.01)
        raise RuntimeError(f"{v.name} did not write its stats")

    async def all_verbs(self) -> dict[str, Counter[str]]:
        return {
            v.name: Counter((await self.gateway_stats(v))["calls"])
            for v in self.variants
            if v.kind == "gateway"
        }

    # -- one slice -----------------------------------------------------------------------------
    async def measure(self, v: Variant, load: str, seconds: float, chat: bytes | None = None) -> Slice:
        assert v.proc is not None and v.session is not None
        v.proc.check()
        gateway = v.kind == "gateway"
        if gateway:
            m0 = (await get_text(f"{v.base}/metrics"))[1]
            verbs0 = await self.all_verbs()
            cmd0 = self.info.commandstats()
        with no_gc():
            cpu0, r0 = cpu_seconds(v.pid), cpu_seconds(self.redis.pid)
            if load == "open":
                out = await open_loop(v.session, v.base, self.args.rate, seconds)
            else:
                out = await closed_loop(v.session, v.base, self.args.concurrency, seconds, chat)
            out.cpu_s = cpu_seconds(v.pid) - cpu0
            out.redis_cpu_s = cpu_seconds(self.redis.pid) - r0
        if gateway:
            cmd1 = self.info.commandstats()
            verbs1 = await self.all_verbs()
            m1 = (await get_text(f"{v.base}/metrics"))[1]
            v.admitted += round(metric_value(m1, ADMITTED) - metric_value(m0, ADMITTED))
            delta = cmd1 - cmd0
            delta.pop("info", None)  # this script's own INFO
            v.commands += delta
            v.verbs += verbs1[v.name] - verbs0[v.name]
            for name in verbs1:
                if name != v.name:
                    v.background += verbs1[name] - verbs0[name]
        v.results.setdefault(load, []).append(out)
        return out

    async def warm(self, v: Variant, chat: bytes | None = None) -> None:
        """Unmeasured load first: connections opened on every hop, caches and scripts loaded."""
        assert v.session is not None
        await closed_loop(v.session, v.base, self.args.concurrency, self.args.warmup, chat)
        for i in range(20):
            await send(v.session, v.base, i, chat)

    async def interleave(
        self, variants: list[Variant], load: str, slices: int, chat: bytes | None = None
    ) -> None:
        """``slices`` rounds; in each, every variant in turn (the order rotates) for one slice."""
        for k in range(slices):
            order = variants[k % len(variants) :] + variants[: k % len(variants)]
            line = []
            for v in order:
                out = await self.measure(v, load, self.args.slice, chat)
                line.append(f"{v.name} {out.rps:.0f}/s {out.cpu_us:.0f}us")
            if self.args.verbose:
                print(f"  {load} round {k + 1}: " + "; ".join(line), flush=True)
