"""The config's sections, each a frozen model that rejects unknown keys: where the gateway
listens and what it forwards to, the projects and their keys, Redis, the queue, the proxy,
transcripts, streaming and logging. The account's limits are limits.py's, prices prices.py's,
and the whole file (these together) model.py's ``Config``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tls(_Model):
    # PEM files; read at start and again on every reload (a renewed certificate needs no restart).
    cert_file: str
    key_file: str


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # With tls set, the one port serves https and wss only.
    tls: Tls | None = None


class Upstream(_Model):
    api_url: str = "https://api.assemblyai.com"
    streaming_url: str = "wss://streaming.assemblyai.com"
    llm_url: str = "https://llm-gateway.assemblyai.com"
    connect_timeout_s: float = Field(10.0, gt=0)
    # Longest silence while reading a response (LLM generations, large downloads).
    read_timeout_s: float = Field(300.0, gt=0)
    # Managed mode (``projects`` set): the environment variable holding the account's key,
    # which the gateway puts on every upstream call (clients never see it).
    api_key_env: str = "AAI_GATEWAY_UPSTREAM_KEY"

    @field_validator("api_url", "llm_url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("streaming_url")
    @classmethod
    def _ws(cls, v: str) -> str:
        if not v.startswith(("ws://", "wss://")):
            raise ValueError("must start with ws:// or wss://")
        return v.rstrip("/")


_NAME = re.compile(r"[a-z0-9-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ProjectKey(_Model):
    name: str = Field(min_length=1, max_length=100)
    sha256: str  # hex SHA-256 of the key's UTF-8 bytes: the key itself is never written down

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.isprintable() or "|" in v or "/" in v:
            raise ValueError("must be printable, without '|' or '/'")
        return v

    @field_validator("sha256")
    @classmethod
    def _hash(cls, v: str) -> str:
        v = v.lower()
        if not _SHA256.fullmatch(v):
            raise ValueError("must be the 64 hex digits of the key's SHA-256 (`aai-gateway keys new`)")
        return v


class Project(_Model):
    name: str
    keys: tuple[ProjectKey, ...] = ()
    # New billable work of this project gets 402 once its spend this UTC month (recorded, plus
    # what is admitted and not billed yet) reaches this. None: no cap of its own.
    monthly_spend_cap_usd: float | None = Field(None, ge=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v) or len(v) > 63:
            raise ValueError("must be lowercase letters, digits and '-' ([a-z0-9-]+, at most 63)")
        return v

    @model_validator(mode="after")
    def _unique_keys(self) -> Project:
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ValueError(f"key names must be unique within the project: {names}")
        return self


class Admin(_Model):
    # The admin API's bearer token (reload, keys, projects) comes from this variable; unset:
    # the admin API does not exist (404).
    token_env: str = "AAI_GATEWAY_ADMIN_TOKEN"


class Sentinel(_Model):
    hosts: tuple[str, ...] = Field(min_length=1)  # "host:port" of each sentinel
    service_name: str = "mymaster"
    password: str | None = None  # the sentinels' own password (the primary's is in url)

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            host, _, port = item.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{item!r} is not host:port")
        return v


class RedisSettings(_Model):
    url: str | None = None
    # true: url names any node of a Redis Cluster; the client discovers the rest.
    cluster: bool = False
    # The primary found through Sentinel (and followed through a failover); url then gives
    # only the database, user and password.
    sentinel: Sentinel | None = None
    timeout_ms: int = Field(250, gt=0)
    connect_timeout_ms: int = Field(500, gt=0)
    pool_size: int = Field(64, gt=0)
    # When Redis stops answering: fail_open admits locally within this instance's share of
    # every limit (capacity / live instances) until it returns; fail_closed answers 503.
    on_outage: Literal["fail_open", "fail_closed"] = "fail_open"
    # Publish wake-ups with SPUBLISH (sharded pub/sub, Redis 7+); None: on with cluster.
    sharded_pubsub: bool | None = None
    key_prefix: str = "aai"

    @model_validator(mode="after")
    def _topology(self) -> RedisSettings:
        if self.cluster and self.sentinel is not None:
            raise ValueError("cluster and sentinel are two topologies: set one")
        if self.cluster and self.url is not None and urlsplit(self.url).path.strip("/") not in ("", "0"):
            raise ValueError("a Redis Cluster has only database 0: end url with /0 or no database")
        if (self.cluster or self.sentinel is not None) and self.url is None:
            raise ValueError("url is required with cluster or sentinel (with sentinel it gives the "
                             "database, user and password; its host is the service's primary)")  # fmt: skip
        return self

    @property
    def sharded(self) -> bool:
        return self.cluster if self.sharded_pubsub is None else self.sharded_pubsub

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class Queue(_Model):
    max_wait_s: float = Field(25.0, gt=0)
    # LLM chat waits less: the SDK's 30 s timeout covers the wait AND the generation.
    llm_max_wait_s: float = Field(10.0, gt=0)
    max_depth: int = Field(10_000, gt=0)
    # One API key's share of max_depth (later: one project's), so one client filling the
    # queue does not turn every other client away with queue_full. None: a quarter of it.
    max_depth_per_key: int | None = Field(None, gt=0)
    # How long a waiting ticket lives without being refreshed by its instance.
    ticket_ttl_ms: int = Field(4000, ge=500)

    @model_validator(mode="after")
    def _share(self) -> Queue:
        if self.max_depth_per_key is not None and self.max_depth_per_key > self.max_depth:
            raise ValueError(f"max_depth_per_key ({self.max_depth_per_key}) is above max_depth")
        return self

    @property
    def depth_per_key(self) -> int:
        """How many of one key's requests may wait at once, account-wide."""
        return self.max_depth_per_key or max(1, self.max_depth // 4)


class Proxy(_Model):
    # Cap on JSON bodies the gateway must read (the chat body, to learn the model).
    max_json_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    # Honour X-Forwarded-Proto/Host when rewriting URLs (only behind a trusted proxy).
    trust_forwarded_headers: bool = False
    # Retry an upstream 429 after its Retry-After, within the request's max wait.
    retry_upstream_429: bool = True
    max_upstream_retries: int = Field(3, ge=0)
    # A client's request body must keep coming (Apache's mod_reqtimeout, body=...,MinRate=...):
    # it may take client_body_timeout_s plus one second per client_body_min_rate bytes
    # received; a trickle slower than that is cut (408) and nothing of it is charged.
    client_body_timeout_s: float = Field(30.0, gt=0)
    client_body_min_rate: int = Field(500, ge=0)


class Transcripts(_Model):
    # Embedded store only: where the job database (sqlite) and its secret key file live.
    data_dir: str = "./aai-gateway-data"
    # Job records and id maps are kept this long after a job ends (upstream lists 90 days).
    retention_days: float = Field(90, gt=0)
    # Spend caps: a transcript's duration is known only once it completes, so until then it
    # holds this much audio at its model's (and add-ons') price against its project's cap.
    hold_audio_s: float = Field(3600, ge=0)
    # A queued or processing job is refreshed from upstream at most this often, whatever
    # its clients poll; the SDK polls every 3 s.
    poll_refresh_s: float = Field(10.0, gt=0)
    # How long a dispatcher owns a job it is submitting before others may reconcile it.
    claim_s: float = Field(30.0, ge=1)
    # Last resort: a running job's concurrency lease ends after this unless renewed.
    lease_ttl_s: float = Field(4 * 3600.0, gt=0)
    # A job queued in the gateway longer than this ends in error.
    max_queue_age_s: float = Field(24 * 3600.0, gt=0)
    # A running job nobody has heard of for this long is looked up upstream by the reconciler.
    reconcile_after_s: float = Field(60.0, gt=0)
    # Honour X-AAI-Gateway-Priority (0-99, higher first); only behind trusted clients.
    trust_priority_header: bool = False
    # After upstream reports a negative balance, dispatching pauses this long, then retries.
    balance_retry_s: float = Field(30.0, gt=0)
    # With public_url set, upstream's webhooks tell the gateway when a job ends, so running
    # jobs are refreshed from upstream far less often.
    poll_refresh_with_webhooks_s: float = Field(60.0, gt=0)
    # Delivery to the client's webhook: upstream's rules (2xx or 4xx end it, else retry).
    webhook_attempts: int = Field(10, ge=1)
    webhook_retry_s: float = Field(10.0, ge=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    # Client webhooks go to public addresses only; these CIDRs or host names open internal
    # targets deliberately (e.g. ["10.0.0.0/8", "hooks.internal"]).
    webhook_allow: tuple[str, ...] = ()

    @field_validator("webhook_allow")
    @classmethod
    def _allow(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                if not _HOSTNAME.fullmatch(item):
                    raise ValueError(f"{item!r} is neither a CIDR nor a host name") from None
        return v

    # A transcript request is a few KB; a larger body is refused (413), never stored.
    max_request_bytes: int = Field(64 * 1024, gt=0)


class Streaming(_Model):
    # A new session waits this long for admission; then Error + close 3009 naming the limit.
    max_wait_s: float = Field(60.0, gt=0)
    # What the client sends while its session waits is kept, up to this much.
    buffer_bytes: int = Field(4 * 1024 * 1024, ge=0)
    # Once admitted: replay the kept messages with their original spacing, or drop them.
    backlog: Literal["replay", "drop"] = "replay"
    # No audio from the client for this long: the gateway terminates the session.
    idle_timeout_s: float = Field(30.0, gt=0)
    # Sessions end here, below upstream's 3-hour cap; the client is warned warn_before_s ahead.
    max_duration_s: float = Field(10_500.0, gt=0, le=10_800)
    warn_before_s: float = Field(60.0, ge=0)
    # Asked of upstream unless the client chose one, so a session the gateway loses stops soon.
    inactivity_timeout_s: int = Field(60, ge=5, le=3600)
    # After sending Terminate, how long to wait for upstream's Termination.
    terminate_wait_s: float = Field(3.0, gt=0)
    # WebSocket pings both ways, to find dead TCP connections.
    ping_interval_s: float = Field(10.0, gt=0)
    # Optionally also cap the sessions open at once (a concurrency limit on the same engine).
    max_open_sessions: int | None = Field(None, gt=0)
    # Caps across all sessions of this instance: sessions waiting for admission (more are
    # refused with 3009 at once), and bytes held for them (kept backlogs, unfinished frames).
    max_waiting_sessions: int = Field(1000, gt=0)
    max_buffered_bytes: int = Field(256 * 1024 * 1024, gt=0)


class Log(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    # text: one readable line per event; json: one JSON object per line (for log shippers).
    format: Literal["text", "json"] = "text"

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v
