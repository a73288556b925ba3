"""A client's webhook_url cannot make the gateway POST inside its own network.

Public addresses only, checked on the address the gateway connects to (a name that resolves
to 127.0.0.1 fails to connect); IP literals, which aiohttp does not resolve, checked before
the POST, in every form (mapped, NAT64, 6to4, decimal, hex); no redirects; only the one auth
header the client named, never one that frames or routes the request.
``transcripts.webhook_allow`` opens internal targets deliberately.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from prometheus_client import CollectorRegistry

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.products.transcripts.egress import Policy, is_public
from gateway.products.transcripts.jobs import Job
from gateway.products.transcripts.webhooks import Relay
from gateway.sim.app import SimConfig
from gateway.vault import Vault
from tests.helpers import TEST_SECRET_KEY, gateway_config, metric, running_gateway, running_sim, serving
from tests.test_transcripts import KEY, wait_for


class Receiver:
    """A local HTTP server that records every request it gets (and may redirect)."""

    def __init__(self, status: int = 200, location: str = "") -> None:
        self.status, self.location = status, location
        self.calls: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append({"headers": dict(request.headers), "body": await request.read()})
        headers = {"Location": self.location} if self.location else {}
        return web.Response(status=self.status, headers=headers)


@asynccontextmanager
async def receiver(rec: Receiver) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    async with serving(app) as port:
        yield port


class FakeResolver(AbstractResolver):
    """Resolves names from a table, as a DNS server the attacker controls would."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )  # fmt: skip
            for ip in self.table[host]
        ]

    async def close(self) -> None:
        return None


def config(**transcripts: Any) -> Config:
    return gateway_config("http://127.0.0.1:9", transcripts={"webhook_retry_s": 0.01, **transcripts})


def hooked_job(url: str, **auth: str) -> tuple[Job, Vault]:
    vault = Vault(TEST_SECRET_KEY)
    hook: dict[str, Any] = {"url": url}
    if auth:
        (name, value), *_ = auth.items()
        hook.update(auth_header_name=name.replace("_", "-"), auth_header_value=vault.encrypt(value))
    return Job(id="j-1", key_fp="fp", body={}, created_ms=0, extra={"webhook": hook}), vault


async def deliver(cfg: Config, job: Job, vault: Vault, **relay_kw: Any) -> CollectorRegistry:
    """Relay one ended-job event through a Relay built as the gateway builds it; wait for it."""
    registry = CollectorRegistry()
    relay = Relay(cfg, vault, Metrics(registry), **relay_kw)
    await relay.start()
    try:
        relay.send(job, {"transcript_id": job.id, "status": "completed"})
        await asyncio.wait_for(asyncio.gather(*relay._tasks), 10)
    finally:
        await relay.close()
    return registry


# -- refused when the job is created (400), and never posted --------------------------------
NEVER_DELIVERABLE = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://LOCALHOST.:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[::1]:{port}/hook",
    "http://2130706433:{port}/hook",  # 127.0.0.1 in decimal
    "http://0x7f.1:{port}/hook",  # and in hex, short form
    "http://0.0.0.0:{port}/hook",
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://10.1.2.3/hook",
    "http://100.64.0.1/hook",  # CGNAT
    "http://[64:ff9b::7f00:1]:{port}/hook",  # NAT64 of 127.0.0.1
    "http://[2002:7f00:1::]:{port}/hook",  # 6to4 of 127.0.0.1
    "http://[fe80::1%25lo]:{port}/hook",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "gopher://example.com:70/_",
    "http://user:secret@example.com/hook",  # becomes an Authorization header the client chose
]


async def test_webhook_urls_that_can_never_be_delivered_are_refused_and_nothing_is_posted() -> None:
    rec = Receiver()
    async with (
        receiver(rec) as port,
        running_sim(SimConfig(job_seconds=0.1)) as (sim, sim_url),
        running_gateway(gateway_config(sim_url, transcripts={"reconcile_after_s": 0.1})) as (url, _, _),
        aiohttp.ClientSession() as http,
    ):
        for template in NEVER_DELIVERABLE:
            hook = template.format(port=port)
            body = {"audio_url": "https://x/a.mp3", "webhook_url": hook}
            async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
                assert r.status == 400, (hook, r.status)
                assert "webhook_url" in (await r.json())["error"]
        await asyncio.sleep(0.5)  # what a job would take to end and be relayed
        assert rec.calls == [] and sim.transcripts.submitted == 0


@pytest.mark.parametrize(
    "name, value",
    [
        ("X-A\r\nX-Injected", "1"),
        ("X-A: b\r\nX-Injected", "1"),
        ("X-Auth", "ok\r\nX-Injected: 1"),
        ("X-Auth", "ok\nX-Injected: 1"),
        ("Host", "internal.example"),
        ("Content-Length", "0"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close"),
        ("Proxy-Authorization", "Basic eA=="),
        ("X Auth", "1"),
        ("", "1"),
    ],
)
async def test_auth_header_injection_is_refused(name: str, value: str) -> None:
    async with (
        running_sim(SimConfig()) as (sim, sim_url),
        running_gateway(gateway_config(sim_url)) as (url, _, _),
        aiohttp.ClientSession() as http,
    ):
        body = {
            "audio_url": "https://x/a.mp3",
            "webhook_url": "https://hooks.example.com/h",
            "webhook_auth_header_name": name,
            "webhook_auth_header_value": value,
        }
        async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
            if name == "":  # no header named: nothing to check (as upstream), accepted
                assert r.status == 200
                return
            assert r.status == 400, await r.text()
            assert "webhook_auth_header" in (await r.json())["error"]
        assert sim.transcripts.submitted == 0


# -- the connect-time guard -----------------------------------------------------------------
async def test_a_name_that_resolves_to_loopback_is_never_connected_to() -> None:
    """DNS says ``hooks.attacker.example`` is 127.0.0.1 (or rebinds to it after the POST was
    accepted): the connection is refused on the resolved address."""
    rec = Receiver()
    async with receiver(rec) as port:
        table = {"hooks.attacker.example": ["127.0.0.1"], "mixed.attacker.example": ["127.0.0.1", "::1"]}
        for host in table:
            resolver = FakeResolver(table)
            job, vault = hooked_job(f"http://{host}:{port}/hook")
            registry = await deliver(config(), job, vault, resolver=resolver)
            assert resolver.asked == [host]  # the name was resolved, then refused
            assert metric(registry, "aai_gateway_webhook_relays_total", outcome="blocked") == 1
        assert rec.calls == []


async def test_literals_and_localhost_stored_before_the_rule_are_not_posted() -> None:
    """Jobs recorded before the POST-time check (or by an older version) are checked again
    when their webhook is sent."""
    rec = Receiver()
    async with receiver(rec) as port:
        for host in ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::1]"]:
            job, vault = hooked_job(f"http://{host}:{port}/hook")
            registry = await deliver(config(), job, vault)
            assert metric(registry, "aai_gateway_webhook_relays_total", outcome="blocked") == 1, host
    assert rec.calls == []


async def test_webhook_allow_opens_internal_targets_deliberately() -> None:
    rec = Receiver()
    async with receiver(rec) as port:
        resolver = FakeResolver({"hooks.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]})
        # By address: a CIDR opens the literal and any name resolving into it.
        cfg = config(webhook_allow=["127.0.0.0/8"])
        for url in [f"http://127.0.0.1:{port}/a", f"http://hooks.internal:{port}/b"]:
            job, vault = hooked_job(url)
            registry = await deliver(cfg, job, vault, resolver=resolver)
            assert metric(registry, "aai_gateway_webhook_relays_total", outcome="delivered") == 1
        # By name: that name only, whatever it resolves to.
        cfg = config(webhook_allow=["hooks.internal"])
        cases = [
            (f"http://hooks.internal:{port}/c", "delivered"),
            (f"http://other.internal:{port}/d", "blocked"),
        ]
        for url, outcome in cases:
            job, vault = hooked_job(url)
            registry = await deliver(cfg, job, vault, resolver=resolver)
            assert metric(registry, "aai_gateway_webhook_relays_total", outcome=outcome) == 1, url
    assert len(rec.calls) == 3


async def test_webhook_allow_end_to_end_post_accepted_and_delivered() -> None:
    rec = Receiver()
    async with (
        receiver(rec) as port,
        running_sim(SimConfig(job_seconds=0.1)) as (sim, sim_url),
        aiohttp.ClientSession() as http,
    ):
        hook = f"http://127.0.0.1:{port}/hook"
        body = {"audio_url": "https://x/a.mp3", "webhook_url": hook}
        closed = gateway_config(sim_url)
        async with running_gateway(closed) as (url, _, _):
            async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
                assert r.status == 400
        opened = gateway_config(
            sim_url, transcripts={"webhook_allow": ["127.0.0.1"], "reconcile_after_s": 0.1}
        )
        async with running_gateway(opened) as (url, _, _):
            async with http.post(url + "/v2/transcript", json=body, headers=KEY) as r:
                assert r.status == 200

            async def called() -> bool:
                return len(rec.calls) == 1

            await wait_for(called)


# -- what is sent ---------------------------------------------------------------------------
async def test_redirects_are_not_followed() -> None:
    """The target answers 307 to another local port: the second server gets nothing (not the
    event, not the client's header), and the delivery ends (no retries)."""
    second = Receiver()
    async with receiver(second) as second_port:
        first = Receiver(307, f"http://127.0.0.1:{second_port}/internal")
        async with receiver(first) as first_port:
            job, vault = hooked_job(f"http://127.0.0.1:{first_port}/hook", X_Client_Auth="secret")
            registry = await deliver(config(webhook_allow=["127.0.0.1/32"]), job, vault)
    assert second.calls == []
    assert len(first.calls) == 1
    assert metric(registry, "aai_gateway_webhook_relays_total", outcome="redirected") == 1


async def test_only_the_clients_one_header_is_sent_and_never_a_framing_one() -> None:
    rec = Receiver()
    async with receiver(rec) as port:
        job, vault = hooked_job(f"http://127.0.0.1:{port}/hook", X_Client_Auth="secret")
        await deliver(config(webhook_allow=["127.0.0.1"]), job, vault)
        # A record made before the header rule, naming Host: not sent at all.
        job, vault = hooked_job(f"http://127.0.0.1:{port}/hook", Host="metadata.internal")
        registry = await deliver(config(webhook_allow=["127.0.0.1"]), job, vault)
        assert metric(registry, "aai_gateway_webhook_relays_total", outcome="blocked") == 1
    (call,) = rec.calls
    sent = {k.lower() for k in call["headers"]}
    assert call["headers"]["X-Client-Auth"] == "secret"
    assert sent <= {"x-client-auth", "content-type", "content-length", "host", "user-agent", "accept",
                    "accept-encoding"}  # fmt: skip


def test_public_means_global_with_embedded_ipv4_unwrapped() -> None:
    public = ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]
    private = [
        "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "239.255.255.250", "255.255.255.255", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1",
        "fec0::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a00:1",
        "2002:7f00:1::", "2002:a00:1::", "::127.0.0.1", "64:ff9b:1::1", "2001:db8::1",
    ]  # fmt: skip
    assert [a for a in public if not is_public(ipaddress.ip_address(a))] == []
    assert [a for a in private if is_public(ipaddress.ip_address(a))] == []
    allow = Policy(["10.0.0.0/8", "hooks.internal"])
    assert allow.address_allowed(ipaddress.ip_address("10.1.1.1"))
    assert allow.address_allowed(ipaddress.ip_address("::ffff:10.1.1.1"))
    assert not allow.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert allow.host_allowed("HOOKS.internal.") and not allow.host_allowed("x.hooks.internal")
