"""Running the simulator and gateways for tests: in this process, or as separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from gateway.admission.store import Store
from gateway.app import build_app
from gateway.config import Config
from gateway.sim.app import Sim, SimConfig, build_sim_app

# One secret key for every gateway the tests start (instances sharing Redis need the same).
TEST_SECRET_KEY = "9KQ-aTwgmQNwfRoJRvR6Q3Co2dDIDfvFYShmQmXyJqE="
os.environ.setdefault("AAI_GATEWAY_SECRET_KEY", TEST_SECRET_KEY)


def ws_frame(
    b0: int, payload: bytes, *, key: bytes | None = b"\x01\x02\x03\x04", length: int | None = None
) -> bytes:
    """A WebSocket frame built by hand, as a hostile peer may write it: any first byte (FIN,
    RSV bits, opcode), masked with ``key`` or not (None), and a length field of ``length``
    (default: the payload's)."""
    from gateway.proxy import ws_wire

    n = len(payload) if length is None else length
    bit = 0x80 if key is not None else 0
    if n < 126:
        head = struct.pack("!BB", b0, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, n)
    return head + key + ws_wire.unmask(payload, key) if key is not None else head + payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(sim_url: str, **overrides: Any) -> Config:
    """A config pointing every upstream at the simulator; ``overrides`` merge into it."""
    raw: dict[str, Any] = {
        "upstream": {"api_url": sim_url, "llm_url": sim_url, "streaming_url": "ws" + sim_url[len("http") :]},
        "listen": {"host": "127.0.0.1", "port": 0},
        "log": {"access_log": False},
        "transcripts": {"data_dir": tempfile.mkdtemp(prefix="aai-gw-data-")},
    }
    return Config.model_validate(_merge(raw, overrides))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Running:
    sim: Sim
    sim_url: str
    url: str
    app: web.Application
    registry: CollectorRegistry


@asynccontextmanager
async def running_sim(config: SimConfig | None = None) -> AsyncIterator[tuple[Sim, str]]:
    sim = Sim(config or SimConfig())
    server = TestServer(build_sim_app(sim), host="127.0.0.1")
    await server.start_server()
    try:
        yield sim, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@asynccontextmanager
async def running_gateway(
    config: Config, *, store: Store | None = None, port: int | None = None
) -> AsyncIterator[tuple[str, web.Application, CollectorRegistry]]:
    registry = CollectorRegistry()
    app = build_app(config, store=store, registry=registry)
    server = TestServer(app, host="127.0.0.1", port=port, handler_cancellation=True)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), app, registry
    finally:
        await server.close()


@asynccontextmanager
async def sim_and_gateway(
    sim_config: SimConfig, *, store: str = "sqlite", **overrides: Any
) -> AsyncIterator[tuple[Sim, str, Any]]:
    """The simulator and one gateway, with its app, on ``store`` ("sqlite": the embedded
    store; "redis": the real Redis under a key prefix of its own, deleted afterwards)."""
    from tests.conftest import REDIS_URL  # (conftest imports nothing from here)

    prefix = "sg" + uuid.uuid4().hex[:8]
    if store == "redis":
        overrides = {**overrides, "redis": {"url": REDIS_URL, "key_prefix": prefix}}
    async with running_sim(sim_config) as (sim, sim_url):
        async with running_gateway(gateway_config(sim_url, **overrides)) as (url, app, _):
            try:
                yield sim, url, app
            finally:
                if store == "redis":
                    await delete_prefix(prefix)


async def delete_prefix(prefix: str) -> None:
    """Delete a test's keys (its own key prefix) from the real Redis; never FLUSHALL."""
    from tests.conftest import redis_client

    client = await redis_client()
    async for key in client.scan_iter(match=f"{prefix}:*"):
        await client.delete(key)
    await client.aclose()


@asynccontextmanager
async def stack(sim_config: SimConfig | None = None, **gateway_overrides: Any) -> AsyncIterator[Running]:
    """The simulator and one gateway in front of it, both in this process."""
    async with running_sim(sim_config) as (sim, sim_url):
        config = gateway_config(sim_url, **gateway_overrides)
        async with running_gateway(config) as (url, app, registry):
            yield Running(sim, sim_url, url, app, registry)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@contextmanager
def captured_logs(formatter: logging.Formatter | None = None) -> Iterator[io.StringIO]:
    """Every logger at DEBUG into one protected handler, formatted as ``aai-gateway serve`` does
    (or by ``formatter``)."""
    from gateway.logs import FORMAT, protect

    root = logging.getLogger()
    stream = io.StringIO()
    handler = protect(logging.StreamHandler(stream))
    handler.setFormatter(formatter or logging.Formatter(FORMAT))
    handler.setLevel(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# The real Python SDK, in a process of its own: one streaming session, its events noted.
_SDK_STREAM = textwrap.dedent(
    """
    import json, sys, time
    import assemblyai as aai
    from assemblyai.streaming.v3 import (
        StreamingClient, StreamingClientOptions, StreamingEvents, StreamingParameters,
    )
    def stream(options):
        events = []
        client = StreamingClient(options)
        client.on(StreamingEvents.Begin, lambda c, e: events.append("Begin"))
        client.on(StreamingEvents.Turn, lambda c, e: events.append("Turn"))
        client.on(StreamingEvents.Termination, lambda c, e: events.append("Termination"))
        client.on(StreamingEvents.Error, lambda c, e: events.append("Error: " + str(e)))
        client.connect(StreamingParameters(sample_rate=16000))
        def audio():
            for _ in range(30):
                yield b"\\0\\0" * 800
                time.sleep(0.05)
        client.stream(audio())
        client.disconnect(terminate=True)
        return events
    """
)


def sdk_stream_script(body: str) -> str:
    """A script for ``python -c`` with the real SDK: ``stream(options)`` runs one streaming
    session (1.5 s of silence, then Terminate) and returns the events it saw ("Begin", "Turn",
    "Termination", "Error: ..."); ``body`` (dedented) calls it and prints ``RESULT <json>``.
    One copy, so the plain and the TLS tests drive the SDK the same way."""
    return _SDK_STREAM + textwrap.dedent(body)


# -- separate processes ----------------------------------------------------------------------
class Process:
    """A process of ours (``python -m gateway ...``), its output in a log file of its own."""

    tls: ssl.SSLContext | None = None  # a client context trusting it: it serves https

    def __init__(
        self, args: list[str], env: dict[str, str], port: int, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.port = port
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="aai-gw-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    async def ready(self, path: str | None = "/healthz", within: float = 20.0) -> None:
        """Until ``path`` answers (below 500). ``None``: until the port takes a connection, no
        request sent (a test that counts access-log lines sees only its own)."""
        deadline = asyncio.get_running_loop().time() + within
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls or True)) as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"process exited: {self.output()}")
                try:
                    if path is None:
                        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                        writer.close()
                        return
                    async with session.get(self.url + path) as resp:
                        if resp.status < 500:
                            return
                except (aiohttp.ClientError, OSError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"not ready: {self.output()}")
                await asyncio.sleep(0.1)

    def output(self, tail: int | None = 4000) -> str:
        """The last ``tail`` characters of what it wrote (None: all of it)."""
        with open(self.log.name) as f:
            text = f.read()
        return text if tail is None else text[-tail:]

    async def stop(self, within: float = 15.0) -> tuple[int, str]:
        """SIGTERM, as an orchestrator stops it; (its exit code, all it wrote). Killed if it
        has not exited ``within`` seconds (then the wait's TimeoutExpired is raised)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = await asyncio.to_thread(self.proc.wait, within)
            return code, self.output(tail=None)
        finally:
            self.kill()

    def kill(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 10 s) and remove its log; again: nothing."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log.name)


def start_sim_process(config: SimConfig) -> Process:
    port = free_port()
    from dataclasses import asdict

    return Process(
        ["sim", "--port", str(port), "--sim-config", json.dumps(asdict(config))], dict(os.environ), port
    )


def start_gateway_process(
    raw_config: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    public_url: bool = False,
    tls: ssl.SSLContext | None = None,
) -> Process:
    """``aai-gateway serve`` on ``raw_config`` in a process of its own, on a free local port,
    its output captured (``Process.output``, ``Process.stop``). The environment is this one
    without any AAI_GATEWAY_* variable but the tests' secret key (the same on every instance),
    plus ``env``. ``public_url``: the config's ``public_url`` is the process's own address, so
    upstream's webhooks for the jobs it submits come back to it. ``tls``: a client context
    trusting the certificate of the config's ``listen.tls``: its url says https and readiness
    is asked over TLS. Without ``transcripts.data_dir`` in the config, each process gets a
    folder of its own, as each instance of a deployment has its own disk: the default
    (./aai-gateway-data) would let one test's journal or pending usage leak into another's."""
    port = free_port()
    scheme = "https" if tls else "http"
    over: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": port}}
    if "data_dir" not in (raw_config.get("transcripts") or {}):
        over["transcripts"] = {"data_dir": tempfile.mkdtemp(prefix="aai-gw-data-")}
    if public_url:
        over["public_url"] = f"{scheme}://127.0.0.1:{port}"
    raw = _merge(raw_config, over)
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    yaml.safe_dump(raw, f)
    f.close()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AAI_GATEWAY_")}
    clean["AAI_GATEWAY_SECRET_KEY"] = TEST_SECRET_KEY  # the same on every instance
    return Process(["serve", "--config", f.name], {**clean, **(env or {})}, port, tls=tls)


# -- several gateway processes on one store, the simulator process the judge ----------------
@dataclass(frozen=True)
class Limits:
    """An account's limits for a multi-instance run: the simulator enforces them upstream and
    the gateways are configured with them, so a violation upstream is the gateways' fault."""

    requests: int  # per window, the whole account
    model: int  # per window, per model
    window_s: float
    models: tuple[str, ...] = ("gpt-5", "claude-sonnet-4-6")
    guard_ms: int = 100

    def sim_config(self, **more: Any) -> SimConfig:
        return SimConfig(
            requests_limit=self.requests,
            requests_window_s=self.window_s,
            llm_limit=self.model,
            llm_window_s=self.window_s,
            **more,
        )

    def gateway_config(self, sim_url: str, redis: dict[str, Any], **more: Any) -> dict[str, Any]:
        """What every instance shares: the simulator upstream, ``redis`` (its config section),
        these limits, 3 s of waiting at most, warnings only; ``more`` merges into it."""
        raw = {
            "upstream": {"api_url": sim_url, "llm_url": sim_url, "streaming_url": "ws" + sim_url[4:]},
            "redis": redis,
            "limits": {
                "guard_ms": self.guard_ms,
                "requests": {"limit": self.requests, "window_s": self.window_s},
                "llm_requests": {"limit": self.model, "window_s": self.window_s},
            },
            "queue": {"max_wait_s": 3, "llm_max_wait_s": 3},
            "log": {"level": "warning", "access_log": False},
        }
        return _merge(raw, more)


async def start_gateways(
    raw_config: dict[str, Any], count: int, *, public_url: bool = False
) -> list[Process]:
    """``count`` gateway processes on one config, each ready (``/readyz``); if one is not,
    all are killed before the error goes up."""
    gateways = [start_gateway_process(raw_config, public_url=public_url) for _ in range(count)]
    try:
        for g in gateways:
            await g.ready("/readyz")
    except BaseException:
        for g in gateways:
            g.kill()
        raise
    return gateways


async def at_rate(rate: float, seconds: float, call: Callable[[int], Awaitable[None]]) -> None:
    """An open loop: ``call(0)``, ``call(1)``, ... each started on schedule (``rate`` a
    second, for ``seconds``) whatever the earlier ones are doing, then all awaited."""
    loop = asyncio.get_running_loop()
    tasks = []
    start = loop.time()
    i = 0
    while loop.time() - start < seconds:
        tasks.append(asyncio.ensure_future(call(i)))
        i += 1
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    await asyncio.gather(*tasks)


async def sim_report(sim: Process) -> dict[str, Any]:
    """The simulator process's ``/_sim/report``: what upstream saw (violations, busiest windows)."""
    async with aiohttp.ClientSession() as http, http.get(sim.url + "/_sim/report") as r:
        return dict(await r.json())


def assert_exact(report: dict[str, Any], statuses: list[int], limits: Limits) -> None:
    """The simulator's ``report`` after an overload: no violation, and no waste (the busiest
    rolling window of each limit used at least 95% of it: the guard costs guard / W); every
    refusal came from the gateway (429 after its max wait), never from upstream."""
    assert report["violations"] == [], report["violations"][:5]
    assert report["requests"]["busiest"] >= 0.95 * limits.requests, report["requests"]
    for model in limits.models:
        assert report["llm"][model]["busiest"] >= 0.95 * limits.model, report["llm"]
    assert set(statuses) <= {200, 404, 429}, statuses
    assert statuses.count(200) + statuses.count(404) == report["requests"]["arrivals"]


@asynccontextmanager
async def serving(app: web.Application, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """An aiohttp app on a free local port (over TLS when given one); yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def self_signed_tls(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts: a certificate for localhost, and a client trusting it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))
