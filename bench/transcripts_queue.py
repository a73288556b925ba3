"""1,000 transcripts through 3 gateway instances, a concurrency limit of 50.

Simulated jobs last about 20 client polls, scaled down together: a job runs JOB_S seconds
and clients poll every JOB_S / 20 (the SDK's 3 s and a 60 s job, divided by 12 by default).
USERS clients each submit a job, poll it until it ends, and submit the next, so the queue
in the gateway stays full. Everything runs as processes on one machine: a private
redis-server, the upstream simulator, three gateways sharing the Redis, this load generator.

Reports, against baselines measured in the same run:
- wall time against the ideal, jobs / limit x job time (the limit's own schedule);
- upstream GETs per client poll (all polls, and polls of running jobs);
- store (Redis) round trips per job, from the gateways' own counters;
- that upstream never throttled a job nor ran more than the limit.

    python bench/transcripts_queue.py                    # with webhooks (public_url set)
    python bench/transcripts_queue.py --no-webhooks      # gateways learn of ends by polling
    python bench/transcripts_queue.py --jobs 300 --job-s 2   # a quick one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

LIMIT = 50
INSTANCES = 3
SECRET = "9KQ-aTwgmQNwfRoJRvR6Q3Co2dDIDfvFYShmQmXyJqE="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ready(url: str, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


async def spawn(*argv: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


async def scrape(http: aiohttp.ClientSession, url: str, name: str) -> float:
    """Sum of every sample of one counter on one gateway's /metrics."""
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    poll_s = args.job_s / 20
    workdir = Path(tempfile.mkdtemp(prefix="aai-bench-tx-"))
    redis_port, sim_port = free_port(), free_port()
    ports = [free_port() for _ in range(INSTANCES)]
    procs = [await spawn("redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no")]
    sim_cfg = {"async_concurrency": LIMIT, "job_seconds": args.job_s, "webhook_retry_s": 1.0}
    procs.append(await spawn(sys.executable, "-m", "gateway", "sim", "--port", str(sim_port), "--sim-config",
                             json.dumps(sim_cfg)))  # fmt: skip
    sim = f"http://127.0.0.1:{sim_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAI_GATEWAY_")}
    env["AAI_GATEWAY_SECRET_KEY"] = SECRET
    gateways = []
    for port in ports:
        cfg: dict[str, Any] = {
            "listen": {"port": port},
            "upstream": {"api_url": sim, "llm_url": sim, "streaming_url": f"ws://127.0.0.1:{sim_port}"},
            "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
            "limits": {"async_concurrency": LIMIT},
            "transcripts": {"poll_refresh_s": args.refresh_s, "reconcile_after_s": max(1.0, args.job_s)},
            "log": {"level": "warning", "access_log": False},
        }
        if args.webhooks:
            cfg["public_url"] = f"http://127.0.0.1:{port}"
        path = workdir / f"gw-{port}.yaml"
        path.write_text(json.dumps(cfg))
        procs.append(await spawn(sys.executable, "-m", "gateway", "serve", "--config", str(path), env=env))
        gateways.append(f"http://127.0.0.1:{port}")
    try:
        await ready(sim + "/_sim/report")
        for g in gateways:
            await ready(g + "/readyz")
        return await load(args, gateways, sim, poll_s)
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
                await p.wait()


async def load(args: argparse.Namespace, gateways: list[str], sim: str, poll_s: float) -> dict[str, Any]:
    submitted = 0
    polls = running_polls = 0
    headers = {"Authorization": "bench-key"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        started = time.perf_counter()

        async def user(u: int) -> None:
            nonlocal submitted, polls, running_polls
            while submitted < args.jobs:
                n = submitted
                submitted += 1
                gw = gateways[n % len(gateways)]
                body = {"audio_url": f"https://example.com/{n}.mp3"}
                async with http.post(gw + "/v2/transcript", json=body, headers=headers) as r:
                    job = await r.json()
                    assert r.status == 200, job
                while True:  # poll the way the SDK does, through any instance
                    await asyncio.sleep(poll_s)
                    gw = gateways[(n + polls) % len(gateways)]
                    async with http.get(gw + f"/v2/transcript/{job['id']}", headers=headers) as r:
                        status = (await r.json())["status"]
                    polls += 1
                    running_polls += status == "processing"
                    if status in ("completed", "error"):
                        assert status == "completed", job
                        break

        await asyncio.gather(*(user(u) for u in range(args.users)))
        elapsed = time.perf_counter() - started
        async with http.get(sim + "/_sim/report") as r:
            report = await r.json()
        calls = sum([await scrape(http, g, "aai_gateway_store_calls_total") for g in gateways])
    return {
        "elapsed": elapsed,
        "ideal": args.jobs / LIMIT * args.job_s,
        "polls": polls,
        "running_polls": running_polls,
        "upstream_gets": report["transcript_gets"],
        "upstream_posts": report["transcript_posts"],
        "violations": report["violations"],
        "max_running": report["transcripts"]["max_running"],
        "store_calls": calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument(
        "--job-s", type=float, default=5.0, help="simulated job length (clients poll every job_s/20)"
    )
    ap.add_argument("--users", type=int, default=200, help="concurrent clients, each one job at a time")
    ap.add_argument(
        "--refresh-s", type=float, default=None, help="transcripts.poll_refresh_s (default: job_s/6)"
    )
    ap.add_argument("--no-webhooks", dest="webhooks", action="store_false")
    args = ap.parse_args()
    if args.refresh_s is None:
        args.refresh_s = args.job_s / 6  # the default 10 s against 60 s jobs, scaled
    r = asyncio.run(run(args))
    mode = "with webhooks (public_url set)" if args.webhooks else "without webhooks (poll_refresh_s)"
    print(f"# {args.jobs} jobs, {INSTANCES} instances, limit {LIMIT}, jobs of {args.job_s:g}s, "
          f"clients polling every {args.job_s / 20:g}s, {args.users} clients; {mode}")  # fmt: skip
    print(f"wall time {r['elapsed']:.1f}s vs ideal {r['ideal']:.1f}s (jobs / limit x job time): "
          f"ratio {r['elapsed'] / r['ideal']:.3f}")  # fmt: skip
    gets = r["upstream_gets"]
    print(f"client polls {r['polls']} ({r['running_polls']} of running jobs); upstream GETs {gets}")
    print(f"upstream GETs per client poll: {r['upstream_gets'] / max(1, r['polls']):.3f} "
          f"(per poll of a running job: {r['upstream_gets'] / max(1, r['running_polls']):.3f})")  # fmt: skip
    print(f"store round trips per job: {r['store_calls'] / args.jobs:.1f} ({r['store_calls']:.0f} in all)")
    print(f"upstream: {r['upstream_posts']} POSTs for {args.jobs} jobs; "
          f"most running at once {r['max_running']} "
          f"(limit {LIMIT}); violations {len(r['violations'])}")  # fmt: skip


if __name__ == "__main__":
    main()
