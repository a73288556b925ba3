"""The account's limits and the plan presets that fill the ones the file leaves unset (the
account page: free 5 / paid 200 transcripts at once, 5 / 100 new streaming sessions a minute,
LLM Gateway 30 a minute per model on paid only, 20,000 requests per 5 minutes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from .sections import _Model

ROUTE_GROUPS = ("rest", "llm", "token", "streaming")

# What each plan allows (../shared/account-management.txt). A value written in the file wins.
PRESETS: dict[str, dict[str, Any]] = {
    "free": {
        "async_concurrency": 5,
        "streaming_sessions": {"limit": 5, "window_s": 60},
        "llm_requests": {"limit": 30, "window_s": 60},  # unused: no LLM Gateway on free
        "requests": {"limit": 20_000, "window_s": 300},
    },
    "paid": {
        "async_concurrency": 200,
        "streaming_sessions": {"limit": 100, "window_s": 60},
        "llm_requests": {"limit": 30, "window_s": 60},
        "requests": {"limit": 20_000, "window_s": 300},
    },
}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class Window(_Model):
    limit: int = Field(gt=0)
    window_s: float = Field(gt=0)
    guard_ms: int | None = Field(None, ge=0)  # per-limit override of limits.guard_ms
    # Shadow mode for this limit alone (limits.shadow: for every limit).
    shadow: bool = False


class ModelWindow(_Model):
    limit: int = Field(gt=0)
    window_s: float | None = Field(None, gt=0)


class LlmRequests(Window):
    models: dict[str, ModelWindow] = Field(default_factory=dict)
    # /v1/understanding has no model in its body: it counts against its own bucket.
    understanding: Window = Window(limit=30, window_s=60)


class Requests(Window):
    # Which route groups take a token from the account window (default: all that reach upstream).
    route_groups: tuple[str, ...] = ("rest", "llm", "token")
    # Whether GET/HEAD count: upstream's docs disagree, so counting is the safe default.
    count_reads: bool = True

    @field_validator("route_groups")
    @classmethod
    def _groups(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for g in v:
            if g not in ROUTE_GROUPS:
                raise ValueError(f"unknown route group {g!r} (known: {', '.join(ROUTE_GROUPS)})")
        return v


class Limits(_Model):
    plan: Literal["free", "paid"] = "paid"
    guard_ms: int = Field(100, ge=0)
    # Shadow mode: every limit is decided and recorded (what would have waited or been
    # refused: metrics aai_gateway_shadow_*, a log line each) but requests are forwarded at
    # once. For rolling the gateway out in front of a live account.
    shadow: bool = False
    async_concurrency: int = Field(gt=0)
    streaming_sessions: Window
    llm_requests: LlmRequests
    requests: Requests

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        plan = data.get("plan") or "paid"
        # An unknown plan is reported once, by the Literal check; fill the rest from "paid"
        # so it does not also show up as four "required" errors.
        preset = PRESETS.get(plan, PRESETS["paid"]) if isinstance(plan, str) else PRESETS["paid"]
        return _merge(preset, {k: v for k, v in data.items() if v is not None})

    @property
    def llm_available(self) -> bool:
        return self.plan == "paid"
