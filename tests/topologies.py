"""Real Redis topologies for the tests: a Redis Cluster and a Sentinel-watched primary.

Each is started from ``redis-server`` on free ports of its own (never 6379), in a temporary
folder, and torn down at the end of the test session. Nothing is skipped: a machine without
``redis-server`` / ``redis-cli`` fails these tests, as it fails the single-Redis ones.

- ``Cluster``: 3 masters, each with one replica (6 nodes), made with
  ``redis-cli --cluster create``; a failover of one shard promotes its replica.
- ``SentinelSet``: a primary, one replica, and 3 sentinels (quorum 2) watching it as
  ``mymaster``; killing the primary makes the sentinels promote the replica.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SERVICE = "mymaster"


def _free_ports(n: int) -> list[int]:
    """n distinct free ports; a cluster node also needs port + 10000 (its bus) free."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli(port: int, *args: str, timeout: float = 5.0) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return out.stdout.strip()


def _wait(check: object, what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except (subprocess.SubprocessError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class _Servers:
    folder: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, port: int, *args: str) -> None:
        workdir = self.folder / str(port)
        workdir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "log"),
             # A replica's first sync starts at once (the default waits 5 s for more replicas).
             "--repl-diskless-sync-delay", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(lambda: _cli(port, "PING") == "PONG", f"redis-server on {port}")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def pause(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGSTOP)

    def resume(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGCONT)

    def stop_all(self) -> None:
        for port in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                self.procs[port].send_signal(signal.SIGCONT)
            self.kill(port)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Cluster:
    masters: list[int]
    replicas: list[int]
    servers: _Servers

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.masters[0]}/0"

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        live = next(p for p in self.masters + self.replicas if p in self.servers.procs)
        slot = int(_cli(live, "CLUSTER", "KEYSLOT", key))
        for entry in _cli(live, "CLUSTER", "NODES").splitlines():
            fields = entry.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for rng in fields[8:]:
                lo, _, hi = rng.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no master serves slot {slot}")

    def fail_over(self, master: int) -> int:
        """Kill ``master``; wait until its replica is promoted and the cluster is ok again.
        Returns the new master's port."""
        replica = next(p for p in self.replicas if f":{master}" in _master_link(p))
        self.servers.kill(master)
        _wait(lambda: _cli(replica, "ROLE").splitlines()[:1] == ["master"], "the replica's promotion", 30)
        _wait(lambda: "cluster_state:ok" in _cli(replica, "CLUSTER", "INFO"), "cluster_state:ok", 30)
        return replica


def _master_link(replica: int) -> str:
    info = _cli(replica, "INFO", "replication")
    host = port = ""
    for line in info.splitlines():
        if line.startswith("master_host:"):
            host = line.split(":", 1)[1]
        if line.startswith("master_port:"):
            port = line.split(":", 1)[1]
    return f"{host}:{port}"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    ports = _free_ports(6)
    servers = _Servers(Path(tempfile.mkdtemp(prefix="aai-cluster-")))
    try:
        for port in ports:
            # A replica may take over however long it was cut off (validity factor 0): the
            # test kills masters that had no writes to replicate.
            servers.start(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", "1000",
                          "--cluster-replica-validity-factor", "0")  # fmt: skip
        out = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-500:]} {out.stderr[-500:]}")
        _wait(lambda: all("cluster_state:ok" in _cli(p, "CLUSTER", "INFO") for p in ports), "the cluster", 30)
        masters = [p for p in ports if _cli(p, "ROLE").splitlines()[:1] == ["master"]]
        replicas = [p for p in ports if p not in masters]
        # Synced, not only configured: a master killed before its replica's first sync takes
        # everything written to it along (the failover tests lost the account's jobs so).
        _wait(
            lambda: all("master_link_status:up" in _cli(r, "INFO", "replication") for r in replicas),
            "replicas synced",
            30,
        )
        yield Cluster(masters, replicas, servers)
    finally:
        servers.stop_all()


@dataclass
class SentinelSet:
    primary: int
    replica: int
    sentinels: list[int]
    servers: _Servers

    @property
    def hosts(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinels]

    def current_primary(self) -> int:
        out = _cli(self.sentinels[0], "SENTINEL", "get-master-addr-by-name", SERVICE).splitlines()
        return int(out[1])

    def fail_over(self) -> int:
        """Kill the primary; wait until the sentinels have promoted the replica. Returns its port."""
        old = self.current_primary()
        new = self.replica if old == self.primary else self.primary
        self.servers.kill(old)
        _wait(lambda: self.current_primary() == new, "the sentinels' failover", 30)
        _wait(lambda: _cli(new, "ROLE").splitlines()[:1] == ["master"], "the new primary", 30)
        return new


@contextlib.contextmanager
def sentinel_set() -> Iterator[SentinelSet]:
    primary, replica, *sentinels = _free_ports(5)
    folder = Path(tempfile.mkdtemp(prefix="aai-sentinel-"))
    servers = _Servers(folder)
    try:
        servers.start(primary)
        servers.start(replica, "--replicaof", "127.0.0.1", str(primary))
        _wait(lambda: "master_link_status:up" in _cli(replica, "INFO", "replication"), "the replica's link")
        for port in sentinels:
            conf = folder / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            servers.procs[port] = subprocess.Popen(
                ["redis-server", str(conf), "--sentinel", "--logfile", str(folder / f"sentinel-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            _wait(lambda port=port: _cli(port, "PING") == "PONG", f"sentinel on {port}")  # type: ignore[misc]
        _wait(
            lambda: all(
                _cli(s, "SENTINEL", "get-master-addr-by-name", SERVICE).splitlines()[1:] == [str(primary)]
                for s in sentinels
            ),
            "the sentinels to agree on the primary",
        )
        yield SentinelSet(primary, replica, sentinels, servers)
    finally:
        servers.stop_all()


def redis_tools_present() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


__all__ = ["Cluster", "SentinelSet", "cluster", "redis_tools_present", "sentinel_set"]
