"""Prometheus metrics, bound to an injected CollectorRegistry.

Labels stay bounded: route group, limit (per-model limits are labelled with configured or
known model names, "llm:other" otherwise), outcome, reason, HTTP status, store verb. Never a
key, an id, an IP or a customer.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .admission import health
from .admission.limits import Limit
from .admission.store import LimitState

WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopMetric:
    """A metric updated only from the event loop's thread, so without locks.

    prometheus_client's own metrics take a lock on every update, and the request path makes
    several updates per request (~2 µs each, measured in bench/); these take a fraction of
    that. Scrapes run on the same loop, so they read consistent values. The API is the
    familiar one: ``.labels(...).inc()``, ``.set()``, ``.observe()``.
    """

    def __init__(self, kind: str, name: str, doc: str, labelnames: Sequence[str] = (), *,
                 buckets: tuple[float, ...] = ()) -> None:  # fmt: skip
        self.kind, self.name, self.doc, self.labelnames, self.buckets = (
            kind,
            name,
            doc,
            tuple(labelnames),
            buckets,
        )
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self.children[values] = _Buckets(self.buckets) if self.kind == "histogram" else _Value()
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def family(self) -> Metric:
        names = list(self.labelnames)
        if self.kind == "histogram":
            hist = HistogramMetricFamily(self.name, self.doc, labels=names)
            for values, b in self.children.items():
                cumulative, running = [], 0
                for bound, count in zip((*self.bounds_text(), "+Inf"), b.counts, strict=True):
                    running += count
                    cumulative.append((bound, running))
                hist.add_metric(list(values), cumulative, b.sum)
            return hist
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        fam = cls(self.name, self.doc, labels=names)
        for values, v in self.children.items():
            fam.add_metric(list(values), v.value)
        return fam

    def bounds_text(self) -> list[str]:
        return [repr(float(b)) for b in self.buckets]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._all: list[LoopMetric] = []
        p = "aai_gateway_"
        self.requests = self._make(
            "counter",
            p + "requests_total",
            "Client requests by route group and outcome.",
            ["group", "outcome"],
        )
        self.admissions = self._make(
            "counter", p + "admissions_total", "Admissions, per limit taken.", ["limit"]
        )
        self.refusals = self._make(
            "counter",
            p + "refusals_total",
            "Requests the gateway refused with 429, by the limit that refused and why (timeout, queue_full).",
            ["limit", "reason"],
        )
        self.wait = self._make(
            "histogram",
            p + "wait_seconds",
            "Time from arrival to admission.",
            ["group"],
            buckets=WAIT_BUCKETS,
        )
        self.queue_depth = self._make(
            "gauge",
            p + "queue_depth",
            "Requests this instance holds waiting, by the limit they wait on.",
            ["limit"],
        )
        self.tokens_in_use = self._make(
            "gauge",
            p + "tokens_in_use",
            "Tokens out on each limit (account-wide), as last seen.",
            ["limit"],
        )
        self.tokens_capacity = self._make(
            "gauge", p + "tokens_capacity", "Capacity of each limit.", ["limit"]
        )
        self.admission_to_send = self._make(
            "histogram",
            p + "admission_to_send_seconds",
            "Delay between admission and the request's headers leaving for upstream "
            "(must stay well inside the guard).",
            buckets=FAST_BUCKETS,
        )
        self.upstream_latency = self._make(
            "histogram",
            p + "upstream_seconds",
            "Upstream time to response headers.",
            ["group"],
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_status = self._make(
            "counter",
            p + "upstream_responses_total",
            "Upstream responses by status.",
            ["group", "status"],
        )
        self.upstream_retries = self._make(
            "counter",
            p + "upstream_429_retries_total",
            "Upstream 429s the gateway retried.",
            ["group"],
        )
        self.upstream_resent = self._make(
            "counter",
            p + "upstream_resent_total",
            "Safe requests (GET, HEAD, OPTIONS) sent again on a new connection: the reused one "
            "failed before any byte of an answer (upstream closed it idle as it was written).",
            ["group"],
        )
        self.store_calls = self._make(
            "counter", p + "store_calls_total", "Round trips to the store (Redis), by operation.", ["op"]
        )
        self.store_errors = self._make(
            "counter",
            p + "store_errors_total",
            "Store (Redis) calls that failed or timed out.",
            ["op"],
        )
        self.lapsed_total = self._make(
            "counter",
            p + "reservations_lapsed_total",
            "Waiting tickets whose deadline lapsed before their instance refreshed them.",
        )
        self.store_info = self._make(
            "gauge", p + "store_info", "Which store holds the limits (1 = in use).", ["kind"]
        )

        # -- the engine's observer -------------------------------------------------------------
        # Pre-recorded transcription (products/transcripts).
        self.jobs_created = self._make("counter", p + "jobs_created_total", "Transcript jobs created.")
        self.jobs_ended = self._make(
            "counter", p + "jobs_ended_total", "Transcript jobs ended, by final status.", ["status"]
        )
        self.jobs_queued = self._make(
            "gauge", p + "jobs_queued", "Jobs waiting in the gateway's queue (account-wide)."
        )
        self.jobs_running = self._make(
            "gauge", p + "jobs_running", "Jobs submitted and not yet ended (account-wide)."
        )
        self.job_queue_wait = self._make(
            "histogram", p + "job_queue_wait_seconds", "Time a job waited in the gateway before submission.",
            buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 14400),
        )  # fmt: skip
        self.job_duration = self._make(
            "histogram", p + "job_duration_seconds", "Creation to end of a job (queue wait and processing).",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400),
        )  # fmt: skip
        self.job_polls = self._make("counter", p + "job_polls_total", "Client GETs of a gateway job.")
        self.job_refreshes = self._make(
            "counter", p + "job_refreshes_total", "Upstream GETs the gateway made to refresh a job."
        )
        self.reconciler_polls = self._make(
            "counter",
            p + "reconciler_polls_total",
            "Jobs the reconciler looked up upstream, by outcome.",
            ["outcome"],
        )
        self.dispatch_unknown = self._make(
            "counter",
            p + "dispatch_unknown_total",
            "Job POSTs whose outcome upstream left unknown (a timeout, a lost connection, a 5xx): "
            "kept claimed, settled by a search upstream instead of a resubmission.",
            ["cause"],
        )
        self.webhook_relays = self._make(
            "counter", p + "webhook_relays_total", "Webhook deliveries to clients, by outcome.", ["outcome"]
        )
        self.dispatch_paused = self._make(
            "gauge",
            p + "dispatch_paused",
            "1 while dispatching is paused (upstream reported a negative balance).",
        )
        # Streaming (products/streaming_relay).
        self.sessions_open = self._make(
            "gauge", p + "sessions_open", "Streaming sessions open on this instance."
        )
        self.sessions_waiting = self._make(
            "gauge", p + "sessions_waiting", "Streaming sessions accepted and waiting for admission."
        )
        self.sessions_admitted = self._make(
            "counter", p + "sessions_admitted_total", "Upstream streaming sessions opened."
        )
        self.session_wait = self._make(
            "histogram",
            p + "session_wait_seconds",
            "Time a session waited for admission.",
            buckets=WAIT_BUCKETS,
        )
        self.usage = self._make(
            "counter",
            p + "usage_total",
            "Usage recorded in the ledger, by project (empty: pass-through), product and metric "
            "(audio_seconds, session_seconds, input_tokens, output_tokens, ...).",
            ["project", "product", "metric"],
        )
        self.spend = self._make(
            "counter",
            p + "spend_usd_total",
            "Spend recorded in the ledger (usage at the config's prices), by project (empty: "
            "pass-through) and product.",
            ["project", "product"],
        )
        self.spend_cap_refusals = self._make(
            "counter",
            p + "spend_cap_refusals_total",
            "New billable work refused (402) because a monthly spend cap was reached, by the cap's "
            "scope (project, account, key).",
            ["scope"],
        )
        self.spend_cap_sessions_ended = self._make(
            "counter",
            p + "spend_cap_sessions_ended_total",
            "Streaming sessions warned and terminated because their project's (or the account's) "
            "spend cap was reached while they were open.",
            [],
        )
        self.usage_customers_folded = self._make(
            "counter",
            p + "usage_customers_folded_total",
            "Usage events whose customer was counted as 'other': the project's distinct customers "
            "that day reached the ledger's cap.",
            ["project"],
        )
        self.sessions_ended = self._make(
            "counter", p + "sessions_ended_total", "Streaming sessions ended, by reason.", ["reason"]
        )
        self.session_frames = self._make(
            "counter", p + "session_frames_total", "Frames relayed, by kind.", ["kind"]
        )
        self.session_bytes = self._make(
            "counter", p + "session_audio_bytes_total", "Audio bytes relayed upstream."
        )
        # Background tasks (admission/health.py): liveness and restarts, lease restorations refused.
        self.background_alive = self._make(
            "gauge", p + "background_alive", "1 while a background task runs, 0 after it died.", ["task"]
        )
        self.background_restarts = self._make(
            "counter", p + "background_restarts_total", "Background tasks restarted after dying.", ["task"]
        )
        self.leases_restored_over = self._make(
            "counter",
            p + "leases_restored_over_total",
            "Lost leases of running work restored beyond the limit's capacity (the account runs over).",
            ["limit"],
        )
        # Hot reload (gateway/reload.py) and graceful shutdown.
        self.config_info = self._make(
            "gauge", p + "config_info", "1, labelled with the hash of the config running.", ["hash"]
        )
        self.config_reloads = self._make(
            "counter", p + "config_reloads_total", "Config reloads, by outcome.", ["outcome"]
        )
        self.draining = self._make(
            "gauge", p + "draining", "1 once this instance received SIGTERM and is shutting down."
        )
        # Shadow mode (limits.shadow): what the gateway would have decided, enforced or not.
        self.shadow_decisions = self._make(
            "counter",
            p + "shadow_decisions_total",
            "Decisions on limits in shadow mode: admitted, would_wait, would_refuse (forwarded at once "
            "all the same), unknown (the store did not answer).",
            ["limit", "decision"],
        )
        # Through a Redis outage (redis.on_outage: fail_open; admission/fallback.py).
        self.store_degraded = self._make(
            "gauge",
            p + "store_degraded",
            "1 while Redis is unreachable and this instance admits locally within its share.",
        )
        self.store_outage_seconds = self._make(
            "gauge", p + "store_outage_seconds", "How long the current (or the last) Redis outage lasted."
        )
        self.store_outages = self._make(
            "gauge", p + "store_outages", "Redis outages this instance lived through since it started."
        )
        self.store_instances = self._make(
            "gauge", p + "store_instances", "Live gateway instances (heartbeats): a limit's share is 1/N."
        )
        # Read at each scrape (set by app.py): the outage gauges are never a sample behind.
        self.on_collect: list[Callable[[], None]] = []
        registry.register(self)

    def running_config(self, config_hash: str) -> None:
        """aai_gateway_config_info{hash=...} 1, for the one config running (one label set)."""
        self.config_info.children.clear()
        self.config_info.labels(config_hash).set(1)

    def _make(self, kind: str, name: str, doc: str, labelnames: Sequence[str] = (), *,
              buckets: tuple[float, ...] = ()) -> LoopMetric:  # fmt: skip
        if name.endswith("_total"):
            name = name[: -len("_total")]  # the exposition adds it back for counters
        metric = LoopMetric(kind, name, doc, labelnames, buckets=buckets)
        if not labelnames:
            metric.labels()  # exported from the start, at zero
        self._all.append(metric)
        return metric

    def collect(self) -> Iterator[Metric]:
        for update in self.on_collect:
            update()
        for task, restarts in health.RESTARTS.items():
            self.background_alive.labels(task).set(1 if health.ALIVE.get(task, 0) > 0 else 0)
            self.background_restarts.labels(task).set(restarts)
        for label, count in health.RESTORED_OVER.items():
            self.leases_restored_over.labels(label).set(count)
        for metric in self._all:
            yield metric.family()

    def child(self, metric: LoopMetric, *labels: str) -> Any:
        """``metric.labels(*labels)`` (kept for call sites: label sets are bounded)."""
        return metric.labels(*labels)

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

    def shadow(self, limit: Limit, decision: str, group: str) -> None:
        self.shadow_decisions.labels(limit.metric_label, decision).inc()
