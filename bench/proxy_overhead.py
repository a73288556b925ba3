"""Proxy overhead: the gateway (limits on Redis) against a bare aiohttp pass-through proxy.

What it measures, in one run, with the same load against each variant in front of the same
fast upstream (bench/fast_upstream.py), every server in its own process:

- throughput: C (64) closed-loop workers for T seconds, each sending
  ``GET /v2/transcript/<id>`` with an ``Authorization`` header; completed requests/s;
- latency: an open loop at exactly 200 requests/s for T seconds (requests are started on
  schedule, not on completion); p50 and p99;
- CPU per request: the proxy process's utime+stime (/proc/<pid>/stat) over the closed loop,
  divided by the requests it served (and Redis's, for the gateway). On a shared machine this
  is the steadiest figure: it does not depend on who else had the cores;
- Redis round trips per admitted request: ``INFO commandstats`` of a private redis-server
  (started here on a free port, killed at the end) before and after each gateway run; every
  command a client sent (not the ones the Lua scripts run inside) divided by the requests
  admitted (the gateway's ``aai_gateway_admissions_total``). The gateway's store also counts
  its own calls by verb, so per-instance background calls (the tokens-in-use sampler every
  5 s, health-check PINGs of idle pooled connections) are shown apart from the per-request
  ones.

Variants: the bare proxy and the gateway on uvloop and on asyncio (each gateway compared
with the bare proxy on the same loop), and the gateway with redis-py's pure-Python RESP
parser instead of hiredis. Rounds are interleaved (A B A' B' ... then reversed) so the
machine's noise hits every variant, and every figure is the median over rounds of a ratio
measured within one round. A short closed-loop run of ``POST /v1/chat/completions`` (a 2 KB
body; two limits, the model's and the account's, in one acquire) follows on uvloop, and a
micro-benchmark compares ``json.loads`` with ``orjson.loads`` on 2 KB and 200 KB chat bodies
(the one JSON parse on the gateway's hot path).

Goals (the issue): throughput ratio >= 0.8, added p99 <= 1 ms at 200 req/s, exactly one
Redis round trip per admission that does not wait.

Run:   python bench/proxy_overhead.py            (T=8 s, 2 rounds: about 3 minutes)
       python bench/proxy_overhead.py --quick    (T=3 s)
Needs: redis-server on PATH, uvloop, hiredis; orjson for the JSON comparison (optional).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA_DIR = ROOT / "gateway" / "admission" / "lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AUTH = {"Authorization": "bench-key"}
IDS = [f"{i:08x}-4a7d-4a53-9d3e-2f0c1b7e8a90" for i in range(1000)]
CHAT_MODEL = "gpt-4.1"


# -- processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class Processes:
    """Every subprocess this benchmark starts; all of them are stopped by ``stop_all``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


# -- Redis ----------------------------------------------------------------------------------
def script_commands() -> set[str]:
    """Commands the gateway's Lua scripts run inside Redis (not round trips of their own)."""
    names = {"publish", "spublish"}  # called through a variable: redis.call(pubcmd, ...)
    for path in LUA_DIR.glob("*.lua"):
        names |= {m.lower() for m in re.findall(r"redis\.p?call\(\s*'(\w+)'", path.read_text())}
    return names


class RedisInfo:
    def __init__(self, port: int) -> None:
        self.port = port

    def _command(self, *args: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
            s.sendall(payload.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"+") and data.endswith(b"\r\n"):
                    return data
                if data.startswith(b"$"):
                    head, _, body = data.partition(b"\r\n")
                    if len(body) >= int(head[1:]) + 2:
                        return body[: int(head[1:])]
                if data.startswith(b"-"):
                    raise RuntimeError(data.decode())
        return data

    def ping(self) -> bool:
        try:
            return self._command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def commandstats(self) -> Counter[str]:
        text = self._command("INFO", "commandstats").decode()
        out: Counter[str] = Counter()
        for line in text.splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m:
                out[m.group(1)] = int(m.group(2))
        return out


# -- load -----------------------------------------------------------------------------------
@dataclass
class Closed:
    requests: int
    errors: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Open:
    latencies: list[float]
    errors: int
    max_lag_ms: float
    rate: float

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))] * 1000


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


async def _send(session: aiohttp.ClientSession, base: str, i: int, chat: bytes | None) -> int:
    if chat is None:
        async with session.get(f"{base}/v2/transcript/{IDS[i % len(IDS)]}", headers=AUTH) as resp:
            await resp.read()
            return resp.status
    headers = {**AUTH, "Content-Type": "application/json"}
    async with session.post(f"{base}/v1/chat/completions", data=chat, headers=headers) as resp:
        await resp.read()
        return resp.status


async def closed_loop(base: str, concurrency: int, seconds: float, chat: bytes | None = None) -> Closed:
    done = errors = 0
    async with _session() as session:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(w: int) -> None:
            nonlocal done, errors
            i = w
            while time.perf_counter() < deadline:
                status = await _send(session, base, i, chat)
                i += concurrency
                if status == 200:
                    done += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return Closed(done, errors, elapsed)


async def open_loop(base: str, rate: float, seconds: float, pid: int) -> tuple[Open, float]:
    """Start request i at t0 + i/rate whatever the others are doing; latency from its start.

    Returns the latencies and the CPU seconds process ``pid`` used meanwhile.
    """
    latencies: list[float] = []
    errors = 0
    max_lag = 0.0
    async with _session() as session:

        async def one(i: int) -> None:
            nonlocal errors
            t = time.perf_counter()
            status = await _send(session, base, i, None)
            if status == 200:
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1

        for i in range(20):  # open this session's connections before measuring
            await _send(session, base, i, None)
        n = int(rate * seconds)
        tasks = []
        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter() + 0.01
        for i in range(n):
            when = t0 + i / rate
            delay = when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            max_lag = max(max_lag, time.perf_counter() - when)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        achieved = n / (time.perf_counter() - t0)
        cpu = cpu_seconds(pid) - cpu0
    return Open(latencies, errors, max_lag * 1000, achieved), cpu


async def get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=AUTH) as resp:
        return resp.status, await resp.text()


async def wait_ready(proc: Proc, url: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while True:
        proc.check()
        with contextlib.suppress(aiohttp.ClientError, OSError):
            status, _ = await get_text(url)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready at {url} after {within_s:g}s")
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The load generator's own garbage collection stays out of the measured latencies."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- variants -------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    kind: str  # bare | gateway
    loop: str
    parser: str = ""
    baseline: str = ""  # the bare variant it is compared with
    proc: Proc | None = None
    port: int = 0
    stats_file: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Sample:
    """One variant in one round."""

    closed: Closed
    cpu_us: float  # proxy process CPU per request (closed loop)
    redis_us: float
    cpu_open_us: float  # proxy process CPU per request in the open loop (same rate for every variant)
    open: Open
    admitted: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    verbs: Counter[str] = field(default_factory=Counter)
    background_verbs: Counter[str] = field(default_factory=Counter)  # other gateways' calls


def metric_value(text: str, sample: str) -> float:
    """The value of one Prometheus sample, e.g. ``aai_gateway_admissions_total{limit="requests"}``."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.workdir = workdir
        self.py = sys.executable
        self.variants: list[Variant] = []
        self.script_cmds = script_commands()

    # -- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.redis_port = free_port()
        self.redis = self.procs.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
        )
        self.info = RedisInfo(self.redis_port)
        up_port = free_port()
        self.upstream = self.procs.start(
            "upstream", [self.py, str(HERE / "fast_upstream.py"), "--port", str(up_port)]
        )
        self.upstream_url = f"http://127.0.0.1:{up_port}"
        deadline = time.monotonic() + 10
        while not self.info.ping():
            self.redis.check()
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not answer")
            await asyncio.sleep(0.05)
        await wait_ready(self.upstream, f"{self.upstream_url}/v2/transcript/ready")

        self.variants = [
            Variant("bare uvloop", "bare", "uvloop"),
            Variant("gateway uvloop hiredis", "gateway", "uvloop", "hiredis", baseline="bare uvloop"),
            Variant("bare asyncio", "bare", "asyncio"),
            Variant("gateway asyncio hiredis", "gateway", "asyncio", "hiredis", baseline="bare asyncio"),
            Variant("gateway uvloop python-parser", "gateway", "uvloop", "python", baseline="bare uvloop"),
        ]
        for v in self.variants:
            v.port = free_port()
            slug = v.name.replace(" ", "-")
            if v.kind == "bare":
                argv = [self.py, str(HERE / "bare_proxy.py"), "--loop", v.loop]
            else:
                v.stats_file = self.workdir / f"{slug}.stats.json"
                argv = [
                    self.py,
                    str(HERE / "serve_gateway.py"),
                    "--loop",
                    v.loop,
                    "--parser",
                    v.parser,
                    "--redis",
                    f"redis://127.0.0.1:{self.redis_port}/0",
                    "--stats-file",
                    str(v.stats_file),
                ]
                if self.args.cprofile and v.name == "gateway uvloop hiredis":
                    argv += ["--cprofile", self.args.cprofile]
            argv += ["--port", str(v.port), "--upstream", self.upstream_url]
            v.proc = self.procs.start(slug, argv)
        for v in self.variants:
            assert v.proc is not None
            await wait_ready(v.proc, f"{v.base}/v2/transcript/ready")

    def by_name(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    # -- gateway self-counts -------------------------------------------------------------------
    async def gateway_stats(self, v: Variant) -> dict[str, Any]:
        assert v.proc is not None and v.stats_file is not None
        before = v.stats_file.stat().st_mtime_ns if v.stats_file.exists() else 0
        v.proc.popen.send_signal(signal.SIGUSR1)
        for _ in range(200):
            if v.stats_file.exists() and v.stats_file.stat().st_mtime_ns != before:
                return dict(json.loads(v.stats_file.read_text()))
            await asyncio.sleep(0.01)
        raise RuntimeError(f"{v.name} did not write its stats")

    async def all_verbs(self) -> dict[str, Counter[str]]:
        out = {}
        for v in self.variants:
            if v.kind == "gateway":
                out[v.name] = Counter((await self.gateway_stats(v))["calls"])
        return out

    # -- one variant, one round ----------------------------------------------------------------
    async def run(self, v: Variant, seconds: float) -> Sample:
        assert v.proc is not None
        v.proc.check()
        await closed_loop(v.base, self.args.concurrency, self.args.warmup)  # connections, caches
        gateway = v.kind == "gateway"
        if gateway:
            m0 = (await get_text(f"{v.base}/metrics"))[1]
            verbs0 = await self.all_verbs()
            cmd0 = self.info.commandstats()
        with no_gc():
            cpu0, r0 = cpu_seconds(v.proc.pid), cpu_seconds(self.redis.pid)
            closed = await closed_loop(v.base, self.args.concurrency, seconds)
            cpu1, r1 = cpu_seconds(v.proc.pid), cpu_seconds(self.redis.pid)
        served = closed.requests + closed.errors
        with no_gc():
            opened, cpu_open = await open_loop(v.base, self.args.rate, seconds, v.proc.pid)
        sample = Sample(
            closed=closed,
            cpu_us=(cpu1 - cpu0) / served * 1e6,
            cpu_open_us=cpu_open / max(1, len(opened.latencies) + opened.errors) * 1e6,
            redis_us=(r1 - r0) / served * 1e6 if gateway else 0.0,
            open=opened,
        )
        if gateway:
            cmd1 = self.info.commandstats()
            verbs1 = await self.all_verbs()
            m1 = (await get_text(f"{v.base}/metrics"))[1]
            admitted = 'aai_gateway_admissions_total{limit="requests"}'
            sample.admitted = round(metric_value(m1, admitted) - metric_value(m0, admitted))
            sample.commands = cmd1 - cmd0
            sample.commands.pop("info", None)  # this script's own INFO
            sample.verbs = verbs1[v.name] - verbs0[v.name]
            for name in verbs1:
                if name != v.name:
                    sample.background_verbs += verbs1[name] - verbs0[name]
        return sample

    async def chat_run(self, v: Variant, body: bytes, seconds: float) -> tuple[Closed, float]:
        assert v.proc is not None
        await closed_loop(v.base, self.args.concurrency, self.args.warmup / 2, chat=body)
        with no_gc():
            cpu0 = cpu_seconds(v.proc.pid)
            closed = await closed_loop(v.base, self.args.concurrency, seconds, chat=body)
            cpu1 = cpu_seconds(v.proc.pid)
        return closed, (cpu1 - cpu0) / max(1, closed.requests + closed.errors) * 1e6


# -- JSON codec -----------------------------------------------------------------------------
def chat_body(size: int) -> bytes:
    """A chat completion request of about ``size`` bytes: a system prompt and a transcript."""
    words = "the quarterly review covered revenue churn hiring and the roadmap for next year".split()
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You summarise meeting transcripts in three bullet points."}
    ]
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": messages, "max_tokens": 512, "temperature": 0.2}
    turn = 0
    while len(json.dumps(body)) < size:
        text = " ".join(words[(turn + k) % len(words)] for k in range(40))
        messages.append(
            {"role": "user" if turn % 2 == 0 else "assistant", "content": f"Speaker {turn}: {text}"}
        )
        turn += 1
    return json.dumps(body).encode()


def time_per_call(fn: Callable[[], object], budget_s: float = 0.1) -> float:
    """Best-of-5 seconds per call, with the call count sized to ``budget_s`` per repeat."""
    n = 1
    while True:
        t = timeit.timeit(fn, number=n)
        if t > budget_s / 5:
            break
        n *= 4
    n = max(1, int(n * budget_s / max(t, 1e-9)))
    return min(timeit.repeat(fn, number=n, repeat=5)) / n


def json_codecs() -> list[dict[str, Any]]:
    try:
        import orjson
    except ImportError:
        return []
    rows = []
    for label, size in (("2 KB", 2048), ("200 KB", 200 * 1024)):
        body = chat_body(size)
        assert json.loads(body) == orjson.loads(body)
        std = time_per_call(lambda b=body: json.loads(b))  # type: ignore[misc]
        fast = time_per_call(lambda b=body: orjson.loads(b))  # type: ignore[misc]
        rows.append({"body": label, "bytes": len(body), "json_us": std * 1e6, "orjson_us": fast * 1e6})
    return rows


# -- report ---------------------------------------------------------------------------------
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to width; the first left-aligned, the rest right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def rounds_order(variants: list[Variant], rounds: int) -> Iterator[tuple[int, list[Variant]]]:
    for r in range(rounds):
        yield r, (variants if r % 2 == 0 else list(reversed(variants)))


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="aai-bench-"))
    procs = Processes(workdir)
    try:
        bench = Bench(args, procs, workdir)
        t_start = time.monotonic()
        await bench.start()
        print(
            f"# proxy overhead: C={args.concurrency} closed loop {args.seconds:g}s, open loop "
            f"{args.rate:g} req/s {args.seconds:g}s, {args.rounds} interleaved rounds; "
            f"private redis-server on :{bench.redis_port}",
            flush=True,
        )
        samples: dict[str, list[Sample]] = {v.name: [] for v in bench.variants}
        for r, order in rounds_order(bench.variants, args.rounds):
            for v in order:
                s = await bench.run(v, args.seconds)
                samples[v.name].append(s)
                print(
                    f"  round {r + 1} {v.name:<30} {s.closed.rps:7.0f} req/s  cpu {s.cpu_us:6.0f} us/req  "
                    f"p50 {s.open.pct(0.5):5.2f} ms  p99 {s.open.pct(0.99):5.2f} ms  "
                    f"errors {s.closed.errors + s.open.errors}",
                    flush=True,
                )

        chat: dict[str, list[tuple[Closed, float]]] = {}
        if args.chat_seconds > 0:
            body = chat_body(2048)
            pair = [bench.by_name("bare uvloop"), bench.by_name("gateway uvloop hiredis")]
            for r in range(args.rounds):
                for v in pair if r % 2 == 0 else pair[::-1]:
                    chat.setdefault(v.name, []).append(await bench.chat_run(v, body, args.chat_seconds))
            for name, runs in chat.items():
                print(
                    f"  chat {name:<30} "
                    + "  ".join(f"{c.rps:6.0f} req/s cpu {us:5.0f} us/req" for c, us in runs),
                    flush=True,
                )
        codecs = json_codecs() if not args.no_json else []
        report(args, bench, samples, chat, codecs, time.monotonic() - t_start)
        return 0
    finally:
        procs.stop_all()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")


def report(
    args: argparse.Namespace,
    bench: Bench,
    samples: dict[str, list[Sample]],
    chat: dict[str, list[tuple[Closed, float]]],
    codecs: list[dict[str, Any]],
    elapsed: float,
) -> None:
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for v in bench.variants:
        ss = samples[v.name]
        bs = samples[v.baseline] if v.baseline else ss
        pairs = list(zip(ss, bs, strict=True))
        row: dict[str, float] = {
            "rps": med([s.closed.rps for s in ss]),
            "p50": med([s.open.pct(0.5) for s in ss]),
            "p99": med([s.open.pct(0.99) for s in ss]),
            "cpu": med([s.cpu_us for s in ss]),
            "cpu_open": med([s.cpu_open_us for s in ss]),
            "ratio": med([s.closed.rps / b.closed.rps for s, b in pairs]),
            "add50": med([s.open.pct(0.5) - b.open.pct(0.5) for s, b in pairs]),
            "add99": med([s.open.pct(0.99) - b.open.pct(0.99) for s, b in pairs]),
            "cpu_ratio": med([s.cpu_us / b.cpu_us for s, b in pairs]),
            "cpu_open_ratio": med([s.cpu_open_us / b.cpu_open_us for s, b in pairs]),
            "redis": med([s.redis_us for s in ss]),
        }
        summary[v.name] = row
        cells = [v.name, f"{row['rps']:.0f}", f"{row['ratio']:.2f}", f"{row['p50']:.2f}", f"{row['p99']:.2f}"]
        cells += [f"{row['add50']:+.2f}", f"{row['add99']:+.2f}"] if v.baseline else ["", ""]
        cells += [f"{row['cpu']:.0f}", f"{row['cpu_ratio']:.2f}", f"{row['cpu_open']:.0f}"]
        cells += [f"{row['cpu_open_ratio']:.2f}"]
        if v.kind == "gateway":
            admitted = sum(s.admitted for s in ss)
            commands = sum((s.commands for s in ss), Counter())
            verbs = sum((s.verbs for s in ss), Counter())
            background = sum((s.background_verbs for s in ss), Counter())
            top = {k: n for k, n in commands.items() if k not in bench.script_cmds and n}
            row["admitted"] = admitted
            row["rt_all"] = sum(top.values()) / max(1, admitted)
            row["acquire"] = verbs["acquire"] / max(1, admitted)
            row["evalsha"] = commands["evalsha"] + commands["eval"]
            row["evalsha_expected"] = sum(verbs.values()) + sum(background.values())
            summary[v.name + "#top"] = {k: float(n) for k, n in top.items()}
            summary[v.name + "#verbs"] = {k: float(n) for k, n in verbs.items()}
            summary[v.name + "#bg"] = {k: float(n) for k, n in background.items()}
            cells += [f"{row['redis']:.0f}", f"{row['acquire']:.3f} ({row['rt_all']:.3f})"]
        else:
            cells += ["", ""]
        rows.append(cells)

    headers = [
        "variant",
        "req/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "CPU us/req",
        "ratio",
        f"CPU us/req @{args.rate:g}/s",
        "ratio",
        "Redis CPU us/req",
        "Redis RT/admission",
    ]
    print()
    print(
        f"## Proxy overhead (median of {args.rounds} interleaved rounds; ratios vs the bare proxy on the "
        "same loop, measured in the same round)"
    )
    print(fmt_table(headers, rows))
    print(
        f"  req/s and CPU us/req: closed loop, C={args.concurrency}; "
        f"p50/p99 and CPU us/req @{args.rate:g}/s: open loop at {args.rate:g} req/s.\n  CPU: the proxy "
        "process's utime+stime per request; Redis CPU: "
        "redis-server's. Redis RT/admission: the store's acquire calls per admitted request (in brackets: "
        "every command Redis received, per-instance background of all gateways included)"
    )

    print("\n## Redis round trips (INFO commandstats of the private Redis, all gateway runs)")
    for v in bench.variants:
        if v.kind != "gateway":
            continue
        row = summary[v.name]
        top = summary[v.name + "#top"]
        verbs = summary[v.name + "#verbs"]
        bg = summary[v.name + "#bg"]
        print(
            f"  {v.name}: admitted {row['admitted']:.0f}; commands sent: "
            + ", ".join(f"{k} {n:.0f}" for k, n in sorted(top.items()))
            + "; its store's calls: "
            + ", ".join(f"{k} {n:.0f}" for k, n in sorted(verbs.items()))
            + ("; idle gateways' background: " + ", ".join(f"{k} {n:.0f}" for k, n in sorted(bg.items())))
            + f"; EVALSHA {row['evalsha']:.0f} vs store-counted {row['evalsha_expected']:.0f}"
        )

    if chat:
        print("\n## POST /v1/chat/completions, 2 KB body (closed loop, uvloop; model + account limits)")
        bare, gw = chat["bare uvloop"], chat["gateway uvloop hiredis"]
        ratio = med([g[0].rps / b[0].rps for g, b in zip(gw, bare, strict=True)])
        cratio = med([g[1] / b[1] for g, b in zip(gw, bare, strict=True)])
        print(
            f"  bare {med([c.rps for c, _ in bare]):.0f} req/s, {med([u for _, u in bare]):.0f} us/req; "
            f"gateway {med([c.rps for c, _ in gw]):.0f} req/s, {med([u for _, u in gw]):.0f} us/req; "
            f"throughput ratio {ratio:.2f}, CPU ratio {cratio:.2f}"
        )
        summary["chat"] = {
            "bare_rps": med([c.rps for c, _ in bare]),
            "gw_rps": med([c.rps for c, _ in gw]),
            "bare_cpu": med([u for _, u in bare]),
            "gw_cpu": med([u for _, u in gw]),
            "ratio": ratio,
            "cpu_ratio": cratio,
        }

    main_row = summary["gateway uvloop hiredis"]
    asy = summary["gateway asyncio hiredis"]
    py = summary["gateway uvloop python-parser"]
    print("\n## Keep what wins")
    print(
        f"  event loop: gateway CPU/req uvloop {main_row['cpu']:.0f} us vs asyncio {asy['cpu']:.0f} us "
        f"(uvloop/asyncio {main_row['cpu'] / asy['cpu']:.2f}); "
        f"req/s {main_row['rps']:.0f} vs {asy['rps']:.0f}"
    )
    print(
        f"  Redis parser: gateway CPU/req hiredis {main_row['cpu']:.0f} us vs pure-Python {py['cpu']:.0f} us "
        f"(hiredis/python {main_row['cpu'] / py['cpu']:.2f}); req/s {main_row['rps']:.0f} vs {py['rps']:.0f}"
    )
    for c in codecs:
        saving = c["json_us"] - c["orjson_us"]
        print(
            f"  JSON, {c['body']} chat body ({c['bytes']} B): json.loads {c['json_us']:.1f} us, orjson.loads "
            f"{c['orjson_us']:.1f} us (x{c['json_us'] / c['orjson_us']:.1f}); saves {saving:.1f} us = "
            f"{saving / main_row['cpu'] * 100:.1f}% of the gateway's {main_row['cpu']:.0f} us CPU per request"
        )

    print("\n## Goals (gateway uvloop hiredis vs bare uvloop)")
    goals = [
        ("throughput ratio >= 0.8", main_row["ratio"] >= 0.8, f"{main_row['ratio']:.2f}"),
        (
            f"added p99 <= 1 ms at {args.rate:g} req/s",
            main_row["add99"] <= 1.0,
            f"{main_row['add99']:+.2f} ms",
        ),
        (
            "exactly 1 Redis round trip per admission that does not wait",
            all(
                summary[v.name]["acquire"] == 1.0 and summary[v.name]["evalsha"] > 0
                for v in bench.variants
                if v.kind == "gateway"
            ),
            f"{main_row['acquire']:.3f} acquire per admission ({main_row['rt_all']:.4f} with background)",
        ),
    ]
    for text, ok, value in goals:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}: {value}")
    print(f"\n(total run time {elapsed:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "codecs": codecs}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", "-T", type=float, default=8.0, help="each closed and open loop (default 8)")
    ap.add_argument("--quick", action="store_true", help="T=3 s")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    ap.add_argument("--concurrency", "-C", type=int, default=64)
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s (default 200)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured load before each run")
    ap.add_argument(
        "--chat-seconds", type=float, default=None, help="chat closed loop per round (T/2; 0: off)"
    )
    ap.add_argument("--no-json", action="store_true", help="skip the json/orjson micro-benchmark")
    ap.add_argument("--json", help="also write the summary here as JSON")
    ap.add_argument("--cprofile", help="run 'gateway uvloop hiredis' under cProfile; pstats written here")
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 3.0
    if args.chat_seconds is None:
        args.chat_seconds = args.seconds / 2
    if shutil.which("redis-server") is None:
        print("redis-server is not on PATH", file=sys.stderr)
        return 2
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
