"""Streaming sessions through one gateway process: added latency and CPU per session.

What it measures, in one run, against the same fast streaming upstream
(bench/ws_upstream.py), every server in its own process:

- N sessions at real time: each sends a 1,600-byte binary frame (50 ms of 16 kHz PCM16)
  every 50 ms, the first 8 bytes its send time; the upstream answers every 4th frame with a
  small ``Turn`` message carrying that time back, so the load generator measures each round
  trip (client -> [gateway ->] upstream -> [gateway ->] client) on one clock. The sessions'
  frames are spread over 50 phases 1 ms apart, as independent clients would be;
- the baseline, in the same run: the same N sessions straight to the upstream. Added latency
  is the gateway's p50/p99 round trip minus the baseline's (round trips counted only in a
  measured window after a warm-up; each direction is relayed once, so this is the relay's
  cost both ways);
- CPU per session: the gateway process's utime+stime (/proc/<pid>/stat) over the window,
  divided by sessions x seconds; and the share of one core it used;
- correctness on the way: every session begins (``Begin`` relayed), every ``Turn`` owed
  arrives, and every session ends with ``Termination`` after the client's ``Terminate``.

The gateway is ``bench/serve_gateway.py --store memory`` (the embedded store, as
``aai-gateway serve`` runs without Redis; one admission per session, so the store does not
matter to the relay) with ``streaming_sessions`` raised to 10,000,000 per 60 s. Variants
alternate (direct, gateway / gateway, direct) across rounds, so the machine's noise hits both
alike; the figures per N are medians over rounds.

The goal (the issue): the most sessions relayed with p99 added latency <= 5 ms, and CPU per
session; aim 1,000 sessions on one core.

Run:   python bench/streaming_sessions.py                  (N = 100, 250, 500, 1000, 1500; 2 rounds)
       python bench/streaming_sessions.py --quick          (N = 100, 1000; 1 round, 4 s windows)
       python bench/streaming_sessions.py --sessions 1000,2000 --seconds 10 --rounds 3
Needs: uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop
from yarl import URL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's gateway package

from loadgen import no_gc, wait_ready  # noqa: E402
from processes import Processes, cpu_seconds, free_port  # noqa: E402

from gateway.proxy import ws_wire  # noqa: E402

FRAME_BYTES = 1600
FRAME_S = 0.05
PHASES = 50
ECHO_EVERY = 4
PAD = bytes(FRAME_BYTES - 8)
HEAD = struct.pack("!BBH", 0x80 | ws_wire.BINARY, 0x80 | 126, FRAME_BYTES) + bytes(4)  # masked, zero key
AUTH = {"Authorization": "bench-key"}


@dataclass
class Client:
    proto: ws_wire.Upstream
    sent: int = 0
    turns: int = 0
    began: bool = False
    terminated: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Run:
    """One variant at one N for one window."""

    variant: str
    sessions: int
    seconds: float
    rtts: list[float] = field(default_factory=list)
    cpu_s: float = 0.0  # the gateway process (0 for direct)
    loadgen_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    max_lag_ms: float = 0.0  # how late the latest send tick started
    missing_turns: int = 0
    not_terminated: int = 0
    not_begun: int = 0
    connect_s: float = 0.0

    def pct(self, q: float) -> float:
        if not self.rtts:
            return float("nan")
        xs = sorted(self.rtts)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    @property
    def core_share(self) -> float:
        return self.cpu_s / self.seconds

    @property
    def cpu_per_session_ms(self) -> float:
        """Gateway CPU ms per session per second of audio."""
        return self.cpu_s / self.seconds / self.sessions * 1000


class Load:
    """N WebSocket clients sending audio at real time to one URL: raw connections framed by
    the gateway's own ws_wire.py (the cheapest client this machine can run, so that the load
    generator leaves the cores to what is measured). Frames are masked with a zero key, which
    the relay forwards like any other."""

    def __init__(self, url: str, n: int) -> None:
        self.url = URL(url)
        self.n = n
        self.clients: list[Client] = []
        self.measuring = False
        self.rtts: list[float] = []
        self.stopping = False
        self.max_lag = 0.0

    async def open(self) -> None:
        async def one() -> None:
            proto = await ws_wire.connect(self.url, AUTH, timeout_s=30, max_frame=1 << 20)
            c = Client(proto)
            proto.attach(lambda frames: self._read(c, frames), c.closed.set)
            self.clients.append(c)

        for start in range(0, self.n, 50):
            await asyncio.gather(*(one() for _ in range(min(50, self.n - start))))
        deadline = time.monotonic() + 30
        while not all(c.began for c in self.clients) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _read(self, c: Client, frames: list[ws_wire.Frame]) -> None:
        for f in frames:
            if f.opcode == ws_wire.TEXT:
                data = f.payload()
                if data.startswith(b'{"type":"Turn"'):
                    c.turns += 1
                    if self.measuring:
                        self.rtts.append(time.perf_counter() - json.loads(data)["t"])
                elif b'"Begin"' in data:
                    c.began = True
                elif b'"Termination"' in data:
                    c.terminated = True
            elif f.opcode == ws_wire.PING:
                c.proto.write(ws_wire.frame(ws_wire.PONG, f.payload(), mask=True))
            elif f.opcode == ws_wire.CLOSE:
                c.proto.write(ws_wire.close_frame(1000, mask=True))
                c.proto.close()

    async def _send_phase(self, phase: int, start: float) -> None:
        group = self.clients[phase::PHASES]
        tick = start + phase * FRAME_S / PHASES
        pack, now = struct.pack, time.perf_counter
        while not self.stopping:
            delay = tick - now()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.max_lag = max(self.max_lag, -delay)
            for c in group:
                c.proto.write(HEAD + pack("<d", now()) + PAD)
                c.sent += 1
            tick += FRAME_S

    async def run(self, warmup_s: float) -> list[asyncio.Task[None]]:
        """Audio starts; the caller measures after the warm-up."""
        start = time.perf_counter() + 0.01
        senders = [asyncio.create_task(self._send_phase(p, start)) for p in range(PHASES)]
        await asyncio.sleep(warmup_s)
        self.max_lag = 0.0
        return senders

    async def stop(self, senders: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        await asyncio.gather(*senders)

    async def close(self) -> None:
        terminate = ws_wire.frame(ws_wire.TEXT, b'{"type":"Terminate"}', mask=True)
        for c in self.clients:
            c.proto.write(terminate)
        waits = [asyncio.create_task(c.closed.wait()) for c in self.clients]
        _, pending = await asyncio.wait(waits, timeout=20)
        for t in pending:
            t.cancel()
        for c in self.clients:
            c.proto.close()


async def one_run(
    variant: str,
    url: str,
    n: int,
    warmup_s: float,
    seconds: float,
    gateway_pid: int | None,
    upstream_pid: int,
) -> Run:
    load = Load(url, n)
    t0 = time.monotonic()
    await load.open()
    run = Run(variant, n, seconds, connect_s=time.monotonic() - t0)
    run.not_begun = sum(not c.began for c in load.clients)
    with no_gc():  # the load generator's own collections stay out of the window (and its start)
        senders = await load.run(warmup_s)
        g0 = cpu_seconds(gateway_pid) if gateway_pid else 0.0
        u0, l0 = cpu_seconds(upstream_pid), cpu_seconds(os.getpid())
        w0 = time.monotonic()
        load.measuring = True
        await asyncio.sleep(seconds)
        load.measuring = False
        run.seconds = time.monotonic() - w0
        run.cpu_s = (cpu_seconds(gateway_pid) - g0) if gateway_pid else 0.0
        run.upstream_cpu_s = cpu_seconds(upstream_pid) - u0
        run.loadgen_cpu_s = cpu_seconds(os.getpid()) - l0
    run.max_lag_ms = load.max_lag * 1000
    run.rtts = load.rtts
    await load.stop(senders)
    await asyncio.sleep(0.3)  # the last Turns come back
    await load.close()
    run.missing_turns = sum(max(0, c.sent // ECHO_EVERY - c.turns) for c in load.clients)
    run.not_terminated = sum(not c.terminated for c in load.clients)
    return run


def fmt_row(n: int, direct: list[Run], gw: list[Run]) -> tuple[str, float]:
    med = statistics.median
    d50, d99 = med(r.pct(0.50) for r in direct), med(r.pct(0.99) for r in direct)
    g50, g99 = med(r.pct(0.50) for r in gw), med(r.pct(0.99) for r in gw)
    added99 = med(g.pct(0.99) - d.pct(0.99) for d, g in zip(direct, gw, strict=True))
    added50 = med(g.pct(0.50) - d.pct(0.50) for d, g in zip(direct, gw, strict=True))
    core = med(r.core_share for r in gw)
    per = med(r.cpu_per_session_ms for r in gw)
    lag = max(r.max_lag_ms for r in direct + gw)
    missing = sum(r.missing_turns for r in direct + gw)
    unterminated = sum(r.not_terminated for r in direct + gw)
    unbegun = sum(r.not_begun for r in direct + gw)
    lg = med(r.loadgen_cpu_s / r.seconds for r in gw)
    line = (
        f"{n:>6}  {d50:6.2f} {d99:6.2f}   {g50:6.2f} {g99:6.2f}   {added50:+6.2f} {added99:+6.2f}"
        f"   {core * 100:5.1f}%   {per:6.3f}   {lg * 100:5.1f}%  {lag:6.1f}  "
        f"{missing}/{unbegun}/{unterminated}"
    )
    return line, added99


def pin(args: argparse.Namespace, gateway_pid: int, upstream_pid: int) -> str:
    """The gateway on a core of its own, the load generator and the upstream on another
    (with 2+ cores): the gateway is measured on one core, and its latency is not the
    scheduler's choice of who waits when three busy processes share two cores."""
    cores = sorted(os.sched_getaffinity(0))
    if args.no_pin or len(cores) < 2:
        return "not pinned"
    os.sched_setaffinity(gateway_pid, {cores[0]})
    os.sched_setaffinity(upstream_pid, {cores[1]})
    os.sched_setaffinity(0, {cores[1]})
    return f"gateway on core {cores[0]}; load generator and upstream on core {cores[1]}"


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="aai-streaming-bench-"))
    procs = Processes(workdir)
    up_port, gw_port = free_port(), free_port()
    try:
        upstream = procs.start(
            "ws_upstream",
            [
                sys.executable,
                str(HERE / "ws_upstream.py"),
                "--port",
                str(up_port),
                "--echo-every",
                str(ECHO_EVERY),
            ],
        )
        gateway = procs.start(
            "gateway",
            [
                sys.executable, str(HERE / "serve_gateway.py"), "--port", str(gw_port), "--store", "memory",
                "--streaming-upstream", f"ws://127.0.0.1:{up_port}", "--data-dir", str(workdir / "data"),
            ]
            + (["--cprofile", args.cprofile] if args.cprofile else []),
        )  # fmt: skip
        pinned = pin(args, gateway.pid, upstream.pid)
        await wait_ready(upstream, f"http://127.0.0.1:{up_port}/healthz")
        await wait_ready(gateway, f"http://127.0.0.1:{gw_port}/healthz")
        urls = {
            "direct": f"ws://127.0.0.1:{up_port}/v3/ws?sample_rate=16000",
            "gateway": f"ws://127.0.0.1:{gw_port}/v3/ws?sample_rate=16000",
        }
        print(
            f"{FRAME_BYTES}-byte frames every {FRAME_S * 1000:g} ms per session; "
            f"Turn every {ECHO_EVERY} frames; "
            f"{args.rounds} round(s) x {args.seconds:g} s measured after {args.warmup:g} s warm-up; "
            f"medians over rounds; ms unless marked; {pinned}"
        )
        print(
            "                 direct         gateway          added        gateway  CPU ms per"
            + "  loadgen  max\n"
            + "sessions     p50    p99      p50    p99       p50    p99    CPU/core  session-s   CPU     lag"
            + "  missing/unbegun/unterminated"
        )
        best = 0
        for n in args.sessions:
            runs: dict[str, list[Run]] = {"direct": [], "gateway": []}
            for rnd in range(args.rounds):
                order = ("direct", "gateway") if rnd % 2 == 0 else ("gateway", "direct")
                for variant in order:
                    gpid = gateway.pid if variant == "gateway" else None
                    r = await one_run(
                        variant, urls[variant], n, args.warmup, args.seconds, gpid, upstream.pid
                    )
                    runs[variant].append(r)
                    if args.verbose:
                        print(
                            f"    {variant:8} n={n} p50={r.pct(0.5):.2f} p99={r.pct(0.99):.2f} "
                            f"rtts={len(r.rtts)} cpu={r.core_share * 100:.1f}% "
                            f"upstream={r.upstream_cpu_s / r.seconds * 100:.1f}% "
                            f"loadgen={r.loadgen_cpu_s / r.seconds * 100:.1f}% lag={r.max_lag_ms:.1f} "
                            f"connect={r.connect_s:.1f}s"
                        )
                    await asyncio.sleep(0.5)
            line, added99 = fmt_row(n, runs["direct"], runs["gateway"])
            print(line, flush=True)
            if added99 <= args.goal_ms:
                best = max(best, n)
        print(f"\nmost sessions relayed with p99 added latency <= {args.goal_ms:g} ms: {best or 'none'}")
        gateway.check()
    finally:
        procs.stop_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="100,250,500,1000,1500", help="comma-separated session counts")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--goal-ms", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="N = 100, 1000; 1 round; 4 s windows")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--no-pin", action="store_true", help="let the scheduler place the processes")
    ap.add_argument("--cprofile", help="run the gateway under cProfile; pstats written here on exit")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.rounds, args.seconds = "100,1000", 1, 4.0
    args.sessions = [int(x) for x in str(args.sessions).split(",")]
    uvloop.run(bench(args))


if __name__ == "__main__":
    main()
