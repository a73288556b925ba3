"""TLS overhead: the gateway serving https (listen.tls) against the same gateway serving http.

Two ``aai-gateway serve`` processes (uvloop, embedded store, limits too high to queue, no
access log), one plain and one with a certificate made here by the ``openssl`` CLI (EC P-256,
for DNS:localhost and IP:127.0.0.1), both in front of the same fast upstream
(bench/fast_upstream.py). The same load runs against each, in slices interleaved across the
two (plain, tls, tls, plain, ...) so the machine's noise hits both alike:

- keep-alive: C closed-loop workers, each sending ``GET /v2/transcript/<id>`` over one
  pooled connection (the handshake is paid once; the record layer on every request);
- new connection per request: the same with ``Connection: close`` (a full TLS 1.3
  handshake, ECDHE P-256 + ECDSA, on every request: the worst case, clients without pooling).

Printed: requests/s of each, the ratio tls / plain (median over rounds), and the gateway
process's CPU per request (utime+stime from /proc), which depends least on who else had the
cores. The load generator (this process) runs on the same machine and pays its own side of
TLS: the throughput ratio is a lower bound of the gateway's own.

Run:   python bench/tls_overhead.py            (T=5 s x 3 rounds per variant and load: ~1 minute)
       python bench/tls_overhead.py --quick    (T=2 s x 2 rounds)
Needs: the openssl CLI, uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIGH = 10_000_000

sys.path.insert(0, str(HERE))
from loadgen import closed_loop  # noqa: E402
from processes import cpu_seconds, free_port  # noqa: E402


def make_cert(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Gateway:
    name: str
    port: int
    scheme: str
    popen: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


def start_gateway(name: str, folder: Path, upstream: str, tls: dict[str, str] | None) -> Gateway:
    port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port, "tls": tls},
        "upstream": {"api_url": upstream, "llm_url": upstream},
        "limits": {
            "plan": "paid",
            "requests": {"limit": HIGH, "window_s": 300},
            "llm_requests": {"limit": HIGH, "window_s": 60},
        },
        "log": {"access_log": False, "level": "warning"},
        "transcripts": {"data_dir": str(folder / f"data-{name}")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAI_GATEWAY_")}
    env["AAI_GATEWAY_SECRET_KEY"] = "9KQ-aTwgmQNwfRoJRvR6Q3Co2dDIDfvFYShmQmXyJqE="
    log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
    popen = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    return Gateway(name, port, "https" if tls else "http", popen)


async def wait_ready(gw: Gateway, client_tls: ssl.SSLContext) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as http:
        for _ in range(200):
            try:
                async with http.get(gw.base + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if gw.popen.poll() is not None:
                raise RuntimeError(f"{gw.name} exited")
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{gw.name} not ready")


async def load(
    gw: Gateway, client_tls: ssl.SSLContext, *, workers: int, seconds: float, fresh: bool
) -> tuple[float, float, int]:
    """(requests/s, gateway CPU µs per request, errors) for ``seconds`` of closed-loop load
    (proxy_overhead.py's, ``GET /v2/transcript/<id>``; a failed connection counts as an error)."""
    connector = aiohttp.TCPConnector(ssl=client_tls, limit=0, force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as http:
        cpu0 = cpu_seconds(gw.popen.pid)
        out = await closed_loop(http, gw.base, workers, seconds, count_client_errors=True)
        out.cpu_s = cpu_seconds(gw.popen.pid) - cpu0
    return out.rps, out.cpu_us, out.errors


async def measure(args: argparse.Namespace, gateways: list[Gateway], client_tls: ssl.SSLContext) -> None:
    for gw in gateways:
        await wait_ready(gw, client_tls)
    for gw in gateways:  # warm up: pools, the job database, caches
        await load(gw, client_tls, workers=args.workers, seconds=1.0, fresh=False)
    print(f"T={args.seconds:g}s x {args.rounds} rounds, C={args.workers} workers; gateway on uvloop")
    for label, fresh in (("keep-alive", False), ("new connection per request", True)):
        figures: dict[str, list[tuple[float, float, int]]] = {"plain": [], "tls": []}
        for r in range(args.rounds):
            for gw in gateways if r % 2 == 0 else gateways[::-1]:
                figures[gw.name].append(
                    await load(gw, client_tls, workers=args.workers, seconds=args.seconds, fresh=fresh)
                )
        ratios = [t[0] / p[0] for p, t in zip(figures["plain"], figures["tls"], strict=True)]
        cpu = {name: statistics.median(f[1] for f in figures[name]) for name in figures}
        print(f"\n{label}:")
        for name in ("plain", "tls"):
            rps = statistics.median(f[0] for f in figures[name])
            errs = sum(f[2] for f in figures[name])
            print(f"  {name:5}  {rps:8.0f} req/s   gateway CPU {cpu[name]:6.0f} µs/request   errors {errs}")
        print(
            f"  ratio tls/plain: throughput {statistics.median(ratios):.2f} "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
            f"CPU per request {cpu['tls'] / cpu['plain']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="T=2 s x 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 2.0, 2
    folder = Path(tempfile.mkdtemp(prefix="aai-tls-bench-"))
    cert, key = make_cert(folder)
    up_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, str(HERE / "fast_upstream.py"), "--port", str(up_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    up_url = f"http://127.0.0.1:{up_port}"
    gateways = [
        start_gateway("plain", folder, up_url, None),
        start_gateway("tls", folder, up_url, {"cert_file": str(cert), "key_file": str(key)}),
    ]
    try:
        uvloop.run(measure(args, gateways, ssl.create_default_context(cafile=str(cert))))
    finally:
        procs = [*(gw.popen for gw in gateways), upstream]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
