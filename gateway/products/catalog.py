"""The account's limits, built from the config: what each kind of request must take.

A reload (gateway/reload.py) rebuilds them in place (``Catalog.reload``): every component
holds this one catalog and reads its limits per request, so new admissions take the new
capacities at once. A limit's name is its store key, so a limit whose capacity or window
changes keeps its leases and its queue.

Names are store-key parts; labels are bounded metric labels. Per-model limits are made on
demand (any model a client names gets its own bucket, which expires when nobody uses it);
configured and known models are labelled by name, every other model as ``llm:other``.
"""

from __future__ import annotations

import dataclasses
import re

from ..admission.limits import (
    RANK_CONCURRENCY,
    RANK_MODEL,
    RANK_SESSIONS,
    RANK_WINDOW,
    Limit,
    check_classes,
    concurrency_limit,
    window_limit,
)
from ..config import Limits

# Models named in AssemblyAI's docs and specs: labelled by name in metrics.
KNOWN_MODELS = frozenset(
    {
        "claude-opus-4-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5-20251001",
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gpt-4.1",
        "gpt-oss-120b",
        "gpt-oss-20b",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
    }
)

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def valid_model_name(model: str) -> bool:
    return bool(_MODEL_NAME.match(model))


# An open session's lease, renewed while it runs: a dead instance's sessions free their
# slots within this long.
SESSION_LEASE_S = 120.0


class Catalog:
    def __init__(
        self, cfg: Limits, *, claim_lease_s: float = 60.0, max_open_sessions: int | None = None
    ) -> None:
        """``claim_lease_s``: how long a transcript's concurrency lease lasts until its
        upstream id is recorded (then it is renewed for the job's run)."""
        self._claim_lease_s = claim_lease_s
        self._build(cfg, max_open_sessions)

    def reload(self, cfg: Limits, *, max_open_sessions: int | None = None) -> None:
        """Take new limits, in place (no await: a request sees the old set or the new one,
        never a mix). ``OrderError`` (and nothing changed) if the new set is inconsistent."""
        fresh = Catalog(cfg, claim_lease_s=self._claim_lease_s, max_open_sessions=max_open_sessions)
        self.__dict__.update(fresh.__dict__)

    def current(self, limit: Limit) -> Limit:
        """This catalog's limit of the same name (its store keys), or ``limit`` itself when the
        catalog has none by that name any more (a waiter keeps waiting under it)."""
        for mine in (self.requests, self.understanding, self.streaming_sessions, self.async_jobs,
                     self.open_sessions):  # fmt: skip
            if mine is not None and mine.name == limit.name:
                return mine
        if limit.name.startswith("llm:"):
            return self.model(limit.name[len("llm:") :])
        return limit

    def _build(self, cfg: Limits, max_open_sessions: int | None) -> None:
        claim_lease_s = self._claim_lease_s
        self._cfg = cfg
        guard = cfg.guard_ms
        req = cfg.requests
        self.requests = window_limit(
            "requests", req.limit, req.window_s, _guard(req.guard_ms, guard), rank=RANK_WINDOW
        )
        llm = cfg.llm_requests
        self._llm_guard = _guard(llm.guard_ms, guard)
        und = llm.understanding
        self.understanding = window_limit(
            "llm-understanding", und.limit, und.window_s, _guard(und.guard_ms, guard), rank=RANK_MODEL
        )
        ss = cfg.streaming_sessions
        self.streaming_sessions = window_limit(
            "streaming", ss.limit, ss.window_s, _guard(ss.guard_ms, guard), rank=RANK_SESSIONS
        )
        self.async_jobs = concurrency_limit(
            "async", cfg.async_concurrency, claim_lease_s, rank=RANK_CONCURRENCY
        )
        # Optional: sessions open at once (a lease per session, released when it ends).
        self.open_sessions = (
            concurrency_limit("sessions-open", max_open_sessions, SESSION_LEASE_S, rank=RANK_CONCURRENCY)
            if max_open_sessions
            else None
        )
        self._models: dict[str, Limit] = {name: self._make_model(name) for name in llm.models}
        if cfg.shadow or req.shadow:
            self.requests = _shadowed(self.requests)
        if cfg.shadow or und.shadow or llm.shadow:
            self.understanding = _shadowed(self.understanding)
        if cfg.shadow or ss.shadow:
            self.streaming_sessions = _shadowed(self.streaming_sessions)
        if cfg.shadow:
            self.async_jobs = _shadowed(self.async_jobs)
            self.open_sessions = _shadowed(self.open_sessions) if self.open_sessions else None
        check_classes(self.classes())

    def _make_model(self, model: str) -> Limit:
        llm = self._cfg.llm_requests
        override = llm.models.get(model)
        capacity = override.limit if override else llm.limit
        window_s = (override.window_s if override and override.window_s else None) or llm.window_s
        label = f"llm:{model}" if (model in llm.models or model in KNOWN_MODELS) else "llm:other"
        name = f"llm:{model}"
        limit = window_limit(name, capacity, window_s, self._llm_guard, rank=RANK_MODEL, label=label)
        return _shadowed(limit) if self._cfg.shadow or llm.shadow else limit

    def model(self, model: str) -> Limit:
        """The per-model limit (call ``valid_model_name`` first)."""
        limit = self._models.get(model)
        if limit is None:
            limit = self._make_model(model)
            if model in KNOWN_MODELS:  # cache only a bounded set
                self._models[model] = limit
        return limit

    def account_window(self, group: str, method: str) -> list[Limit]:
        """The account window, when this route group and method count against it."""
        req = self._cfg.requests
        if group not in req.route_groups:
            return []
        if method.upper() in READ_METHODS and not req.count_reads:
            return []
        return [self.requests]

    def fixed_limits(self) -> list[Limit]:
        """Limits that always exist (sampled for the tokens-in-use gauge)."""
        out = [self.requests, self.streaming_sessions, self.async_jobs]
        if self._cfg.llm_available:
            out += [self.understanding, *self._models.values()]
        return out

    def classes(self) -> list[list[Limit]]:
        """Every request class the gateway builds, for the order check at start."""
        window = [self.requests]
        return [
            window,
            [self.model("any-model"), *window],
            *[[m, *window] for m in self._models.values()],
            [self.understanding, *window],
            [self.async_jobs, *window],
            self.session_limits(),
        ]

    def session_limits(self) -> list[Limit]:
        """What opening a streaming session takes."""
        opened = [self.open_sessions] if self.open_sessions else []
        return [*opened, self.streaming_sessions, *self.account_window("streaming", "GET")]


def _guard(override: int | None, default: int) -> int:
    return default if override is None else override


def _shadowed(limit: Limit) -> Limit:
    return dataclasses.replace(limit, shadow=True)
