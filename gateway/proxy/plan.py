"""What the proxy forwards: a request's plan, made by a product before admission.

The proxy admits and forwards a ``Plan`` and knows nothing of how it was made: the products
(gateway/products/) classify a request against the account's limits and hand the proxy
this value, so the dependency points from the products down to the proxy, never back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ..admission.limits import Limit
from .forward import Tap


class Plan(NamedTuple):
    """The classification of one request, made before admission.

    ``body`` is the request body when the gateway had to hold it (a JSON body: it can be
    forwarded again after an upstream 429), as the client sent it (compressed, if it was);
    ``None`` means stream it from the client (an upload), in which case an upstream 429 is
    passed back, not retried.
    """

    group: str  # route group: rest | llm | token (metrics label, requests.route_groups)
    base_url: str  # upstream base URL; the request's raw path and query are appended
    limits: Sequence[Limit] = ()
    max_wait_s: float = 25.0
    body: bytes | None = None
    rewrite_urls: bool = False  # JSON responses may carry absolute URLs back to the API
    path: str | None = None  # the upstream path and query, when not the client's own
    rewrite: Callable[[Any], Any] | None = None  # applied to a JSON response document
    own_body: bool = False  # ``body`` is the gateway's own JSON, not the client's bytes: no Content-Encoding
    # A 2xx JSON answer ``rewrite`` could not read (compressed anyway, over the cap) is a 502,
    # not passed on unread: what the rewrite notes must not be skipped (an upload's owner).
    must_read: bool = False
    # Called with upstream's status and headers when it answers: a Tap reads the answer as it
    # passes to the client (an LLM answer's usage, llm_usage.py), or None for this answer.
    tap: Callable[[int, Mapping[str, str]], Tap | None] | None = None
    # Its place in the queue (0..99, higher first): the gateway's own reads that end a job go
    # ahead of clients' requests, since the job holds a concurrency slot until they land.
    priority: int = 0

    @property
    def retryable(self) -> bool:
        return self.body is not None
