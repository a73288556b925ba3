"""What each product records in the usage ledger, and how: one place that turns "this work
was done, upstream says it used this much" into a ledger event and its metrics.

- **Transcription**, on a transcript's ``completed`` (failed ones cost nothing): billed audio
  seconds = ``audio_duration`` × ``audio_channels`` when multichannel, on the model upstream
  reports (``speech_model_used``; else the request's ``speech_models``/``speech_model``),
  plus one line per billed add-on feature the request asked for (its own model name, the
  same seconds). What the request asked for is kept on the job when it is made
  (``billing_of``), since the body is not kept once it is submitted.
- **Streaming**, on a session's end: ``session_duration_seconds`` (billed) and
  ``audio_duration_seconds`` from upstream's ``Termination``, by the session's
  ``speech_model``; a session with no ``Termination`` is recorded with the gateway's own
  measure of the time it was open, flagged ``unreported_sessions``.
- **LLM Gateway and understanding**: ``usage.input_tokens``/``output_tokens`` of the answer.

The customer comes from ``X-AAI-Customer`` on the request or, for transcripts, the
``customer_id`` query parameter of the client's ``webhook_url`` (as the account page
suggests); none: empty. A failure to record is logged, never the client's problem.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from .config import Pricing
from .errors import StoreUnavailable
from .identity import Identity
from .ledger import FOLDED, RECORDED, Event, Ledger, Line, Row, clean, utc_day
from .metrics import Metrics
from .pricing import price

log = logging.getLogger(__name__)

CUSTOMER_HEADER = "X-AAI-Customer"
CUSTOMER_MAX = 64

# Add-on features billed per audio hour, each as its own line (the body's flag -> line model).
BILLED_FEATURES = {
    "speaker_labels": "speaker_labels",
    "entity_detection": "entity_detection",
    "sentiment_analysis": "sentiment_analysis",
    "auto_chapters": "auto_chapters",
    "summarization": "summarization",
    "content_safety": "content_safety",
    "iab_categories": "iab_categories",
    "auto_highlights": "auto_highlights",
    "redact_pii": "redact_pii",
    "redact_pii_audio": "redact_pii_audio",
    "language_detection": "language_detection",
    "keyterms_prompt": "keyterms_prompt",
}


def customer_of(request: web.Request) -> str:
    return clean(request.headers.get(CUSTOMER_HEADER, "").strip(), CUSTOMER_MAX)


def webhook_customer(url: Any) -> str:
    if not isinstance(url, str):
        return ""
    values = parse_qs(urlsplit(url).query).get("customer_id")
    return clean(values[0].strip(), CUSTOMER_MAX) if values else ""


def billing_of(body: Mapping[str, Any], customer: str) -> dict[str, Any]:
    """What a transcript request asked for that is billed, kept on its job until it ends."""
    models = body.get("speech_models")
    if not isinstance(models, list):
        models = [body["speech_model"]] if isinstance(body.get("speech_model"), str) else []
    features = sorted(
        line for flag, line in BILLED_FEATURES.items() if body.get(flag) not in (None, False, "", [], {})
    )
    return {
        "models": [str(m) for m in models][:10],
        "features": features,
        "customer": customer or webhook_customer(body.get("webhook_url")),
    }


def _count(value: Any) -> bool:
    """A token count: a whole number from 0 to 10^9 (a bool is not one)."""
    whole = type(value) is int or (type(value) is float and value.is_integer())
    return whole and 0 <= value <= 1e9


def line_of(
    identity: Identity | None, product: str, model: str = "", customer: str = "", *, owner: str = ""
) -> Line:
    """The ledger line of a caller: its project and key (``owner``: who it is when the
    request itself named nobody, e.g. a session opened with a temporary token)."""
    if identity is None:
        return Line("", owner[:16] or "anonymous", product, model, customer)
    return Line(identity.project or "", identity.key, product, model, customer)


class Usage:
    """Records usage events in the ledger, priced (the month's spend, for the caps); counts
    them, their spend and customers folded as metrics."""

    def __init__(
        self,
        ledger: Ledger,
        metrics: Metrics,
        prices: Callable[[], Pricing],
        *,
        hold_audio_s: float = 3600.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self._metrics = metrics
        self._prices = prices  # the running config's (a reload changes them)
        self._hold_audio_s = hold_audio_s
        self._wall = wall
        self.on_spend: Callable[[Line, float], None] | None = None  # the spend caps' (spend.py)

    def cost(self, line: Line, amounts: Mapping[str, float]) -> float:
        day = utc_day(self._wall())
        return sum(
            price(Row(day, *line, metric, value), self._prices())[0] for metric, value in amounts.items()
        )

    async def record(
        self,
        event_id: str,
        line: Line,
        amounts: Mapping[str, float],
        *,
        hold: float = 0.0,
        releases: str = "",
    ) -> bool:
        """Count ``amounts`` (and their price) once for ``event_id``; ``hold``: USD held for
        work not billed yet (negative, with ``releases``: the hold it ends). False: already
        counted, or not recorded."""
        spend = self.cost(line, amounts)
        event = Event(event_id, self._wall(), line, amounts, spend=spend, hold=hold, releases=releases)
        try:
            outcome = await self.ledger.record(event)
        except (StoreUnavailable, OSError, ValueError) as exc:
            log.error("usage: %s was not recorded (%s): %s", event_id, dict(amounts), exc)
            return False
        if outcome in (RECORDED, FOLDED):
            if self.on_spend is not None and (spend or hold):
                self.on_spend(line, spend + hold)
            for metric, value in amounts.items():
                self._metrics.usage.labels(line.project, line.product, metric).inc(value)
            if spend:
                self._metrics.spend.labels(line.project, line.product).inc(spend)
            if outcome == FOLDED:
                self._metrics.usage_customers_folded.labels(line.project).inc()
        return outcome != 0

    def transcript_hold(self, billing: Mapping[str, Any]) -> float:
        """What a transcript holds against its caps until it completes: ``hold_audio_s`` at
        its model's and add-ons' prices (a model with no price holds nothing)."""
        models = billing.get("models") or [""]
        line = Line("", "-", "transcription", str(models[0]))
        amounts = {"audio_seconds": self._hold_audio_s}
        return self.cost(line, amounts) + sum(
            self.cost(line._replace(model=str(f)), amounts) for f in billing.get("features") or []
        )

    async def hold(self, job_id: str, owner: Line, billing: Mapping[str, Any]) -> None:
        held = float(billing.get("hold") or 0.0)
        if held:
            await self.record(f"hold:{job_id}", owner._replace(product="transcription"), {}, hold=held)

    async def transcript(self, job_id: str, owner: Line, billing: Mapping[str, Any], doc: Any) -> None:
        """A transcript ended: bill it if upstream says ``completed`` (and how long it was),
        and end the hold it placed when it was made, in the same event."""
        base = owner._replace(product="transcription", customer=str(billing.get("customer") or ""))
        held, releases = -float(billing.get("hold") or 0.0), f"hold:{job_id}"
        completed = isinstance(doc, dict) and doc.get("status") == "completed"
        duration = doc.get("audio_duration") if completed else None
        if not isinstance(duration, int | float) or duration < 0:
            if completed:
                log.warning(
                    "usage: transcript %s completed without an audio_duration; nothing billed", job_id
                )
            await self.record(f"transcript:{job_id}", base, {}, hold=held, releases=releases)
            return
        channels = doc.get("audio_channels") if doc.get("multichannel") else 1
        seconds = float(duration) * (channels if isinstance(channels, int) and channels > 0 else 1)
        models = billing.get("models") or []
        model = doc.get("speech_model_used") or doc.get("speech_model") or (models[0] if models else "")
        await self.record(
            f"transcript:{job_id}",
            base._replace(model=str(model or "")),
            {"audio_seconds": seconds, "transcripts": 1.0},
            hold=held,
            releases=releases,
        )
        for feature in billing.get("features") or []:
            await self.record(f"transcript:{job_id}:{feature}", base._replace(model=str(feature)),
                              {"audio_seconds": seconds})  # fmt: skip

    async def session(
        self, session_id: str, line: Line, usage: Mapping[str, float] | None, open_s: float
    ) -> None:
        """A streaming session ended; ``usage`` from its Termination, else None."""
        if usage is not None:
            amounts = {"sessions": 1.0, **usage}
        else:
            amounts = {"sessions": 1.0, "session_seconds": max(0.0, open_s), "unreported_sessions": 1.0}
        await self.record(f"session:{session_id}", line._replace(product="streaming"), amounts)

    async def llm(self, request_id: str, line: Line, answer: Any) -> None:
        """An LLM Gateway (or understanding) answer: its tokens, on its model."""
        usage = answer.get("usage") if isinstance(answer, dict) else None
        if not isinstance(usage, dict):
            return
        amounts: dict[str, float] = {}  # (its request is counted with every other: Tally)
        names = (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                 ("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"))  # fmt: skip
        for field, metric in names:
            value: Any = usage.get(field)
            if metric not in amounts and _count(value):  # never True, inf, -1, 2.5
                amounts[metric] = float(value)
        if not amounts:
            return
        model = answer.get("model") if isinstance(answer.get("model"), str) else line.model
        await self.record(f"llm:{request_id}", line._replace(product="llm", model=model or ""), amounts)


# Route groups (requests.route_groups) as the ledger's products.
GROUP_PRODUCT = {"rest": "transcription", "llm": "llm", "token": "streaming", "streaming": "streaming"}
WAITED_MS = 50.0  # a request admitted after this long counts as one that waited
REFUSALS = {"wait_timeout", "queue_full", "shutting_down", "payment_required"}  # 429s, and spend caps' 402s
TALLY_EVERY_S = 1.0


class Tally:
    """Requests per route group, and how many waited or were refused: counted here (one
    increment per request would be one store write per request), recorded every second as
    one event per line. Not billed: a crash loses at most the last second's counts."""

    def __init__(self, ledger: Ledger, instance: str, *, wall: Callable[[], float] = time.time) -> None:
        self._ledger = ledger
        self._instance = instance
        self._wall = wall
        self._counts: dict[Line, dict[str, float]] = {}
        self._n = 0

    def note(self, identity: Identity | None, group: str, outcome: str, wait_ms: float | None) -> None:
        product = GROUP_PRODUCT.get(group)
        if product is None or identity is None:
            return
        amounts = self._counts.setdefault(line_of(identity, product), {})
        amounts["requests"] = amounts.get("requests", 0.0) + 1
        if wait_ms is not None and wait_ms >= WAITED_MS:
            amounts["waited"] = amounts.get("waited", 0.0) + 1
            amounts["wait_seconds"] = amounts.get("wait_seconds", 0.0) + wait_ms / 1000
        if outcome in REFUSALS:
            amounts["refused"] = amounts.get("refused", 0.0) + 1

    async def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for line, amounts in counts.items():
            self._n += 1
            event = Event(f"tally:{self._instance}:{self._n}", self._wall(), line, amounts, dedupe_s=3600)
            try:
                await self._ledger.record(event)
            except (StoreUnavailable, OSError) as exc:  # kept for the next round
                log.warning("usage: request counts not recorded yet: %s", exc)
                kept = self._counts.setdefault(line, {})
                for metric, value in amounts.items():
                    kept[metric] = kept.get(metric, 0.0) + value

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TALLY_EVERY_S)
            await self.flush()
