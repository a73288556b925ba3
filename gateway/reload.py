"""Hot reload: SIGHUP and ``POST /admin/v1/reload`` re-read the config the gateway started with.

All or nothing. The file is read and validated again (``load_config``, the same environment
overrides); an invalid one, or one that changes a key only a restart can apply, is refused
with the key's path and the reason, and the running config stays. Otherwise, in one step of
the event loop (no await: a request sees the old config or the new one, never a mix):

- the catalog's limits are rebuilt in place (products/catalog.py); a limit keeps its name,
  so its store keys: leases already taken stay counted, queued tickets keep their places;
- requests already waiting are moved onto the new limits (``AdmissionEngine.retune``), so a waiter
  queued under capacity 1 is admitted as soon as the capacity is raised to 2;
- queue, proxy, streaming and log settings apply from the next request on;
- the TLS certificate and key are read again (a renewed certificate needs no restart).

Every instance logs its config's hash at start and on each reload, and ``/readyz`` shows it:
``config_hash`` is the first 12 hex digits of the SHA-256 of the validated config as
canonical JSON (passwords masked), so two instances with the same hash run the same config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from .admin import require_admin
from .config import Config, ConfigError
from .errors import BadRequest
from .logs import FORMAT, JsonFormatter

log = logging.getLogger("gateway")

RELOAD_PATH = "/admin/v1/reload"

# Keys (and whole sections) that only a restart applies: the listener's socket, the store and
# its keys, the upstream clients, and what the transcript loops read once at start. A reload
# that changes one of them is refused as a whole (see ``Reloader.reload``).
RESTART_ONLY = (
    "listen.host",
    "listen.port",
    "redis",
    "account",
    "upstream",
    "public_url",
    "transcripts",
    "queue.ticket_ttl_ms",
    "log.access_log",
    "proxy.client_body_timeout_s",
    "proxy.client_body_min_rate",
    "streaming.max_buffered_bytes",
    "shutdown_grace_s",
    "admin",
)


class ReloadError(Exception):
    """The reload was refused and nothing changed; the message says why (key paths first)."""


@dataclass(frozen=True)
class Reloaded:
    config: Config
    hash: str
    previous: str
    changed: tuple[str, ...]  # leaf key paths whose value changed
    notes: tuple[str, ...]  # what else was done (the certificate re-read, waiters moved)


def masked(url: str) -> str:
    """A Redis URL fit for a log line: any password (in the userinfo or the query) is ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        pairs = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(pairs, safe="*"))
    return urlunsplit(parts)


def _public(config: Config) -> dict[str, Any]:
    """The config as plain JSON data, passwords masked."""
    data = config.model_dump(mode="json")
    redis = data["redis"]
    if redis.get("url"):
        redis["url"] = masked(redis["url"])
    if redis.get("sentinel") and redis["sentinel"].get("password") is not None:
        redis["sentinel"]["password"] = "***"
    return data


def config_hash(config: Config) -> str:
    """A stable name for a validated config: 12 hex digits of the SHA-256 of its canonical
    JSON (sorted keys, no spaces), passwords masked. Defaults count as written: a file that
    spells out a default and one that leaves it out hash the same."""
    canonical = json.dumps(_public(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def changed_keys(old: Config, new: Config) -> list[str]:
    """The leaf key paths whose value differs (``limits.requests.limit``), sorted."""
    a, b = _leaves(_public(old)), _leaves(_public(new))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def needs_restart(old: Config, new: Config, changed: list[str]) -> list[str]:
    """The changed keys a reload cannot apply (RESTART_ONLY, and turning TLS on or off)."""
    out = [k for k in changed if any(k == r or k.startswith(r + ".") for r in RESTART_ONLY)]
    if (old.listen.tls is None) != (new.listen.tls is None):
        out.append("listen.tls (turning TLS on or off)")
    if old.managed != new.managed:
        out.append("projects (turning managed mode on or off)")
    return out


def apply_logging(level: str, fmt: str) -> None:
    """The root logger's level and every handler's format (its redaction filter stays)."""
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))


class Reloader:
    """Holds the running config and its hash; ``reload()`` re-reads it through ``load`` and
    applies it through ``apply`` (app.py: the catalog, the components, the certificate),
    which returns notes for the log, or raises ``ReloadError`` BEFORE it changes anything
    (new limits that are inconsistent, TLS files that cannot be served)."""

    def __init__(
        self,
        config: Config,
        load: Callable[[], Config],
        apply: Callable[[Config], list[str]],
        *,
        count: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.config = config
        self.hash = config_hash(config)
        self._load = load
        self._apply = apply
        self._count = count  # "applied" or "refused", for the metric
        self.on_change: list[Callable[[Reloaded], None]] = []

    def reload(self) -> Reloaded:
        """Re-read, check and apply; ``ReloadError`` (nothing changed) if refused."""
        try:
            done = self._reload()
        except ReloadError:
            self._count("refused")
            raise
        self._count("applied")
        return done

    def _reload(self) -> Reloaded:
        try:
            new = self._load()
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        changed = changed_keys(self.config, new)
        restart = needs_restart(self.config, new, changed)
        if restart:
            raise ReloadError(
                "these keys need a restart, so nothing was reloaded: " + ", ".join(restart)
                + " (revert them to reload the rest, or restart the instance)"
            )  # fmt: skip
        notes = self._apply(new)
        previous, self.config, self.hash = self.hash, new, config_hash(new)
        done = Reloaded(new, self.hash, previous, tuple(changed), tuple(notes))
        for callback in self.on_change:
            callback(done)
        return done

    def reload_logged(self, source: str) -> Reloaded | None:
        """``reload()`` for SIGHUP: the outcome is a log line (an error line if refused)."""
        try:
            done = self.reload()
        except ReloadError as exc:
            log.error("config reload (%s) refused; still running config %s: %s", source, self.hash, exc)
            return None
        log_reloaded(done, source)
        return done


def log_reloaded(done: Reloaded, source: str) -> None:
    changed = ", ".join(done.changed) if done.changed else "nothing changed"
    extra = "; " + "; ".join(done.notes) if done.notes else ""
    log.info("config reloaded (%s): hash %s -> %s; %s%s", source, done.previous, done.hash, changed, extra)


def admin_reload(reloader: Reloader, token: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``POST /admin/v1/reload``: ``Authorization: Bearer <token>``, compared in constant time
    (SHA-256 digests, so not even the length leaks). Without a token the route answers 404,
    like any path the gateway does not serve: an admin surface nobody enabled does not exist.
    401 without a bearer token, 403 with a wrong one, 400 when the reload is refused (the old
    config stays), 200 with the new hash."""
    check = require_admin(token)

    async def handle(request: web.Request) -> web.Response:
        check(request)
        try:
            done = reloader.reload()
        except ReloadError as exc:
            log.error("config reload (admin) refused; still running config %s: %s", reloader.hash, exc)
            raise BadRequest(f"{exc} (still running config {reloader.hash})") from None
        log_reloaded(done, "admin")
        return web.json_response(
            {"status": "reloaded", "config_hash": done.hash, "previous_hash": done.previous,
             "changed": list(done.changed), "notes": list(done.notes)}
        )  # fmt: skip

    return handle
