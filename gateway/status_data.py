"""The numbers the status page (status_page.py, ``GET /admin/``) shows: each fixed limit's use
sampled over the last hour (``UseHistory``, a ring buffer in this process) and every other
number gathered in one function (``gather``) from what this gateway already has (store,
engine, job store, ledger, config): nothing is asked of upstream. A part that cannot be read
is named in ``Status.problems``; the page shows the rest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import deque
from typing import NamedTuple

from .admission.engine import AdmissionEngine
from .admission.store import Store
from .clock import Clock
from .config import Config
from .errors import StoreUnavailable
from .ledger import Ledger, Row
from .products.catalog import Catalog
from .products.transcripts.service import Transcripts
from .report import report

SAMPLE_EVERY_S = 10.0
HISTORY_S = 3600.0
DAYS = 30  # the daily chart's span


# -- the sampler ---------------------------------------------------------------------------
class Sample(NamedTuple):
    at: float  # the clock's seconds (monotonic)
    out: int  # tokens out (leases held)
    waiting: int  # tickets waiting on the limit (the store's count: every instance's)


class UseHistory:
    """Each fixed limit's use, sampled every ``every_s`` for the last ``keep_s``, kept in this
    process only (a restart starts a new hour: cheap, and the metrics keep the long view).
    ``run`` is the loop lifecycle.py supervises; ``sample`` takes one reading (tests call it)."""

    def __init__(
        self, store: Store, catalog: Catalog, clock: Clock, *,
        every_s: float = SAMPLE_EVERY_S, keep_s: float = HISTORY_S,
    ) -> None:  # fmt: skip
        self._store, self._catalog, self._clock = store, catalog, clock
        self.every_s, self.keep_s = every_s, keep_s
        self._size = int(keep_s // every_s) + 1
        self._series: dict[str, deque[Sample]] = {}

    async def sample(self) -> None:
        """One reading of every fixed limit; a store that does not answer leaves a gap."""
        now = self._clock.now()
        for limit in self._catalog.fixed_limits():
            try:
                out, waiting = await self._store.usage(limit)
            except StoreUnavailable:
                return
            series = self._series.setdefault(limit.name, deque(maxlen=self._size))
            series.append(Sample(now, out, waiting))

    async def run(self) -> None:
        while True:
            await self.sample()
            await self._clock.sleep(self.every_s)

    def series(self, name: str) -> list[Sample]:
        """The limit's samples of the last ``keep_s``, oldest first."""
        since = self._clock.now() - self.keep_s
        return [s for s in self._series.get(name, ()) if s.at >= since]

    def now(self) -> float:
        return self._clock.now()


# -- what the page shows: gathered in one place --------------------------------------------
@dataclasses.dataclass
class LimitView:
    name: str
    kind: str
    capacity: int
    window_s: float
    shadow: bool
    out: int | None  # None: the store did not answer
    waiting: int | None  # every instance's waiting tickets (the store's count)
    waiting_here: int  # requests this instance holds waiting on it
    history: list[Sample]


@dataclasses.dataclass
class Spend:
    name: str  # a project (managed mode), or a client key's fingerprint (pass-through)
    cost_usd: float
    cap_usd: float | None
    unpriced: int


@dataclasses.dataclass
class Status:
    instance: str
    store_kind: str
    managed: bool
    today: str
    month: str
    clock_now: float
    keep_s: float
    limits: list[LimitView]
    waiting_by_owner: dict[str, dict[str, int]]  # this instance's waiters: owner -> limit -> n
    jobs: dict[str, int] | None
    dispatch_paused: str
    spend: list[Spend]
    account: Spend
    days: list[str]
    cost_by_product: dict[str, list[float]]
    hours_by_product: dict[str, list[float]]
    unpriced_models: list[str]
    prices_taken: str
    problems: list[str]  # what could not be read, and why


def owner_name(owner: str) -> str:
    """An owner id as a person reads it: a project's name, a key's fingerprint prefix."""
    if owner.startswith("project:"):
        return owner.removeprefix("project:")
    if not owner:
        return "(no owner share)"
    return f"key {owner[:16]}"


async def gather(
    *,
    ledger: Ledger,
    config: Config,
    store: Store,
    catalog: Catalog,
    engine: AdmissionEngine,
    transcripts: Transcripts,
    history: UseHistory,
    today: dt.date,
) -> Status:
    """Every number the page shows. A part that cannot be read (Redis away) is named in
    ``problems`` and left empty; the rest of the page is still shown."""
    problems: list[str] = []
    here = engine.waiting()
    limits: list[LimitView] = []
    for limit in catalog.fixed_limits():
        out: int | None
        waiting: int | None
        try:
            out, waiting = await store.usage(limit)
        except StoreUnavailable as exc:
            out = waiting = None
            if not problems:
                problems.append(f"limits' use: the store did not answer ({exc.detail})")
        limits.append(
            LimitView(
                name=limit.name, kind=limit.kind.value, capacity=limit.capacity,
                window_s=limit.window_ms / 1000, shadow=limit.shadow, out=out, waiting=waiting,
                waiting_here=sum(here.get(limit.name, {}).values()), history=history.series(limit.name),
            )
        )  # fmt: skip
    by_owner: dict[str, dict[str, int]] = {}
    for name, owners in here.items():
        for owner, n in owners.items():
            by_owner.setdefault(owner_name(owner), {})[name] = n

    jobs: dict[str, int] | None = None
    try:
        jobs = await transcripts.jobs.counts()
    except StoreUnavailable as exc:
        problems.append(f"transcript jobs: the store did not answer ({exc.detail})")
    paused = transcripts.dispatcher.pause_reason if transcripts.dispatcher.paused else ""

    first_of_month = today.replace(day=1)
    first_day = today - dt.timedelta(days=DAYS - 1)
    days = [(first_day + dt.timedelta(days=n)).isoformat() for n in range(DAYS)]
    rows: list[Row] = []
    try:
        rows = await ledger.rows(min(first_of_month, first_day).isoformat(), today.isoformat())
    except StoreUnavailable as exc:
        problems.append(f"usage and spend: the ledger did not answer ({exc.detail})")

    month = [r for r in rows if r.day >= first_of_month.isoformat()]
    if config.managed:
        spent = report(month, ["project"], config.pricing)
        caps: dict[str, float | None] = {p.name: p.monthly_spend_cap_usd for p in config.projects}
        names = {row["project"]: row for row in spent["rows"]}
        default_cap = None
    else:
        spent = report(month, ["key"], config.pricing)
        caps = {}
        names = {row["key"]: row for row in spent["rows"]}
        default_cap = config.key_monthly_spend_cap_usd
    spend = [
        Spend(name, names[name]["cost_usd"] if name in names else 0.0, caps.get(name, default_cap),
              names[name]["unpriced"] if name in names else 0)
        for name in sorted(set(caps) | set(names))
    ]  # fmt: skip
    totals = spent["totals"]
    account = Spend("account", totals["cost_usd"], config.spend_cap_usd, totals["unpriced"])

    daily = report([r for r in rows if r.day >= days[0]], ["day", "product"], config.pricing)
    cost: dict[str, list[float]] = {}
    hours: dict[str, list[float]] = {}
    index = {day: i for i, day in enumerate(days)}
    for row in daily["rows"]:
        i = index.get(row["day"])
        if i is None:
            continue
        cost.setdefault(row["product"], [0.0] * DAYS)[i] += row["cost_usd"]
        hours.setdefault(row["product"], [0.0] * DAYS)[i] += row["audio_seconds"] / 3600

    return Status(
        instance=engine.instance, store_kind=store.kind, managed=config.managed,
        today=today.isoformat(), month=first_of_month.strftime("%Y-%m"), clock_now=history.now(),
        keep_s=history.keep_s, limits=limits, waiting_by_owner=by_owner, jobs=jobs,
        dispatch_paused=paused, spend=spend, account=account, days=days, cost_by_product=cost,
        hours_by_product=hours, unpriced_models=sorted(set(spent["unpriced_models"]) |
                                                       set(daily["unpriced_models"])),
        prices_taken=config.pricing.taken, problems=problems,
    )  # fmt: skip
