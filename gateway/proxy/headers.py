"""Rate-limit response headers (draft-ietf-httpapi-ratelimit-headers, structured fields).

    RateLimit-Policy: "requests";q=20000;w=300
    RateLimit: "requests";r=19873;t=212

One policy per response: the tightest limit the request took (fewest tokens left; on a tie,
the one that takes longest to give one back). ``t`` is the seconds until a token returns.
A 429 from the gateway carries ``Retry-After`` and a matching ``RateLimit`` with r=0.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

from aiohttp import hdrs

from ..admission.limits import Kind, Limit
from ..admission.store import LimitState

_TOKEN = re.compile(r"^[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*$")


@functools.lru_cache(maxsize=1024)
def _item(name: str) -> str:
    """A policy name as an sf-token when it is one, else as an sf-string."""
    if _TOKEN.match(name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=1024)
def policy(limit: Limit) -> str:
    value = f"{_item(limit.name)};q={limit.capacity}"
    if limit.kind is Kind.WINDOW:
        value += f";w={max(1, math.ceil(limit.window_ms / 1000))}"
    return value


def admitted_headers(limits: Sequence[Limit], states: Sequence[LimitState]) -> dict[str, str]:
    if not limits or len(states) != len(limits):
        return {}
    limit, state = min(zip(limits, states, strict=True), key=lambda p: (p[1].remaining, -p[1].reset_ms))
    value = f"{_item(limit.name)};r={max(0, state.remaining)}"
    if limit.kind is Kind.WINDOW:  # a concurrency token comes back when work ends, not at a time
        value += f";t={max(0, math.ceil(state.reset_ms / 1000))}"
    return {"RateLimit-Policy": policy(limit), "RateLimit": value}


def refused_headers(limit: Limit, retry_after_s: float) -> dict[str, str]:
    seconds = max(1, math.ceil(retry_after_s))
    return {
        hdrs.RETRY_AFTER: str(seconds),
        "RateLimit-Policy": policy(limit),
        "RateLimit": f"{_item(limit.name)};r=0;t={seconds}",
    }
