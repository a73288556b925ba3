"""Webhooks: the client's own, delivered with the id it knows.

A client's ``webhook_url`` (and its custom auth header) never goes upstream. The gateway
keeps it with the job (the header's value encrypted) and, when the job ends, POSTs
``{"transcript_id": <the client's id>, "status": ...}`` to it, with its query string as the
client wrote it (``?customer_id=...``) and its auth header, under upstream's delivery rules:
2xx ends it, any 4xx ends it, anything else is retried (``webhook_attempts``, every
``webhook_retry_s``).

Where it may POST is egress.py's rule: public addresses only (checked on the address it
connects to), unless ``transcripts.webhook_allow`` opens a target. Redirects are not
followed: a 3xx ends the delivery (counted ``redirected``, not retried: the target is
misconfigured, and following it would let the target choose where the gateway posts). Only
Content-Type and the one auth header the client named are sent (plus aiohttp's own
User-Agent, Accept and Accept-Encoding).

With ``public_url`` configured, upstream's webhook goes to the gateway's receiver
(``/_aai/webhook/<job id>/<token>``, the token a keyed hash of the job id, checked in
constant time, so nobody else can end a lease), which ends the job at once and relays; the
receiver URL never shows (views carry the client's own ``webhook_url``). Without it, the
gateway relays when polls or the reconciler learn that the job ended.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from ...admission.health import stop_tasks
from ...config import Config
from ...errors import BadRequest
from ...logs import RECEIVER_PATH as RECEIVER_PATH  # the receiver's path (served here)
from ...metrics import Metrics
from ...vault import SecretError, Vault
from .egress import MAX_URL_CHARS, Blocked, GuardedResolver, Policy, Refused, check_auth_header
from .jobs import Job

log = logging.getLogger(__name__)

CLIENT_FIELDS = ("webhook_url", "webhook_auth_header_name", "webhook_auth_header_value")


def split_webhook(
    body: dict[str, Any], vault: Vault, policy: Policy
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The body without the client's webhook fields, and those fields (value encrypted).
    A webhook that could never be delivered is a 400 (BadRequest) now, not a silent loss."""
    rest = {k: v for k, v in body.items() if k not in CLIENT_FIELDS}
    url = body.get("webhook_url")
    if url is None or url == "":
        return rest, None
    name, value = body.get("webhook_auth_header_name"), body.get("webhook_auth_header_value")
    try:
        if not isinstance(url, str):
            raise Refused("webhook_url must be a string")
        policy.check_url(url)
        if name not in (None, ""):
            check_auth_header(name, value)
    except Refused as exc:
        raise BadRequest(str(exc)) from None
    hook: dict[str, Any] = {"url": url}
    if isinstance(name, str) and name and isinstance(value, str):
        hook.update(auth_header_name=name, auth_header_value=vault.encrypt(value))
    return rest, hook


def redacted_audio_event(job: Job, event: dict[str, Any]) -> dict[str, Any] | None:
    """Upstream's ``redacted_audio_ready`` event as relayed to the client: its id, the status
    and the redacted audio's https URL, nothing else the POST carried; None for anything
    that is not such an event for this job."""
    url, about = event.get("redacted_audio_url"), event.get("transcript_id")
    if event.get("status") != "redacted_audio_ready" or not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        return None
    if job.upstream_id and about != job.upstream_id:
        return None
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    if (
        parsed.scheme != "https"
        or not parsed.host
        or parsed.user is not None
        or any(c in url for c in "\r\n\0")
    ):
        return None
    return {"transcript_id": job.id, "status": "redacted_audio_ready", "redacted_audio_url": url}


def client_fields(job: Job) -> dict[str, Any]:
    """What views show for the webhook: the client's own URL and header name, never ours."""
    hook = job.extra.get("webhook") or {}
    return {
        "webhook_url": hook.get("url"),
        "webhook_auth": bool(hook.get("auth_header_name")),
        "webhook_auth_header_name": hook.get("auth_header_name"),
    }


def receiver_url(cfg: Config, job_id: str, vault: Vault) -> str | None:
    if not cfg.public_url:
        return None
    return f"{cfg.public_url}{RECEIVER_PATH}/{job_id}/{receiver_token(job_id, vault)}"


def receiver_token(job_id: str, vault: Vault) -> str:
    return vault.fingerprint(f"webhook:{job_id}")[:32]


class Relay:
    """Delivers ended jobs' events to their clients' webhooks (in the background)."""

    def __init__(
        self, cfg: Config, vault: Vault, metrics: Metrics, *, resolver: AbstractResolver | None = None
    ) -> None:
        self._t = cfg.transcripts
        self._vault = vault
        self._metrics = metrics
        self.policy = Policy(cfg.transcripts.webhook_allow)
        self._resolver = resolver  # the resolver under the guard (tests give their own)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy, self._resolver))
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._t.webhook_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # never through a proxy the environment names
        )

    async def close(self) -> None:
        await stop_tasks(*self._tasks)
        if self._session is not None:
            await self._session.close()

    def send(self, job: Job, payload: dict[str, Any]) -> None:
        hook = job.extra.get("webhook")
        if not hook or self._session is None:
            return
        task = asyncio.create_task(self._deliver(job.id, hook, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _target(self, job_id: str, hook: dict[str, Any]) -> tuple[URL, dict[str, str]]:
        """The URL and headers to POST, checked again (a job may predate the rules); Refused
        if the target is not allowed. A literal address is checked here (aiohttp does not
        resolve one); a name is checked on the addresses it resolves to, at connect time."""
        url = self.policy.check_url(str(hook.get("url") or ""))
        headers: dict[str, str] = {}
        name = hook.get("auth_header_name")
        if name:
            try:
                value = self._vault.decrypt(hook["auth_header_value"])
            except (SecretError, KeyError):
                log.error("job %s: the webhook's auth header does not decrypt; sent without it", job_id)
            else:
                check_auth_header(name, value)
                headers[name] = value
        return url, headers

    async def _deliver(self, job_id: str, hook: dict[str, Any], payload: dict[str, Any]) -> None:
        try:
            url, headers = self._target(job_id, hook)
        except Refused as exc:
            log.warning("job %s: webhook not sent: %s", job_id, exc)
            self._outcome("blocked")
            return
        assert self._session is not None
        for attempt in range(1, self._t.webhook_attempts + 1):
            status = 0
            try:
                async with self._session.post(
                    url, json=payload, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, Blocked):
                    log.warning("job %s: webhook not sent: %s", job_id, exc.os_error)
                    self._outcome("blocked")
                    return
                log.info("job %s: webhook attempt %d failed: %s", job_id, attempt, type(exc).__name__)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("job %s: webhook attempt %d failed: %s", job_id, attempt, type(exc).__name__)
            if 200 <= status < 300:
                self._outcome("delivered")
                return
            if 300 <= status < 400:
                log.warning("job %s: the webhook answered %d; redirects are not followed", job_id, status)
                self._outcome("redirected")
                return
            if 400 <= status < 500:
                self._outcome("refused")  # upstream's rule: a 4xx stops the retries
                return
            if attempt < self._t.webhook_attempts:
                await asyncio.sleep(self._t.webhook_retry_s)
        self._outcome("gave_up")

    def _outcome(self, outcome: str) -> None:
        self._metrics.child(self._metrics.webhook_relays, outcome).inc()
