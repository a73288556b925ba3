"""Prometheus metrics, bound to an injected CollectorRegistry.

Labels stay bounded: route group, limit (per-model limits are labelled with configured or
known model names, "llm:other" otherwise), outcome, reason, HTTP status, store verb. Never a
key, an id, an IP or a customer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .admission.limits import Limit
from .admission.store import LimitState

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        p = "aai_gateway_"
        self.requests = Counter(
            p + "requests_total",
            "Client requests by route group and outcome.",
            ["group", "outcome"],
            registry=registry,
        )
        self.admissions = Counter(
            p + "admissions_total", "Admissions, per limit taken.", ["limit"], registry=registry
        )
        self.refusals = Counter(
            p + "refusals_total",
            "Requests the gateway refused with 429, by the limit that refused and why (timeout, queue_full).",
            ["limit", "reason"],
            registry=registry,
        )
        self.wait = Histogram(
            p + "wait_seconds",
            "Time from arrival to admission.",
            ["group"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            p + "queue_depth",
            "Requests this instance holds waiting, by the limit they wait on.",
            ["limit"],
            registry=registry,
        )
        self.tokens_in_use = Gauge(
            p + "tokens_in_use",
            "Tokens out on each limit (account-wide), as last seen.",
            ["limit"],
            registry=registry,
        )
        self.tokens_capacity = Gauge(
            p + "tokens_capacity", "Capacity of each limit.", ["limit"], registry=registry
        )
        self.admission_to_send = Histogram(
            p + "admission_to_send_seconds",
            "Delay between admission and the request's headers leaving for upstream "
            "(must stay well inside the guard).",
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.upstream_latency = Histogram(
            p + "upstream_seconds",
            "Upstream time to response headers.",
            ["group"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_status = Counter(
            p + "upstream_responses_total",
            "Upstream responses by status.",
            ["group", "status"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            p + "upstream_429_retries_total",
            "Upstream 429s the gateway retried.",
            ["group"],
            registry=registry,
        )
        self.store_errors = Counter(
            p + "store_errors_total",
            "Store (Redis) calls that failed or timed out.",
            ["op"],
            registry=registry,
        )
        self.lapsed_total = Counter(
            p + "reservations_lapsed_total",
            "Waiting tickets whose deadline lapsed before their instance refreshed them.",
            registry=registry,
        )
        self.store_info = Gauge(
            p + "store_info", "Which store holds the limits (1 = in use).", ["kind"], registry=registry
        )

    # -- the engine's observer -------------------------------------------------------------
    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the lookup is a lock and a hash per call, and
        the request path makes several per request (label sets are bounded, so is the cache)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def admitted(
        self, limits: Sequence[Limit], states: Sequence[LimitState], waited_s: float, group: str
    ) -> None:
        for limit, state in zip(limits, states, strict=False):
            label = limit.metric_label
            self.child(self.admissions, label).inc()
            self.child(self.tokens_in_use, label).set(limit.capacity - state.remaining)
        self.child(self.wait, group or "other").observe(waited_s)

    def refused(self, limit: Limit, reason: str, group: str) -> None:
        self.refusals.labels(limit.metric_label, reason).inc()

    def waiting(self, limit: Limit, delta: int) -> None:
        self.queue_depth.labels(limit.metric_label).inc(delta)

    def lapsed(self) -> None:
        self.lapsed_total.inc()
