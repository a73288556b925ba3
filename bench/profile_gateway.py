"""Where the gateway's CPU goes per request: py-spy on the gateway process under load.

Starts the same setup as bench/proxy_overhead.py (a private redis-server, the fast upstream,
the gateway via bench/serve_gateway.py with limits too high to queue), puts it under load
(the closed loop, C=64, or an open loop with --rate), samples the gateway process with
``py-spy record --format raw`` meanwhile, and prints:

- the gateway process's CPU per request over the sampled period (utime+stime);
- the share of samples, and the CPU per request that share stands for, by where the time
  goes: inclusive for the gateway's functions (gateway/...) and for a few known costs
  (the redis-py call, aiohttp tracing, prometheus_client, asyncio.shield), and by module
  group for the leaf (self) frames.

Needs py-spy (``pip install py-spy``) and the right to ptrace the gateway (root, or
kernel.yama.ptrace_scope=0).

Run:   python bench/profile_gateway.py                 (closed loop, 10 s)
       python bench/profile_gateway.py --rate 200      (open loop at 200 req/s)
       python bench/profile_gateway.py --keep /tmp/gw.txt   (keep the raw stacks)
       python bench/profile_gateway.py --bare          (the bare proxy, for comparison)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from loadgen import chat_body, closed_loop, new_session, open_loop, send, wait_ready  # noqa: E402
from processes import Processes, cpu_seconds, free_port, start_redis  # noqa: E402

# Known costs, matched anywhere in a sample's stack (inclusive).
KNOWN = [
    ("handler: errors_middleware and below", r"errors_middleware"),
    ("RedisStore.acquire (the admission's Redis call)", r"RedisStore\.acquire"),
    ("  redis-py: connection pool get/release", r"ConnectionPool\.(get_connection|release)"),
    ("  redis-py: asyncio.timeout around socket I/O", r"redis/asyncio/connection.py.*timeouts\.py"),
    ("AdmissionEngine.admit (incl. the Redis call)", r"AdmissionEngine\.admit"),
    ("asyncio.shield (a task per acquire)", r"shield \(asyncio"),
    ("Upstream.request (aiohttp client, incl. tracing)", r"Upstream\.request"),
    ("aiohttp tracing (TraceConfig for admission_to_send)", r"aiohttp/tracing|_on_headers_sent"),
    ("relay (response back to the client)", r"relay \(gateway"),
    ("prometheus_client (metrics)", r"prometheus_client"),
    ("request_headers / response_headers", r"(request|response)_headers \(gateway"),
    ("admitted_headers (RateLimit headers)", r"admitted_headers \(gateway"),
    ("products plan (classify the request)", r"plan \(gateway/products"),
]
GROUPS = [
    "gateway/",
    "redis/",
    "prometheus_client",
    "aiohttp/tracing",
    "aiohttp/http_writer",
    "aiohttp/client",
    "aiohttp/web",
    "aiohttp/",
    "asyncio/",
    "contextlib",
    "yarl",
    "multidict",
]


def load_stacks(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(n)))
    return stacks


def frame_name(frame: str) -> str:
    return re.sub(r":\d+\)", ")", frame)


def analyse(stacks: list[tuple[list[str], int]], us_per_req: float, top: int) -> None:
    total = sum(n for _, n in stacks)
    if not total:
        print("no samples")
        return

    def line(share: float, label: str) -> str:
        return f"  {share * 100:5.1f}%  {share * us_per_req:6.0f} us/req  {label}"

    print(f"\n## Known costs (inclusive; {total} samples; {us_per_req:.0f} us CPU per request)")
    for label, pattern in KNOWN:
        rx = re.compile(pattern)
        n = sum(c for frames, c in stacks if rx.search(";".join(frames)))
        print(line(n / total, label))

    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        names = [frame_name(f) for f in frames]
        for name in set(names):
            if "gateway/" in name:
                incl[name] += n
        self_[names[-1]] += n
        groups[next((g for g in GROUPS if g in names[-1]), "other")] += n
    print("\n## gateway/ functions, inclusive")
    for name, n in incl.most_common(top):
        print(line(n / total, name))
    print("\n## Self time by module group (leaf frames)")
    for name, n in groups.most_common():
        print(line(n / total, name))
    print("\n## Self time, top functions")
    for name, n in self_.most_common(top):
        print(line(n / total, name))


async def run(args: argparse.Namespace, workdir: Path, procs: Processes) -> None:
    py = sys.executable
    up_port, gw_port = free_port(), free_port()
    _, redis_port, _ = start_redis(procs)
    upstream = procs.start("upstream", [py, str(HERE / "fast_upstream.py"), "--port", str(up_port)])
    up_url = f"http://127.0.0.1:{up_port}"
    await wait_ready(upstream, f"{up_url}/v2/transcript/ready")
    if args.bare:  # the baseline, for comparison
        argv = [py, str(HERE / "bare_proxy.py"), "--loop", args.loop]
    else:
        argv = [py, str(HERE / "serve_gateway.py"), "--parser", args.parser, "--loop", args.loop]
        argv += ["--redis", f"redis://127.0.0.1:{redis_port}/0"]
    gw = procs.start("proxy", [*argv, "--port", str(gw_port), "--upstream", up_url])
    base = f"http://127.0.0.1:{gw_port}"
    await wait_ready(gw, f"{base}/v2/transcript/ready")
    raw = Path(args.keep) if args.keep else workdir / "stacks.txt"
    async with new_session() as session:
        chat = chat_body(2048) if args.chat else None
        await closed_loop(session, base, 64, 1.0, chat)  # warm
        for i in range(20):
            await send(session, base, i, None)
        spy = procs.start(
            "py-spy",
            ["py-spy", "record", "--format", "raw", "--rate", str(args.hz)]
            + ["--duration", str(int(args.seconds)), "--pid", str(gw.pid), "--output", str(raw)],
        )
        await asyncio.sleep(0.3)
        cpu0 = cpu_seconds(gw.pid)
        t0 = time.perf_counter()
        if args.rate:
            out = await open_loop(session, base, args.rate, args.seconds)
        else:
            out = await closed_loop(session, base, 64, args.seconds, chat)
        cpu = cpu_seconds(gw.pid) - cpu0
        elapsed = time.perf_counter() - t0
        await asyncio.to_thread(spy.popen.wait)
    if spy.popen.returncode != 0 or not raw.exists():
        err = spy.log.read_text(errors="replace")
        raise RuntimeError(f"py-spy failed ({spy.popen.returncode}): {err[-2000:]}")
    served = out.requests + out.errors
    load = f"open loop {args.rate:g} req/s" if args.rate else "closed loop C=64"
    what = f"bare proxy ({args.loop})" if args.bare else f"gateway ({args.loop}, {args.parser})"
    print(
        f"# {what} under {load} for {args.seconds:g} s: "
        f"{served / elapsed:.0f} req/s, {cpu / served * 1e6:.0f} us CPU per request, "
        f"{cpu / elapsed * 100:.0f}% of a core; {out.errors} errors"
    )
    analyse(load_stacks(raw), cpu / served * 1e6, args.top)
    if args.keep:
        print(f"\nraw stacks kept in {raw} (flamegraph.pl or speedscope can draw them)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=0.0, help="open loop at this rate (default: closed loop)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--parser", choices=("pipelined", "hiredis", "python"), default="pipelined")
    ap.add_argument("--chat", action="store_true", help="POST /v1/chat/completions (2 KB body), not GET")
    ap.add_argument("--bare", action="store_true", help="profile the bare proxy instead (the baseline)")
    ap.add_argument("--hz", type=int, default=250, help="py-spy sampling rate")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep", help="keep py-spy's raw stacks here")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="aai-bench-prof-"))
    procs = Processes(workdir)
    try:
        uvloop.run(run(args, workdir, procs))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
