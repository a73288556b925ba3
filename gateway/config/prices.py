"""The shipped price table (``pricing:``): what usage costs, and where each price was read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
)

from .sections import _Model

# Prices (issue 12), USD, as AssemblyAI's public pages showed them in the month ``taken``.
# Sources (2026-05): universal-3-pro $0.21/h and u3-rt-pro $0.45/h: hivebook.wiki's May 2026
# AssemblyAI entry and assemblyai.com/pricing (as transcribed in October 2026: "Universal-3.5
# Pro $0.21/hr", "Pro Realtime $0.45/hr"); universal-2 (= "universal") $0.15/h:
# assemblyai.com/pricing and Vercel's AI Gateway "at API rates"; universal-streaming $0.15/h:
# assemblyai.com/blog/introducing-universal-streaming (a third-party table's $0.47/h, the old
# real-time rate, loses to assemblyai.com's own page). Add-ons: only where two sources agree
# (speaker_labels, sentiment_analysis $0.02/h, entity_detection $0.08/h: third-party tables,
# no assemblyai.com page reached); the others disagree between sources (iab_categories and
# content_safety: $0.02 or $0.15) and are left out: unpriced, never guessed. LLM Gateway: no
# public per-model table was found (AssemblyAI's docs point to the account's Rates table), so
# none is shipped. Operators: check the Rates table on the dashboard's Billing page (your
# account's prices, discounts included) and write them here.
PRICES_TAKEN = "2026-05"
PRICES_TRANSCRIPTION: dict[str, float] = {  # per audio hour: speech models and add-on features
    "universal-3-pro": 0.21,
    "universal-2": 0.15,
    "universal": 0.15,  # the name transcripts report for Universal-2
    "speaker_labels": 0.02,
    "sentiment_analysis": 0.02,
    "entity_detection": 0.08,
}
PRICES_STREAMING: dict[str, float] = {  # per session hour, by the session's speech_model
    "universal-streaming": 0.15,
    "u3-rt-pro": 0.45,
}

_Usd = Annotated[float, Field(ge=0)]


class TokenPrice(_Model):
    input: _Usd  # USD per million input tokens
    output: _Usd  # USD per million output tokens


class Pricing(_Model):
    """What usage costs. A table given in the file is merged over the shipped one (its entries
    win), so adding one model does not drop the others; a model in no table is unpriced."""

    taken: str = PRICES_TAKEN  # when these prices were read (say so when you change them)
    transcription: dict[str, _Usd] = Field(default_factory=lambda: dict(PRICES_TRANSCRIPTION))
    streaming: dict[str, _Usd] = Field(default_factory=lambda: dict(PRICES_STREAMING))
    llm: dict[str, TokenPrice] = Field(default_factory=dict)  # per LLM Gateway model

    @field_validator("transcription", "streaming", mode="before")
    @classmethod
    def _over_shipped(cls, v: Any, info: ValidationInfo) -> Any:
        shipped = PRICES_TRANSCRIPTION if info.field_name == "transcription" else PRICES_STREAMING
        return {**shipped, **v} if isinstance(v, Mapping) else v
