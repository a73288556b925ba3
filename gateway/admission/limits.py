"""What a limit is, and the one total order in which a request takes its limits.

Every limit is a bucket of ``capacity`` tokens. A request takes one token from each bucket
that applies to it, all in one atomic step, and a token comes back when its lease ends:

- a WINDOW limit (N per W seconds) leases a token for exactly ``window + guard``; so the
  starts of its leases never number more than N in any interval of W + guard, and a full
  burst of N is still allowed;
- a CONCURRENCY limit leases a token until the work ends (released) or the lease's TTL
  lapses (renewed while the work runs).

Limits are always taken in one total order (``rank``, then ``name``): per-model limits
first, then concurrency, then streaming sessions, the account window last. Taking them in a
fixed order, like locks, means no two waiters can each hold what the other needs; and every
request class that shares a limit L must share the limits after L (``check_classes``).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Kind(enum.Enum):
    WINDOW = "window"
    CONCURRENCY = "concurrency"


# Positions in the total order; ties are broken by name.
RANK_MODEL = 10
RANK_CONCURRENCY = 20
RANK_SESSIONS = 30
RANK_WINDOW = 90


@dataclass(frozen=True, slots=True)
class Limit:
    """One bucket.

    ``name`` is part of the store key (``requests``, ``llm:gpt-5``); ``label`` is the bounded
    metric label (unknown models share ``llm:other``); ``lease_ms`` is how long a token stays
    out: window + guard for WINDOW limits, the lease TTL for CONCURRENCY ones.
    """

    name: str
    kind: Kind
    capacity: int
    lease_ms: int
    rank: int
    window_ms: int = 0
    label: str = ""
    # Shadow mode: decided and recorded, never enforced (the request is forwarded at once).
    shadow: bool = False

    @property
    def sort_key(self) -> tuple[int, str]:
        return (self.rank, self.name)

    @property
    def metric_label(self) -> str:
        return self.label or self.name

    def __repr__(self) -> str:
        span = (
            f"{self.window_ms}ms+{self.lease_ms - self.window_ms}"
            if self.window_ms
            else f"ttl {self.lease_ms}ms"
        )
        return f"Limit({self.name}: {self.capacity} per {span})"


def window_limit(
    name: str, capacity: int, window_s: float, guard_ms: int, *, rank: int, label: str = ""
) -> Limit:
    window_ms = int(round(window_s * 1000))
    return Limit(
        name=name,
        kind=Kind.WINDOW,
        capacity=capacity,
        lease_ms=window_ms + guard_ms,
        rank=rank,
        window_ms=window_ms,
        label=label,
    )


def concurrency_limit(name: str, capacity: int, lease_ttl_s: float, *, rank: int, label: str = "") -> Limit:
    return Limit(
        name=name,
        kind=Kind.CONCURRENCY,
        capacity=capacity,
        lease_ms=int(round(lease_ttl_s * 1000)),
        rank=rank,
        label=label,
    )


def ordered(limits: Iterable[Limit]) -> tuple[Limit, ...]:
    """The limits in the engine's total order, without duplicates."""
    return _ordered(tuple(limits))


@functools.lru_cache(maxsize=4096)
def _ordered(limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
    unique = {limit.name: limit for limit in limits}
    return tuple(sorted(unique.values(), key=lambda limit: limit.sort_key))


class OrderError(ValueError):
    """Two request classes share a limit but not the limits after it."""


def check_classes(classes: Sequence[Sequence[Limit]]) -> None:
    """Every class that shares a limit L must share the limits after L.

    Otherwise a ticket holding a reservation on L while it waits on a later limit could be
    waiting on something the waiters behind it on L do not need, and the order argument that
    rules out deadlock and priority theft no longer holds. Raises ``OrderError``.
    """
    tails: dict[str, tuple[str, ...]] = {}
    for cls in classes:
        names = [limit.name for limit in ordered(cls)]
        for i, name in enumerate(names):
            tail = tuple(names[i + 1 :])
            seen = tails.setdefault(name, tail)
            if seen != tail:
                raise OrderError(
                    f"limit {name!r} is followed by {list(seen)} in one request class and by {list(tail)} "
                    "in another; classes sharing a limit must share every limit after it"
                )
