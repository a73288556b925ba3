"""The simulator's judge: exact rolling windows, and a record of every violation.

Upstream counts a request when it ARRIVES. ``RollingWindow.arrive`` counts arrivals in
(now - W, now]; the (N+1)th is a violation. Every arrival is also logged so a test can ask
for the busiest window afterwards (how much of the capacity was used: no waste).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Violation:
    kind: str  # requests | llm | understanding | async_throttled | streaming_sessions | audio_rate | ...
    limit: str
    at: float
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "limit": self.limit, "at": self.at, "detail": self.detail}


class RollingWindow:
    def __init__(self, name: str, limit: int, window_s: float) -> None:
        self.name = name
        self.limit = limit
        self.window_s = window_s
        self._recent: deque[float] = deque()
        self.arrivals: list[float] = []

    def _trim(self, now: float) -> None:
        edge = now - self.window_s
        while self._recent and self._recent[0] <= edge:
            self._recent.popleft()

    def arrive(self, now: float) -> bool:
        """Count an arrival; False when it is over the limit (it is then not counted)."""
        self._trim(now)
        if len(self._recent) >= self.limit:
            return False
        self._recent.append(now)
        self.arrivals.append(now)
        return True

    def in_window(self, now: float) -> int:
        self._trim(now)
        return len(self._recent)

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest counted arrival leaves the window."""
        self._trim(now)
        return max(0.0, self._recent[0] + self.window_s - now) if self._recent else 0.0

    def busiest(self) -> int:
        return busiest_window(self.arrivals, self.window_s)


def busiest_window(times: list[float], window_s: float) -> int:
    """Most arrivals inside any half-open interval [t, t + window_s)."""
    ordered = sorted(times)
    best = 0
    for i, t in enumerate(ordered):
        j = bisect.bisect_left(ordered, t + window_s, lo=i)
        best = max(best, j - i)
    return best


@dataclass
class Recorder:
    violations: list[Violation] = field(default_factory=list)

    def violate(self, kind: str, limit: str, at: float, detail: str = "") -> None:
        self.violations.append(Violation(kind, limit, at, detail))

    def by_kind(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]
