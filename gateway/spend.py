"""Monthly spend caps: new billable work stops before a project (or a key, or the account)
spends past what it may.

A cap is reached when the month's spend so far reaches it. The month's spend is:

- what the ledger recorded this UTC month (usage at the config's prices; ledger.py keeps the
  month's total per project or key, and the account's, as each event is recorded);
- plus what is admitted and not billed yet: each transcript holds ``transcripts.hold_audio_s``
  of audio at its model's and add-ons' prices from the moment it is made until it ends (its
  real duration is known only then; the hold is released in the same write that bills it),
  and each streaming session open on this instance counts the time it has been open.
  Sessions open on other instances count once they end.

Every instance reads the month's spend and holds every ``REFRESH_S`` (one store read) and
counts what it records itself at once, so a cap holds within what other instances admit in
that second (and requests checked in the same instant). When it is reached:

- new billable work (``POST /v2/transcript``, ``POST /v1/*``, ``GET /v3/token``, a new
  streaming session) gets 402 ``{"error": ...}`` naming the cap, before anything is sent or
  spent; reads (polls, lists, downloads) still work;
- streaming sessions open at that moment are warned and terminated (streaming_relay.py);
- a metric and a log line say so. The cap resets at the start of the UTC month.

Caps: ``projects[].monthly_spend_cap_usd`` (managed mode), ``spend_cap_usd`` (the account),
``key_monthly_spend_cap_usd`` (pass-through mode: each client key, by its fingerprint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from aiohttp import hdrs, web

from .admission.health import keep_reading
from .config import Config
from .errors import PaymentRequired
from .identity import Identity, identity_of
from .ledger import ACCOUNT, Ledger, Line, utc_month
from .metrics import Metrics

log = logging.getLogger(__name__)

REFRESH_S = 1.0


class Hit(NamedTuple):
    scope: str  # project | key | account
    who: str
    cap: float
    used: float

    def message(self) -> str:
        whose = {"project": f"project '{self.who}'", "key": "this key", "account": "the account"}[self.scope]
        return (
            f"Monthly spend cap of ${self.cap:,.2f} for {whose} reached (${self.used:,.2f} spent or held "
            "this month): new billable work is refused until the month ends or the cap is raised"
        )


class SpendGuard:
    def __init__(
        self,
        ledger: Ledger,
        config: Callable[[], Config],
        metrics: Metrics,
        *,
        wall: Callable[[], float] = time.time,
        runtime_cap: Callable[[str], float | None] = lambda project: None,
    ) -> None:
        """``runtime_cap``: the cap of a project made through the admin API (identity.KeyRing)."""
        self._ledger = ledger
        self._runtime_cap = runtime_cap
        self._config = config  # the running config: caps change on a reload
        self._metrics = metrics
        self._wall = wall
        self._spent: dict[str, float] = {}
        self._held: dict[str, float] = {}
        self._month = ""
        self._told: set[tuple[str, str, str]] = set()  # (month, scope, who) logged once
        self.open_spend: Callable[[], dict[str, float]] = dict  # this instance's open sessions
        self._noted: list[tuple[float, str, float]] = []  # (when, who, USD) since the last read

    def note(self, line: Line, usd: float) -> None:
        """Spend or holds this instance just recorded: counted at once, not a second later
        (a burst of requests must not all pass before the next read shows the first)."""
        if usd:
            self._noted.append((time.monotonic(), line.project or line.key, usd))

    async def refresh(self) -> None:
        month, asked = utc_month(self._wall()), time.monotonic()
        self._spent, self._held = await self._ledger.spend(month)
        self._month = month
        self._noted = [n for n in self._noted if n[0] >= asked]  # the rest is in what was read

    def _local(self) -> dict[str, float]:
        out = dict(self.open_spend())
        for _, who, usd in self._noted:
            for whose in (who, ACCOUNT):
                out[whose] = out.get(whose, 0.0) + usd
        return out

    async def run(self) -> None:
        await keep_reading("spend caps", self.refresh, REFRESH_S)

    def _caps(self, identity: Identity) -> list[tuple[str, str, float]]:
        cfg = self._config()
        out = []
        if identity.project is not None:
            listed = [p.monthly_spend_cap_usd for p in cfg.projects if p.name == identity.project]
            cap = listed[0] if listed else self._runtime_cap(identity.project)
            if cap is not None:
                out.append(("project", identity.project, cap))
        elif cfg.key_monthly_spend_cap_usd is not None:
            out.append(("key", identity.key, cfg.key_monthly_spend_cap_usd))
        if cfg.spend_cap_usd is not None:
            out.append(("account", ACCOUNT, cfg.spend_cap_usd))
        return out

    def over(self, identity: Identity | None) -> Hit | None:
        """The first cap ``identity`` has reached, or None."""
        if identity is None:
            return None
        caps = self._caps(identity)
        if not caps:
            return None
        live = self._local()
        for scope, who, cap in caps:
            used = self._spent.get(who, 0.0) + max(0.0, self._held.get(who, 0.0)) + live.get(who, 0.0)
            if used >= cap:
                return Hit(scope, who, cap, used)
        return None

    def check(self, identity: Identity | None) -> None:
        """PaymentRequired when a cap is reached: nothing is sent, nothing spent."""
        hit = self.over(identity)
        if hit is None:
            return
        self._metrics.spend_cap_refusals.labels(hit.scope).inc()
        if (self._month, hit.scope, hit.who) not in self._told:
            self._told.add((self._month, hit.scope, hit.who))
            log.warning("spend cap reached: %s", hit.message())
        raise PaymentRequired(hit.message())


def billable(request: web.BaseRequest) -> bool:
    """New work that upstream bills (or that opens a session it bills)."""
    path, method = request.path, request.method
    if method == hdrs.METH_POST:
        return path == "/v2/transcript" or path.startswith("/v1/")
    return method == hdrs.METH_GET and path in ("/v3/token", "/v3/ws")


def spend_middleware(guard: SpendGuard) -> Callable[..., Awaitable[web.StreamResponse]]:
    """After the identity middleware: new billable work of a caller past a cap is a 402."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if billable(request):
            guard.check(identity_of(request))
        return await handler(request)

    return middleware
