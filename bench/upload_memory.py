"""Uploads stream through the gateway: its memory does not grow with the body.

Starts the upstream simulator and a gateway (embedded store) as processes, uploads SIZE MB
through the gateway in 1 MiB chunks, and reports the gateway's peak resident memory (VmHWM)
growth against the upload size, and the upload's throughput through the gateway against the
same upload sent straight to the simulator in the same run.

    python bench/upload_memory.py            # 1024 MB
    python bench/upload_memory.py --size-mb 2300
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
from collections.abc import AsyncIterator

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def upload(url: str, size_mb: int) -> float:
    chunk = b"\0" * (1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size_mb):
            yield chunk

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.perf_counter()
        headers = {"Authorization": "bench", "Content-Length": str(size_mb << 20)}
        async with http.post(url + "/v2/upload", data=body(), headers=headers) as r:
            assert r.status == 200, await r.text()
            await r.read()
        return time.perf_counter() - start


async def main(size_mb: int) -> None:
    sim_port, gw_port = free_port(), free_port()
    sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAI_GATEWAY_")}
    cfg = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    json.dump(
        {"listen": {"port": gw_port}, "upstream": {"api_url": sim_url}, "log": {"level": "warning"}}, cfg
    )
    cfg.close()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "sim", "--port", str(sim_port), env=env
        ),
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", cfg.name, env=env
        ),
    ]
    try:
        await wait_ready(sim_url + "/_sim/report")
        await wait_ready(gw_url + "/healthz")
        gw = procs[1].pid
        before = kib(gw, "VmRSS")
        direct = await upload(sim_url, size_mb)
        through = await upload(gw_url, size_mb)
        peak = kib(gw, "VmHWM")
    finally:
        for p in procs:
            p.terminate()
            await p.wait()
        os.unlink(cfg.name)
    growth_mb = (peak - before) / 1024
    print(f"upload of {size_mb} MB through the gateway")
    print(f"  gateway resident memory: {before / 1024:.1f} MB before, peak {peak / 1024:.1f} MB")
    print(f"  peak growth / body size: {growth_mb:.1f} MB / {size_mb} MB = {growth_mb / size_mb:.4f}")
    print(
        f"  throughput: direct {size_mb / direct:.0f} MB/s, through the gateway {size_mb / through:.0f} MB/s"
    )
    print(f"  ratio (through / direct): {direct / through:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    asyncio.run(main(parser.parse_args().size_mb))
