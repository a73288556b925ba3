"""proxy_overhead.py with nginx ``proxy_pass`` as one more baseline, in the same run.

The gateway's overhead against a bare aiohttp proxy says what the gateway adds to aiohttp;
against nginx it says what a team gives up by putting it where an nginx would stand. Both
baselines sit in front of the same fast upstream (bench/fast_upstream.py) and take slices of
the same interleaved rounds as the gateway variants, so the noise of a shared machine hits
them alike; the gateway/nginx ratios are taken round by round (median), like the others.

nginx runs as Debian ships it, started here with a generated config on a free port: no
daemon, one process (``master_process off``, so /proc/<pid>/stat is the process that does
the work and its CPU per request is comparable), keep-alive to the upstream, pid and logs
in the run's temp dir; stopped with the other processes at the end.

    python bench/nginx_overhead.py [--quick] [--json FILE]     (the arguments of proxy_overhead.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from loadgen import new_session, wait_ready
from overhead_report import fmt_table, report, summarise
from processes import Processes, free_port
from variants import Bench, Variant

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream aai {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://aai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


class NginxBench(Bench):
    """The variants of proxy_overhead.py, plus ``nginx`` (no loop: it is C)."""

    def __init__(self, args: argparse.Namespace, procs: Processes, workdir: Path) -> None:
        super().__init__(args, procs, workdir)
        self.nginx = Variant("nginx proxy_pass", "nginx", "-")

    async def start(self) -> None:
        await super().start()  # self.variants does not hold nginx yet: it is not a python server
        v = self.nginx
        v.port = free_port()
        conf = self.workdir / "nginx.conf"
        up_port = self.upstream_url.rsplit(":", 1)[1]
        conf.write_text(NGINX_CONF.format(dir=self.workdir, upstream_port=up_port, port=v.port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        v.proc = self.procs.start(
            "nginx", [nginx, "-c", str(conf), "-e", str(self.workdir / "nginx-stderr.log")]
        )
        await wait_ready(v.proc, f"{v.base}/v2/transcript/ready")
        v.session = new_session()
        self.variants.append(v)


def versus_nginx(bench: NginxBench) -> dict[str, Any]:
    """Every python variant against nginx: per-round ratios (median), added latency, CPU."""
    out = {}
    for v in bench.variants:
        if v is bench.nginx:
            continue
        row = summarise(v, bench.nginx, bench.script_cmds)
        out[v.name] = {
            k: row[k] for k in ("rps", "ratio", "p50", "p99", "add50", "add99", "cpu", "cpu_ratio")
        }
        out[v.name]["cpu_open_ratio"] = row["cpu_open_ratio"]
    return out


def report_nginx(args: argparse.Namespace, bench: NginxBench) -> dict[str, Any]:
    rows = versus_nginx(bench)
    ng = summarise(bench.nginx, bench.nginx, bench.script_cmds)
    print(
        f"\n## Against nginx proxy_pass (same rounds; nginx {ng['rps']:.0f} req/s closed loop, "
        f"p50 {ng['p50']:.2f} / p99 {ng['p99']:.2f} ms @{args.rate:g}/s, {ng['cpu']:.0f} us CPU/req)"
    )
    table = [
        [
            name,
            f"{r['rps']:.0f}",
            f"{r['ratio']:.2f}",
            f"{r['add50']:+.2f}",
            f"{r['add99']:+.2f}",
            f"{r['cpu']:.0f}",
            f"{r['cpu_ratio']:.2f}",
            f"{r['cpu_open_ratio']:.2f}",
        ]
        for name, r in rows.items()
    ]
    headers = ["variant", "req/s", "vs nginx", "+p50 ms", "+p99 ms", "CPU us/req", "CPU vs nginx"]
    headers.append(f"CPU vs nginx @{args.rate:g}/s")
    print(fmt_table(headers, table))
    return {"nginx": {k: ng[k] for k in ("rps", "p50", "p99", "cpu", "cpu_open")}, "versus": rows}


def write_json(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2))


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="aai-bench-nginx-"))
    procs = Processes(workdir)
    bench = NginxBench(args, procs, workdir)
    t_start = time.monotonic()
    try:
        await bench.start()
        slices = max(1, round(args.rounds * args.seconds / args.slice))
        print(
            f"# proxy overhead + nginx: {len(bench.variants)} variants; per variant "
            f"{slices} x {args.slice:g} s "
            f"closed loop (C={args.concurrency}) and open loop ({args.rate:g} req/s), interleaved",
            flush=True,
        )
        for v in bench.variants:
            await bench.warm(v)
        await bench.interleave(bench.variants, "closed", slices)
        await bench.interleave(bench.variants, "open", slices)
        args.json, json_path = None, args.json  # report() writes its own JSON; ours holds both
        report(args, bench, [], time.monotonic() - t_start)
        extra = report_nginx(args, bench)
        if json_path:
            summary = {
                v.name: summarise(v, bench.by_name(v.baseline) if v.baseline else v, bench.script_cmds)
                for v in bench.variants
            }
            write_json(json_path, {"summary": summary, **extra})
        return 0
    finally:
        await bench.close()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", "-T", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slice", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="T=3 s")
    ap.add_argument("--concurrency", "-C", type=int, default=64)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--json", help="also write the summary here as JSON")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args()
    args.cprofile = None
    if args.quick:
        args.seconds, args.slice = 3.0, min(args.slice, 1.5)
    for tool in ("redis-server", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not on PATH", file=sys.stderr)
            return 2
    return uvloop.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
