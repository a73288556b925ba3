"""Webhooks: the client's own, delivered with the id it knows.

A client's ``webhook_url`` (and its custom auth header) never goes upstream. The gateway
keeps it with the job (the header's value encrypted) and, when the job ends, POSTs
``{"transcript_id": <the client's id>, "status": ...}`` to it, with its query string as the
client wrote it (``?customer_id=...``) and its auth header, under upstream's delivery rules:
2xx ends it, any 4xx ends it, anything else is retried (``webhook_attempts``, every
``webhook_retry_s``).

With ``public_url`` configured, upstream's webhook goes to the gateway's receiver
(``/_aai/webhook/<job id>/<token>``, the token a keyed hash of the job id, checked in
constant time, so nobody else can end a lease), which ends the job at once and relays; the
receiver URL never shows (views carry the client's own ``webhook_url``). Without it, the
gateway relays when polls or the reconciler learn that the job ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from ...config import Config
from ...metrics import Metrics
from ...vault import SecretError, Vault
from .jobs import Job

log = logging.getLogger(__name__)

CLIENT_FIELDS = ("webhook_url", "webhook_auth_header_name", "webhook_auth_header_value")
RECEIVER_PATH = "/_aai/webhook"


def split_webhook(body: dict[str, Any], vault: Vault) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The body without the client's webhook fields, and those fields (value encrypted)."""
    rest = {k: v for k, v in body.items() if k not in CLIENT_FIELDS}
    url = body.get("webhook_url")
    if not isinstance(url, str) or not url:
        return rest, None
    hook: dict[str, Any] = {"url": url}
    name, value = body.get("webhook_auth_header_name"), body.get("webhook_auth_header_value")
    if isinstance(name, str) and name and isinstance(value, str):
        hook.update(auth_header_name=name, auth_header_value=vault.encrypt(value))
    return rest, hook


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

    def __init__(self, cfg: Config, vault: Vault, metrics: Metrics) -> None:
        self._t = cfg.transcripts
        self._vault = vault
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._t.webhook_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    def send(self, job: Job, payload: dict[str, Any]) -> None:
        hook = job.extra.get("webhook")
        if not hook or self._session is None:
            return
        task = asyncio.create_task(self._deliver(job.id, hook, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, job_id: str, hook: dict[str, Any], payload: dict[str, Any]) -> None:
        headers: dict[str, str] = {}
        if hook.get("auth_header_name"):
            try:
                headers[hook["auth_header_name"]] = self._vault.decrypt(hook["auth_header_value"])
            except SecretError:
                log.error("job %s: the webhook's auth header does not decrypt; sent without it", job_id)
        assert self._session is not None
        for attempt in range(1, self._t.webhook_attempts + 1):
            status = 0
            try:
                async with self._session.post(hook["url"], json=payload, headers=headers) as resp:
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.info("job %s: webhook attempt %d failed: %s", job_id, attempt, type(exc).__name__)
            if 200 <= status < 300:
                self._outcome("delivered")
                return
            if 400 <= status < 500:
                self._outcome("refused")  # upstream's rule: a 4xx stops the retries
                return
            if attempt < self._t.webhook_attempts:
                await asyncio.sleep(self._t.webhook_retry_s)
        self._outcome("gave_up")

    def _outcome(self, outcome: str) -> None:
        self._metrics.child(self._metrics.webhook_relays, outcome).inc()
