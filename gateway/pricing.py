"""What the ledger's usage cost: usage × the price table (``pricing:`` in the config).

Upstream pro-rates to the second, so a line costs exactly its billed amount at its rate:

- ``transcription``: ``audio_seconds`` / 3600 × the hourly rate of the line's model (a speech
  model, or an add-on feature recorded as its own line, e.g. ``speaker_labels``);
- ``streaming``: ``session_seconds`` (the session's whole open time: what upstream bills, not
  the audio sent) / 3600 × the hourly rate of its ``speech_model`` (none given: the
  default, ``universal-streaming``);
- ``llm``: ``input_tokens`` / 1e6 × the input rate and ``output_tokens`` / 1e6 × the
  output rate of its model.

Counts (``transcripts``, ``sessions``, ``requests``...) cost nothing by themselves. Usage
whose model has no price costs 0 here and is flagged unpriced: the usage is kept and shown,
the price is never guessed (a near name, a default rate), since a wrong number that looks
right is worse than a flagged gap.
"""

from __future__ import annotations

from collections.abc import Iterable

from .config import Pricing
from .ledger import Row

HOUR_S = 3600.0
MILLION = 1_000_000.0
DEFAULT_STREAMING_MODEL = "universal-streaming"  # what upstream runs when no speech_model is given

# The metrics a price applies to, by product; every other metric is a count.
BILLED = {
    "transcription": ("audio_seconds",),
    "streaming": ("session_seconds",),
    "llm": ("input_tokens", "output_tokens"),
}
USAGE_METRICS = frozenset(m for metrics in BILLED.values() for m in metrics)


def rate(row: Row, prices: Pricing) -> float | None:
    """USD per unit (second or token) of ``row``'s metric; 0.0 for a count; None: unpriced."""
    billed = BILLED.get(row.product)
    if billed is None:  # a product this table does not know: its usage has no price
        return None if row.metric in USAGE_METRICS else 0.0
    if row.metric not in billed:
        return 0.0
    if row.product == "transcription":
        hourly = prices.transcription.get(row.model)
        return None if hourly is None else hourly / HOUR_S
    if row.product == "streaming":
        hourly = prices.streaming.get(row.model or DEFAULT_STREAMING_MODEL)
        return None if hourly is None else hourly / HOUR_S
    tokens = prices.llm.get(row.model)
    if tokens is None:
        return None
    return (tokens.input if row.metric == "input_tokens" else tokens.output) / MILLION


def price(row: Row, prices: Pricing) -> tuple[float, bool]:
    """(cost_usd, unpriced) of one ledger row. Unpriced only when there is usage to price."""
    per_unit = rate(row, prices)
    if per_unit is None:
        return 0.0, row.value > 0
    return row.value * per_unit, False


def price_all(rows: Iterable[Row], prices: Pricing) -> tuple[float, bool]:
    """(cost_usd, unpriced) of a group of rows: the sum, and whether any of them is unpriced."""
    total, unpriced = 0.0, False
    for row in rows:
        cost, missing = price(row, prices)
        total += cost
        unpriced = unpriced or missing
    return total, unpriced
