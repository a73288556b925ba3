"""CPU to parse one upstream response: llhttp through httptools (gateway/proxy/http1.py now)
vs the hand-written parser it replaced (http1.py at commit b9e5d86, read with ``git show``),
on the same bytes in one process. Prints µs per response and the ratio new/old; then the
whole client (``Pool.request`` + ``read`` + ``release``: parse, quiet check, pools) old vs new
against bench/fast_upstream.py in its own process, 32 requests at a time on uvloop, as the
CPU this process spends per request (interleaved rounds, median and best).

    python bench/parse_response.py [--n 20000] [--old-rev b9e5d86] [--no-pool]

Each round feeds one whole response to a pooled connection's protocol (``reset``, then
``data_received``, then the body taken), as the client does per request; the best of
9 interleaved rounds is kept (the machine is shared: the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.proxy import http1 as new  # noqa: E402

JSON = b'{"id": "5551722-f677-48a7-a7cb-2d0bcd9cba3c", "status": "completed", ' + b'"w": 1, ' * 20 + b"}"
CASES = {
    "small JSON (like bench/fast_upstream.py)": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: keep-alive\r\n\r\n%b" % (len(JSON), JSON)
    ),
    "API-like head (10 headers), JSON": (
        b"HTTP/1.1 200 OK\r\nDate: Mon, 30 Nov 2026 19:40:30 GMT\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: keep-alive\r\nServer: envoy\r\nx-request-id: 4d2c8f0e-1\r\n"
        b"x-envoy-upstream-service-time: 12\r\nvary: Accept-Encoding\r\nstrict-transport-security: "
        b"max-age=31536000\r\ncache-control: no-store\r\n\r\n%b" % (len(JSON), JSON)
    ),
    "chunked SSE, 8 chunks": (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in [b'data: {"choices": [{"delta": "hi"}]}\n\n'] * 8)
        + b"0\r\n\r\n"
    ),
    "64 KiB body": b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + b"z" * 65536,
}


def load_old(rev: str) -> types.ModuleType:
    src = subprocess.run(
        ["git", "show", f"{rev}:gateway/proxy/http1.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("gateway.proxy._http1_old")
    module.__package__ = "gateway.proxy"
    sys.modules[module.__name__] = module
    exec(compile(src, f"{rev}:gateway/proxy/http1.py", "exec"), module.__dict__)
    return module


def per_response(make: Callable[[], object], raw: bytes, n: int) -> Callable[[], float]:
    conn = make()

    def one_round() -> float:
        started = time.perf_counter()
        for _ in range(n):
            conn.reset(head_only=False)  # type: ignore[attr-defined]
            conn.data_received(raw)  # type: ignore[attr-defined]
            conn.take()  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - started
        assert conn.eof and conn.error is None, conn.error  # type: ignore[attr-defined]
        return elapsed / n * 1e6

    return one_round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="responses per round (default 20000)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds; the best is kept (default 9)")
    ap.add_argument("--no-pool", action="store_true", help="skip the whole-client comparison (~20 s)")
    ap.add_argument("--old-rev", default="b9e5d86", help="the commit whose http1.py is the old parser")
    args = ap.parse_args()
    old = load_old(args.old_rev)
    print(f"# one response: llhttp (httptools) vs the parser of {args.old_rev}; best of {args.rounds} rounds")
    print(f"{'response':44} {'bytes':>6} {'old us':>7} {'new us':>7} {'new/old':>8}")
    for name, raw in CASES.items():
        n = args.n if len(raw) < 4096 else max(1, args.n // 10)
        rounds_old = per_response(lambda: old._Conn(("http", "h", 80)), raw, n)
        rounds_new = per_response(lambda: new._Conn(("http", "h", 80, "")), raw, n)
        t_old = t_new = float("inf")
        for _ in range(args.rounds):  # interleaved: a busy moment hits both
            t_old, t_new = min(t_old, rounds_old()), min(t_new, rounds_new())
        print(f"{name:44} {len(raw):>6} {t_old:>7.2f} {t_new:>7.2f} {t_new / t_old:>8.2f}")
    if not args.no_pool:
        pool_cost(old)
    a, b = socket.socketpair()
    conn = new._Conn(("http", "h", 80, ""))
    conn.transport = _Idle()  # type: ignore[assignment]
    conn.watch(a.fileno())
    t0 = time.perf_counter()
    for _ in range(args.n):
        assert conn.quiet()
    quiet = (time.perf_counter() - t0) / args.n * 1e6
    a.close(), b.close()
    print(f"the quiet check before each reuse (poll(2) on the socket): {quiet:.2f} us")


def pool_cost(old: types.ModuleType, port: int = 8297, per_round: int = 8000, rounds: int = 7) -> None:
    import uvloop
    from multidict import CIMultiDict
    from yarl import URL

    server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fast_upstream.py"), "--port", str(port)])
    url, headers = URL(f"http://127.0.0.1:{port}/v2/transcript/x"), CIMultiDict({"Authorization": "k"})

    async def one_round(pool: object, **kw: str) -> float:
        async def worker() -> None:
            for _ in range(per_round // 32):
                resp = await pool.request("GET", url, headers, None, **kw)  # type: ignore[attr-defined]
                await resp.read()
                resp.release()

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(32)))
        return (time.process_time() - started) / per_round * 1e6

    async def run() -> None:
        for _ in range(50):  # until it listens
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        p_old = old.Pool(connect_timeout_s=2, read_timeout_s=5)
        p_new = new.Pool(connect_timeout_s=2, read_timeout_s=5)
        await one_round(p_old), await one_round(p_new, identity="k")  # warm up
        t_old, t_new = [], []
        for _ in range(rounds):
            t_old.append(await one_round(p_old))
            t_new.append(await one_round(p_new, identity="k"))
        t_old.sort(), t_new.sort()
        mid = rounds // 2
        print("whole client, GET of bench/fast_upstream.py, CPU us/request (this process, loop included):")
        print(f"  old median {t_old[mid]:.1f} best {t_old[0]:.1f}", end="; ")
        print(f"new median {t_new[mid]:.1f} best {t_new[0]:.1f}")
        print(f"  new/old: median {t_new[mid] / t_old[mid]:.2f}, best {t_new[0] / t_old[0]:.2f}")

    try:
        uvloop.run(run())
    finally:
        server.terminate()
        server.wait()


class _Idle:
    def get_extra_info(self, name: str) -> None:
        return None

    def is_closing(self) -> bool:
        return False


if __name__ == "__main__":
    main()
