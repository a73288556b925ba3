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

The parts: processes.py (servers, the private Redis), loadgen.py (the closed and open loops),
variants.py (the setups compared, measured slice by slice), json_codecs.py, overhead_report.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from json_codecs import json_codecs
from loadgen import chat_body
from overhead_report import report
from processes import Processes
from variants import Bench


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
