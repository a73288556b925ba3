"""The benchmarks' processes: every server in its own, stopped at the end; a private
redis-server on a free port (a Redis on 6379 is never touched) and its INFO; CPU seconds
read from /proc. Used by proxy_overhead.py and the scripts built on it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA_DIR = ROOT / "gateway" / "admission" / "lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
