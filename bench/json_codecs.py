"""A micro-benchmark: ``json.loads`` against ``orjson.loads`` on 2 KB and 200 KB chat bodies
(the gateway's one JSON parse on its hot path)."""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable
from typing import Any

from loadgen import chat_body


def time_per_call(fn: Callable[[], object], budget_s: float = 0.1) -> float:
    """Best-of-5 seconds per call, with the call count sized to ``budget_s`` per repeat."""
    n = 1
    while True:
        t = timeit.timeit(fn, number=n)
        if t > budget_s / 5:
            break
        n *= 4
    n = max(1, int(n * budget_s / max(t, 1e-9)))
    return min(timeit.repeat(fn, number=n, repeat=5)) / n


def json_codecs() -> list[dict[str, Any]]:
    try:
        import orjson
    except ImportError:
        return []
    rows = []
    for label, size in (("2 KB", 2048), ("200 KB", 200 * 1024)):
        body = chat_body(size)
        assert json.loads(body) == orjson.loads(body)
        std = time_per_call(lambda b=body: json.loads(b))  # type: ignore[misc]
        fast = time_per_call(lambda b=body: orjson.loads(b))  # type: ignore[misc]
        rows.append({"body": label, "bytes": len(body), "json_us": std * 1e6, "orjson_us": fast * 1e6})
    return rows
