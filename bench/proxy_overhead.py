"""Proxy overhead: the gateway (limits on Redis) against a bare aiohttp pass-through proxy.

What it measures, in one run, with the same load against every variant in front of the same
fast upstream (bench/fast_upstream.py), every server in its own process:

- throughput: C (64) closed-loop workers, each sending ``GET /v2/transcript/<id>`` with an
  ``Authorization`` header; completed requests/s;
- latency: an open loop at exactly 200 requests/s (requests start on schedule, not on
  completion); p50 and p99;
- CPU per request: the proxy process's utime+stime (/proc/<pid>/stat) divided by the
  requests it served, in the closed loop and at 200 req/s (and Redis's, for the gateway). On
  a shared machine this is the steadiest figure: it does not depend on who else had the cores;
- Redis round trips per admitted request: ``INFO commandstats`` of a private redis-server
  (started here on a free port, killed at the end) before and after every gateway run; the
  commands clients sent (not those the Lua scripts run inside Redis) per request admitted
  (the gateway's ``aai_gateway_admissions_total``). Each gateway's store also counts its own
  calls by verb, so per-instance background calls (the tokens-in-use sampler every 5 s,
  health-check PINGs of idle pooled connections) are told apart from per-request ones.

Variants: the bare proxy and the gateway on uvloop and on asyncio (each gateway compared
with the bare proxy on the same loop), and the gateway with its scripts sent through redis-py
(hiredis parser) instead of its pipelined connection. Each variant gets ROUNDS x T seconds
of each load, cut into
slices of SLICE seconds that are interleaved across the variants (A B C D E, B C D E A, ...),
so the machine's noise hits every variant alike; ratios are taken between slices of the
same round and the median is reported. A closed-loop run of ``POST /v1/chat/completions``
(a 2 KB body; the model's and the account's limits in one acquire) follows on uvloop, and a
micro-benchmark compares ``json.loads`` with ``orjson.loads`` on 2 KB and 200 KB chat bodies
(the gateway's one JSON parse on its hot path).

Goals (the issue): throughput ratio >= 0.8, added p99 <= 1 ms at 200 req/s, exactly one
Redis round trip per admission that does not wait.

Run:   python bench/proxy_overhead.py            (T=8 s x 2 rounds per variant and load: ~3 minutes)
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


def start_redis(procs: Processes, within_s: float = 10.0) -> tuple[Proc, int, RedisInfo]:
    """A private redis-server on a free port (no persistence; a Redis on 6379 is never
    touched), once it answers PING: (its process, its port, its INFO reader)."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--daemonize", "no"]
    proc = procs.start("redis", argv)
    info = RedisInfo(port)
    deadline = time.monotonic() + within_s
    while not info.ping():
        proc.check()
        if time.monotonic() > deadline:
            raise RuntimeError("the private redis-server did not answer")
        time.sleep(0.05)
    return proc, port, info


# -- load -----------------------------------------------------------------------------------
@dataclass
class Slice:
    """One variant under one load for one slice of time."""

    requests: int
    errors: int
    seconds: float
    cpu_s: float = 0.0  # the proxy process
    redis_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)  # open loop only
    max_lag_ms: float = 0.0  # open loop: how late the latest request started

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / max(1, self.requests + self.errors) * 1e6


def pct(latencies: list[float], q: float) -> float:
    """Nearest-rank percentile, in ms."""
    xs = sorted(latencies)
    return xs[min(len(xs) - 1, max(0, round(q * len(xs)) - 1))] * 1000


def new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


async def send(session: aiohttp.ClientSession, base: str, i: int, chat: bytes | None) -> int:
    if chat is None:
        async with session.get(f"{base}/v2/transcript/{IDS[i % len(IDS)]}", headers=AUTH) as resp:
            await resp.read()
            return resp.status
    headers = {**AUTH, "Content-Type": "application/json"}
    async with session.post(f"{base}/v1/chat/completions", data=chat, headers=headers) as resp:
        await resp.read()
        return resp.status


async def closed_loop(
    session: aiohttp.ClientSession,
    base: str,
    concurrency: int,
    seconds: float,
    chat: bytes | None = None,
    *,
    count_client_errors: bool = False,
) -> Slice:
    """``concurrency`` workers, each sending its next request when the last one answered.
    ``count_client_errors``: a request the client library fails (a refused or dropped
    connection) counts as an error instead of ending the run (tls_overhead.py's handshakes)."""
    done = errors = 0
    start = time.perf_counter()
    deadline = start + seconds
    tolerated: tuple[type[BaseException], ...] = (aiohttp.ClientError,) if count_client_errors else ()

    async def worker(w: int) -> None:
        nonlocal done, errors
        i = w
        while time.perf_counter() < deadline:
            try:
                status = await send(session, base, i, chat)
            except tolerated:
                status = 0
            i += concurrency
            if status == 200:
                done += 1
            else:
                errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Slice(done, errors, time.perf_counter() - start)


async def open_loop(session: aiohttp.ClientSession, base: str, rate: float, seconds: float) -> Slice:
    """Start request i at t0 + i/rate whatever the others are doing; latency from its start."""
    latencies: list[float] = []
    errors = 0
    max_lag = 0.0

    async def one(i: int) -> None:
        nonlocal errors
        t = time.perf_counter()
        status = await send(session, base, i, None)
        if status == 200:
            latencies.append(time.perf_counter() - t)
        else:
            errors += 1

    n = round(rate * seconds)
    tasks = []
    t0 = time.perf_counter() + 0.002
    for i in range(n):
        when = t0 + i / rate
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - when)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    out = Slice(len(latencies), errors, time.perf_counter() - t0, latencies=latencies)
    out.max_lag_ms = max_lag * 1000
    return out


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


def metric_value(text: str, sample: str) -> float:
    """The value of one Prometheus sample, e.g. ``aai_gateway_admissions_total{limit="requests"}``."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- variants -------------------------------------------------------------------------------
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


def summarise(v: Variant, base: Variant, script_cmds: set[str]) -> dict[str, Any]:
    """Medians over rounds of per-round ratios; latency percentiles over all open-loop slices."""
    closed = list(zip(v.results["closed"], base.results["closed"], strict=True))
    opened, base_opened = v.results["open"], base.results["open"]
    lat = [x for s in opened for x in s.latencies]
    base_lat = [x for s in base_opened for x in s.latencies]
    cpu_open = sum(s.cpu_s for s in opened) / sum(s.requests + s.errors for s in opened) * 1e6
    base_cpu_open = sum(s.cpu_s for s in base_opened) / sum(s.requests + s.errors for s in base_opened) * 1e6
    row: dict[str, Any] = {
        "rps": med([s.rps for s, _ in closed]),
        "ratio": med([s.rps / b.rps for s, b in closed]),
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "add50": pct(lat, 0.5) - pct(base_lat, 0.5),
        "add99": pct(lat, 0.99) - pct(base_lat, 0.99),
        "cpu": med([s.cpu_us for s, _ in closed]),
        "cpu_ratio": med([s.cpu_us / b.cpu_us for s, b in closed]),
        "cpu_open": cpu_open,
        "cpu_open_ratio": cpu_open / base_cpu_open,
        "redis_cpu": sum(s.redis_cpu_s for s, _ in closed) / sum(s.requests for s, _ in closed) * 1e6,
        "errors": sum(s.errors for ss in v.results.values() for s in ss),
        "samples": len(lat),
        "max_lag_ms": max(s.max_lag_ms for s in opened),
        "open_rate": sum(s.requests + s.errors for s in opened) / sum(s.seconds for s in opened),
    }
    if v.kind == "gateway":
        sent = {k: n for k, n in v.commands.items() if k not in script_cmds and n}
        row["admitted"] = v.admitted
        row["acquire_per_admission"] = v.verbs["acquire"] / max(1, v.admitted)
        row["commands_per_admission"] = sum(sent.values()) / max(1, v.admitted)
        row["commands_sent"] = dict(sent)
        row["store_calls"] = dict(v.verbs)
        row["background_calls"] = dict(v.background)
        row["evalsha"] = v.commands["evalsha"] + v.commands["eval"]
        row["evalsha_store_counted"] = sum(v.verbs.values()) + sum(v.background.values())
    return row


def report(args: argparse.Namespace, bench: Bench, codecs: list[dict[str, Any]], elapsed: float) -> None:
    summary = {
        v.name: summarise(v, bench.by_name(v.baseline) if v.baseline else v, bench.script_cmds)
        for v in bench.variants
    }
    rows = []
    for v in bench.variants:
        r = summary[v.name]
        cells = [v.name, f"{r['rps']:.0f}", f"{r['ratio']:.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}"]
        cells += [f"{r['add50']:+.2f}", f"{r['add99']:+.2f}"] if v.baseline else ["", ""]
        cells += [
            f"{r['cpu']:.0f}",
            f"{r['cpu_ratio']:.2f}",
            f"{r['cpu_open']:.0f}",
            f"{r['cpu_open_ratio']:.2f}",
        ]
        if v.kind == "gateway":
            cells += [f"{r['redis_cpu']:.0f}", f"{r['acquire_per_admission']:.3f}"]
            cells += [f"{r['commands_per_admission']:.3f}"]
        else:
            cells += ["", "", ""]
        rows.append(cells)
    headers = ["variant", "req/s", "ratio", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "CPU us/req", "ratio"]
    headers += [f"CPU us/req @{args.rate:g}/s", "ratio", "Redis CPU us/req", "acquire/adm", "Redis cmds/adm"]
    slices = len(bench.variants[0].results["closed"])
    print()
    print(
        f"## Proxy overhead: {slices} interleaved rounds of {args.slice:g} s per variant and load; "
        "ratios vs the bare proxy on the same loop, in the same round (median)"
    )
    print(fmt_table(headers, rows))
    print(
        f"  req/s, CPU us/req: closed loop, C={args.concurrency} (median over rounds); p50/p99, CPU us/req "
        f"@{args.rate:g}/s: open loop at {args.rate:g} req/s (all rounds pooled).\n"
        "  CPU: the proxy process's utime+stime per request; Redis CPU: redis-server's, per request.\n"
        "  acquire/adm: the store's acquire calls per admitted request; Redis cmds/adm: every command\n"
        "  Redis received from clients per admitted request (all gateways' per-instance background included)."
    )

    print("\n## Redis round trips (INFO commandstats of the private Redis over every gateway slice)")
    for v in bench.variants:
        if v.kind != "gateway":
            continue
        r = summary[v.name]

        def fmt(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {n}" for k, n in sorted(d.items())) or "none"

        print(
            f"  {v.name}: admitted {r['admitted']}; Redis received {fmt(r['commands_sent'])}; "
            f"its store sent {fmt(r['store_calls'])}; the idle gateways sent {fmt(r['background_calls'])}; "
            f"EVALSHA received {r['evalsha']} = store-counted {r['evalsha_store_counted']}"
        )

    bare, gw = bench.by_name("bare uvloop"), bench.by_name("gateway uvloop pipelined")
    if "chat" in gw.results:
        pairs = list(zip(gw.results["chat"], bare.results["chat"], strict=True))
        summary["chat"] = {
            "bare_rps": med([b.rps for _, b in pairs]),
            "gateway_rps": med([g.rps for g, _ in pairs]),
            "ratio": med([g.rps / b.rps for g, b in pairs]),
            "bare_cpu": med([b.cpu_us for _, b in pairs]),
            "gateway_cpu": med([g.cpu_us for g, _ in pairs]),
            "cpu_ratio": med([g.cpu_us / b.cpu_us for g, b in pairs]),
        }
        c = summary["chat"]
        print("\n## POST /v1/chat/completions, 2 KB body (closed loop, uvloop; model + account limits)")
        print(
            f"  bare {c['bare_rps']:.0f} req/s, {c['bare_cpu']:.0f} us/req; gateway {c['gateway_rps']:.0f} "
            f"req/s, {c['gateway_cpu']:.0f} us/req; throughput ratio {c['ratio']:.2f}, CPU ratio "
            f"{c['cpu_ratio']:.2f}"
        )

    main_row = summary[gw.name]
    asy = summary["gateway asyncio pipelined"]
    py = summary["gateway uvloop redis-py"]
    bare_as = summary["bare asyncio"]
    print("\n## Keep what wins (CPU per request: closed loop / at 200 req/s)")
    print(
        f"  event loop, gateway: uvloop {main_row['cpu']:.0f} / {main_row['cpu_open']:.0f} us, asyncio "
        f"{asy['cpu']:.0f} / {asy['cpu_open']:.0f} us (uvloop/asyncio {main_row['cpu'] / asy['cpu']:.2f} / "
        f"{main_row['cpu_open'] / asy['cpu_open']:.2f}); req/s {main_row['rps']:.0f} vs {asy['rps']:.0f}"
    )
    bu = summary["bare uvloop"]
    print(
        f"  event loop, bare proxy: uvloop {bu['cpu']:.0f} / {bu['cpu_open']:.0f} us, asyncio "
        f"{bare_as['cpu']:.0f} / {bare_as['cpu_open']:.0f} us; req/s {bu['rps']:.0f} vs {bare_as['rps']:.0f}"
    )
    print(
        f"  Redis client (uvloop): pipelined {main_row['cpu']:.0f} / {main_row['cpu_open']:.0f} us, "
        f"redis-py+hiredis {py['cpu']:.0f} / {py['cpu_open']:.0f} us "
        f"(pipelined/redis-py {main_row['cpu'] / py['cpu']:.2f} / "
        f"{main_row['cpu_open'] / py['cpu_open']:.2f}); req/s {main_row['rps']:.0f} vs {py['rps']:.0f}"
    )
    for c in codecs:
        saving = c["json_us"] - c["orjson_us"]
        print(
            f"  JSON, {c['body']} chat body ({c['bytes']} B): json.loads {c['json_us']:.1f} us, orjson.loads "
            f"{c['orjson_us']:.1f} us (x{c['json_us'] / c['orjson_us']:.1f} faster): saves {saving:.1f} us "
            f"per chat request, {saving / main_row['cpu'] * 100:.1f}% of the {main_row['cpu']:.0f} us of CPU "
            "the gateway spends on a small request"
        )

    print("\n## Goals (gateway uvloop pipelined vs bare uvloop)")
    rt_ok = all(
        summary[v.name]["acquire_per_admission"] == 1.0 and summary[v.name]["admitted"] > 0
        for v in bench.variants
        if v.kind == "gateway"
    )
    goals = [
        ("throughput ratio >= 0.8", main_row["ratio"] >= 0.8, f"{main_row['ratio']:.2f}"),
        (
            f"added p99 <= 1 ms at {args.rate:g} req/s",
            main_row["add99"] <= 1.0,
            f"{main_row['add99']:+.2f} ms",
        ),
        (
            "exactly 1 Redis round trip per admission that does not wait",
            rt_ok,
            f"{main_row['acquire_per_admission']:.3f} acquire per admission "
            f"({main_row['commands_per_admission']:.4f} counting per-instance background)",
        ),
    ]
    for text, ok, value in goals:
        print(f"  [{'met' if ok else 'NOT MET'}] {text}: {value}")
    errors = sum(summary[v.name]["errors"] for v in bench.variants)
    print(
        f"\n(open loop: {main_row['open_rate']:.1f} req/s achieved, latest start "
        f"{max(summary[v.name]['max_lag_ms'] for v in bench.variants):.1f} ms behind schedule; "
        f"{errors} non-200 answers; total run time {elapsed:.0f} s)"
    )
    if args.cprofile:
        print(
            f"('gateway uvloop pipelined' ran under cProfile, so its figures are inflated: {args.cprofile})"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "summary": summary, "codecs": codecs}, indent=2)
        )


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="aai-bench-"))
    procs = Processes(workdir)
    bench = Bench(args, procs, workdir)
    t_start = time.monotonic()
    try:
        await bench.start()
        slices = max(1, round(args.rounds * args.seconds / args.slice))
        print(
            f"# proxy overhead: {len(bench.variants)} variants; per variant {slices} x {args.slice:g} s of a "
            f"closed loop (C={args.concurrency}) and {slices} x {args.slice:g} s of an open loop "
            f"({args.rate:g} req/s), interleaved; private redis-server on :{bench.redis_port}",
            flush=True,
        )
        for v in bench.variants:
            await bench.warm(v)
        await bench.interleave(bench.variants, "closed", slices)
        await bench.interleave(bench.variants, "open", slices)
        chat_slices = round(args.rounds * args.chat_seconds / args.slice)
        if chat_slices > 0:
            body = chat_body(2048)
            pair = [bench.by_name("bare uvloop"), bench.by_name("gateway uvloop pipelined")]
            for v in pair:
                await bench.warm(v, body)
            await bench.interleave(pair, "chat", chat_slices, body)
        codecs = [] if args.no_json else json_codecs()
        report(args, bench, codecs, time.monotonic() - t_start)
        return 0
    finally:
        await bench.close()
        procs.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", "-T", type=float, default=8.0, help="seconds per round (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds: each variant gets ROUNDS x T s per load")
    ap.add_argument("--slice", type=float, default=2.0, help="interleaving granularity, seconds (default 2)")
    ap.add_argument("--quick", action="store_true", help="T=3 s")
    ap.add_argument("--concurrency", "-C", type=int, default=64)
    ap.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s (default 200)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured load per variant")
    ap.add_argument("--chat-seconds", type=float, help="chat closed loop per round (default T/4; 0: off)")
    ap.add_argument("--no-json", action="store_true", help="skip the json/orjson micro-benchmark")
    ap.add_argument("--json", help="also write the summary here as JSON")
    ap.add_argument(
        "--cprofile", help="pstats here: 'gateway uvloop pipelined' runs under cProfile (inflated)"
    )
    ap.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every round")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 3.0
        args.slice = min(args.slice, 1.5)
    if args.chat_seconds is None:
        args.chat_seconds = args.seconds / 4
    if shutil.which("redis-server") is None:
        print("redis-server is not on PATH", file=sys.stderr)
        return 2
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
