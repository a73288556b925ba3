"""TLS on the listener (gateway/tls.py): https and wss on the one port, the real SDKs unchanged.

A test CA signs a certificate for DNS:localhost and IP:127.0.0.1; the SDKs trust the CA the
usual way (SSL_CERT_FILE for Python, NODE_EXTRA_CA_CERTS for node) and are given a bare
host, as a user would. The npm SDK is installed by its fixture (``npm ci`` in tests/node):
a missing node or npm fails the test, it is never skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry

from gateway.__main__ import bind
from gateway.app import build_app
from gateway.config import Tls
from gateway.sim.app import Sim, SimConfig
from tests.helpers import (
    TEST_SECRET_KEY,
    captured_logs,
    free_port,
    gateway_config,
    running_sim,
    sdk_stream_script,
    start_gateway_process,
)

NODE_DIR = Path(__file__).parent / "node"


# --- certificates ------------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path  # what clients trust
    cert: Path  # the server's chain (leaf, then CA)
    key: Path
    folder: Path

    @property
    def tls(self) -> Tls:
        return Tls(cert_file=str(self.cert), key_file=str(self.key))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_certs(folder: Path, cn: str = "aai-gateway test") -> Certs:
    """A test CA and a server certificate it signs, for DNS:localhost and IP:127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{cn} CA"))
        .issuer_name(_name(f"{cn} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    certs = Certs(folder / "ca.pem", folder / "cert.pem", folder / "key.pem", folder)
    certs.ca.write_bytes(ca.public_bytes(pem))
    certs.cert.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    certs.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def client_context(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


# --- a gateway over TLS, in this process --------------------------------------------------------


@dataclass
class TlsGateway:
    sim: Sim
    port: int
    app: web.Application
    registry: CollectorRegistry
    served: Any  # gateway.tls.ServerTls

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


@asynccontextmanager
async def tls_gateway(
    certs: Certs, sim_config: SimConfig | None = None, *, handshake_timeout_s: float = 5.0, **overrides: Any
) -> AsyncIterator[TlsGateway]:
    from gateway.tls import ListenSite, server_context

    async with running_sim(sim_config) as (sim, sim_url):
        config = gateway_config(sim_url, listen={"tls": certs.tls.model_dump()}, **overrides)
        assert config.listen.tls is not None
        served = server_context(config.listen.tls)
        registry = CollectorRegistry()
        app = build_app(config, registry=registry)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        (sock,) = bind("127.0.0.1", 0, "")
        site = ListenSite(runner, sock, ssl_context=served.context, handshake_timeout_s=handshake_timeout_s)
        await site.start()
        try:
            yield TlsGateway(sim, sock.getsockname()[1], app, registry, served)
        finally:
            await runner.cleanup()


async def peer_subject(port: int, ca: Path) -> str:
    """The common name of the certificate the server presents to a new handshake."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl.create_default_context(cafile=str(ca)), server_hostname="localhost"
    )
    try:
        cert = writer.get_extra_info("peercert")
        return str(dict(x[0] for x in cert["subject"])["commonName"])
    finally:
        writer.close()


# --- the certificate and key files ---------------------------------------------------------------


def test_bad_files_are_refused_naming_the_key_path(tmp_path: Path, certs: Certs) -> None:
    from gateway.tls import TlsError, server_context

    other = make_certs(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    encrypted = tmp_path / "encrypted.pem"
    key = serialization.load_pem_private_key(certs.key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    missing = str(tmp_path / "missing.pem")
    cases = [
        (Tls(cert_file=missing, key_file=str(certs.key)), "listen.tls.cert_file: cannot read"),
        (Tls(cert_file=str(certs.cert), key_file=missing), "listen.tls.key_file: cannot read"),
        (Tls(cert_file=str(garbage), key_file=str(certs.key)), "listen.tls.cert_file: "),
        (Tls(cert_file=str(certs.cert), key_file=str(garbage)), "listen.tls.key_file: "),
        (Tls(cert_file=str(certs.cert), key_file=str(other.key)), "listen.tls.key_file: "),
        (Tls(cert_file=str(certs.cert), key_file=str(encrypted)), "listen.tls.key_file: "),
    ]  # fmt: skip
    for tls, start in cases:
        with pytest.raises(TlsError) as caught:
            server_context(tls)
        assert str(caught.value).startswith(start), (tls, caught.value)
    assert "does not match the certificate" in str(pytest.raises(TlsError, server_context, cases[4][0]).value)
    assert "passphrase" in str(pytest.raises(TlsError, server_context, cases[5][0]).value)
    served = server_context(certs.tls)
    assert "DNS:localhost, IP:127.0.0.1" in served.describe()
    assert served.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_bad_certificate_stops_serve_with_exit_code_2(tmp_path: Path, certs: Certs) -> None:
    """``serve`` exits 2 naming the key path, no traceback; ``check-config`` exits 1 likewise."""
    missing = tmp_path / "nope.pem"
    config = tmp_path / "gw.yaml"
    tls = {"cert_file": str(missing), "key_file": str(certs.key)}
    raw = {"listen": {"port": free_port(), "tls": tls}, "transcripts": {"data_dir": str(tmp_path / "data")}}
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAI_GATEWAY_")}
    env["AAI_GATEWAY_SECRET_KEY"] = TEST_SECRET_KEY

    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway", *args, str(config)]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    served = gateway("serve", "--config")
    assert served.returncode == 2, served.stderr
    assert f"listen.tls.cert_file: cannot read {missing}: No such file or directory" in served.stderr
    assert "Traceback" not in served.stderr
    checked = gateway("check-config")
    assert checked.returncode == 1 and "listen.tls.cert_file: cannot read" in checked.stderr, checked
    config.write_text(yaml.safe_dump({**raw, "listen": {"tls": certs.tls.model_dump()}}))
    checked = gateway("check-config")
    assert checked.returncode == 0 and "tls: certificate CN=aai-gateway test" in checked.stdout, checked


async def test_reload_tls_serves_the_new_certificate_to_new_handshakes(tmp_path: Path, certs: Certs) -> None:
    from gateway.tls import TlsError, reload_tls

    renewed = make_certs(tmp_path / "renewed", cn="renewed")
    async with tls_gateway(certs) as gw:
        assert await peer_subject(gw.port, certs.ca) == "aai-gateway test"
        # an open connection keeps its certificate; a new handshake gets the new one
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs))) as http:
            async with http.get(gw.url + "/healthz") as resp:
                assert resp.status == 200
            assert "renewed" in reload_tls(gw.served, renewed.tls)
            async with http.get(gw.url + "/healthz") as resp:  # the pooled connection
                assert resp.status == 200
        assert await peer_subject(gw.port, renewed.ca) == "renewed"
        # a bad renewal is refused and the served certificate stays
        with pytest.raises(TlsError, match="listen.tls.key_file"):
            reload_tls(gw.served, Tls(cert_file=str(certs.cert), key_file=str(renewed.key)))
        assert await peer_subject(gw.port, renewed.ca) == "renewed"


async def test_urls_the_gateway_writes_say_https(certs: Certs) -> None:
    async with tls_gateway(certs) as gw:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs))) as http:
            headers = {"Authorization": "k"}
            job = {"audio_url": "https://e/a.mp3"}
            async with http.post(gw.url + "/v2/transcript", json=job, headers=headers) as resp:
                assert resp.status == 200
            async with http.get(gw.url + "/v2/transcript?limit=1", headers=headers) as resp:
                page = await resp.json()
            assert page["page_details"]["current_url"].startswith(gw.url + "/v2/transcript"), page


# --- the real SDKs -------------------------------------------------------------------------------

PY_SDK = sdk_stream_script(
    """
    host = sys.argv[1]
    out = {}
    out["with_key"] = stream(StreamingClientOptions(api_key="py-key", api_host=host))
    token = StreamingClient(StreamingClientOptions(api_key="py-key", api_host=host)).create_temporary_token(
        expires_in_seconds=60
    )
    out["with_token"] = stream(StreamingClientOptions(token=token, api_host=host))
    aai.settings.api_key = "py-key"
    aai.settings.base_url = "https://" + host
    aai.settings.polling_interval = 0.1
    t = aai.Transcriber().transcribe("https://example.com/a.mp3?sim_seconds=0.2")
    out["transcript"] = [str(t.status.value), t.text]
    print("RESULT " + json.dumps(out))
    """
)


async def run_client(args: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, Any]:
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *args, env={**os.environ, **env}, cwd=cwd, stdout=pipe, stderr=pipe
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 90)
    lines = [line for line in stdout.decode().splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (stdout.decode()[-2000:], stderr.decode()[-3000:])
    return json.loads(lines[-1][len("RESULT ") :])  # type: ignore[no-any-return]


def _a_whole_session(events: list[str]) -> bool:
    return events[0] == "Begin" and "Turn" in events and not any(e.startswith("Error") for e in events)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_python_sdk_streams_through_wss_with_a_bare_host(certs: Certs, host: str) -> None:
    """StreamingClient(api_host="HOST:PORT") -> wss://; create_temporary_token() -> https://;
    a REST transcript through https: the SDK unchanged, the CA trusted by SSL_CERT_FILE."""
    async with tls_gateway(certs, SimConfig(job_seconds=0.2), transcripts={"poll_refresh_s": 0.1}) as gw:
        out = await run_client(
            [sys.executable, "-c", PY_SDK, f"{host}:{gw.port}"], {"SSL_CERT_FILE": str(certs.ca)}
        )
        for events in (out["with_key"], out["with_token"]):
            assert _a_whole_session(events) and events[-1] == "Termination", out
        assert out["transcript"][0] == "completed" and out["transcript"][1].startswith("Simulated"), out
        assert gw.sim.recorder.violations == [] and gw.sim.streaming.report()["terminated"] == 2


@pytest.fixture(scope="session")
def node_sdk() -> Path:
    """The npm SDK in tests/node, installed from its lock file when missing (never skipped)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed for the npm SDK test (install Node.js >= 18)"
    if not (NODE_DIR / "node_modules" / "assemblyai" / "package.json").exists():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR


async def test_the_npm_sdk_streams_through_wss(certs: Certs, node_sdk: Path) -> None:
    """The npm SDK demands wss:; its token call goes to https://: both through the gateway."""
    async with tls_gateway(certs) as gw:
        out = await run_client(
            ["node", "stream.cjs", f"localhost:{gw.port}"], {"NODE_EXTRA_CA_CERTS": str(certs.ca)}, node_sdk
        )
        assert out["token"] == "string", out
        for events in (out["withKey"], out["withToken"]):
            assert _a_whole_session(events) and events[-1] == "Closed", out
        assert gw.sim.recorder.violations == [] and gw.sim.streaming.report()["terminated"] == 2


# --- hostile clients -----------------------------------------------------------------------------


async def _closed_without_answer(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


GARBAGE_HELLO = bytes.fromhex("160301002a010000260303") + b"\xff" * 40  # a record claiming more than it holds
BAD_VERSION_HELLO = bytes.fromhex("16030100050100000103") + b"\x00" * 3


async def test_plain_http_and_garbage_hellos_are_dropped_quietly(certs: Certs) -> None:
    with captured_logs() as logs:
        async with tls_gateway(certs, handshake_timeout_s=1.0) as gw:  # (truncated hellos wait for it)
            plain = b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: secret-plain-key\r\n\r\n"
            for data in (plain, GARBAGE_HELLO + b"\x00" * 100, BAD_VERSION_HELLO, b"\x16\x03\x01\x00\x00"):
                answer = await _closed_without_answer(gw.port, data)
                assert b"HTTP/" not in answer and b"200" not in answer, answer
            # still serving
            assert await peer_subject(gw.port, certs.ca) == "aai-gateway test"
    output = logs.getvalue()
    assert "Traceback" not in output and " ERROR " not in output, output
    assert "secret-plain-key" not in output


async def test_a_slow_handshake_blocks_nobody_and_is_dropped(certs: Certs) -> None:
    timeout_s = 2.0
    async with tls_gateway(certs, handshake_timeout_s=timeout_s) as gw:
        loop = asyncio.get_running_loop()
        stalled = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(20)]
        stalled[0][1].write(GARBAGE_HELLO[:5])  # a record header, then nothing
        started = loop.time()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs))) as http:
            for _ in range(5):
                async with http.get(gw.url + "/healthz") as resp:
                    assert resp.status == 200
        # served while the others still held their handshakes open (none had timed out yet)
        assert loop.time() - started < timeout_s
        assert not any(reader.at_eof() for reader, _ in stalled)
        for reader, writer in stalled:  # each is closed by the handshake timeout
            assert await asyncio.wait_for(reader.read(), timeout_s + 3) == b""
            writer.close()
        assert timeout_s - 0.2 < loop.time() - started < timeout_s + 3


async def test_serve_over_tls_in_its_own_process(tmp_path: Path, certs: Certs) -> None:
    """``aai-gateway serve`` (uvloop, the real listener): https, a plain-HTTP client dropped,
    the log naming https and the certificate, and no traceback."""
    raw = {
        "listen": {"tls": certs.tls.model_dump()},
        "upstream": {"api_url": "http://127.0.0.1:9", "llm_url": "http://127.0.0.1:9"},
        "transcripts": {"data_dir": str(tmp_path / "data")},
    }
    gw = start_gateway_process(raw, tls=client_context(certs))
    try:
        await gw.ready()
        assert await _closed_without_answer(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert await _closed_without_answer(gw.port, GARBAGE_HELLO) == b""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs))) as http:
            async with http.get(gw.url + "/readyz") as resp:
                assert resp.status == 200
    finally:
        returncode, output = await gw.stop()
    assert returncode == 0, output
    assert f"listening on https://127.0.0.1:{gw.port}" in output, output
    assert "TLS: certificate CN=aai-gateway test for DNS:localhost, IP:127.0.0.1" in output, output
    assert "Traceback" not in output and " ERROR " not in output, output


def test_the_gateway_base_says_https_on_tls_and_takes_only_well_formed_forwarded_values() -> None:
    from aiohttp.test_utils import make_mocked_request

    from gateway.proxy.urls import gateway_base

    def base(headers: dict[str, str], *, tls: bool = True, trust: bool = True) -> str:
        request = make_mocked_request("GET", "/v2/transcript", headers={"Host": "gw:8443", **headers})
        if tls:
            request._transport_sslcontext = ssl.create_default_context()  # as on a TLS socket
        return gateway_base(request, public_url=None, trust_forwarded=trust)

    assert base({}) == "https://gw:8443"
    assert base({}, tls=False) == "http://gw:8443"
    assert (
        base({"X-Forwarded-Proto": "http", "X-Forwarded-Host": "x.example"}, trust=False) == "https://gw:8443"
    )
    assert base({"X-Forwarded-Proto": "HTTPS, http", "X-Forwarded-Host": "x.example:443"}, tls=False) == (
        "https://x.example:443"
    )
    for proto, host in (("javascript", "evil.example/x?"), ("ftp", "a@b"), ("", "a b")):
        assert base({"X-Forwarded-Proto": proto, "X-Forwarded-Host": host}) == "https://gw:8443"
