"""The gateway's one exception tree, and how each maps to an HTTP answer.

Every error a client can see is a ``GatewayError`` carrying its HTTP status and a message,
rendered in AssemblyAI's shape ``{"error": "..."}`` by one middleware (middlewares.py). Third-party
exceptions are translated where they arise, each in one place: Redis in
admission/redis_store.py, the upstream HTTP client in proxy/forward.py.

    GatewayError (500)
    ├── BadRequest (400)            malformed JSON, missing model, bad field
    ├── Unauthorized (401)          no Authorization header (upstream's own text)
    ├── PaymentRequired (402)       a monthly spend cap is reached (spend.py)
    ├── Forbidden (403)             e.g. the LLM Gateway on the free plan
    ├── NotFound (404)              a route the gateway does not serve
    ├── RequestTimeout (408)        a client's request body arrived too slowly
    ├── Conflict (409)              e.g. deleting a transcript while it is being submitted
    ├── PayloadTooLarge (413)       a JSON body the gateway must read is over its cap
    ├── UnsupportedMediaType (415)  a body the gateway must read, in a Content-Encoding it cannot read
    ├── RateLimited (429)           waited max_wait, or max_depth waiters ahead; has Retry-After
    │   ├── WaitTimeout
    │   ├── QueueFull
    │   └── ShuttingDown            this instance is draining (SIGTERM): try again, elsewhere
    ├── NotImplementedYet (501)     routes that later work will serve
    ├── BadGateway (502)            could not connect to upstream
    ├── StoreUnavailable (503)      Redis unreachable or erroring; the request was charged nothing
    └── GatewayTimeout (504)        upstream did not answer in time
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    status = 500
    message = "Internal gateway error"

    def __init__(self, message: str | None = None, *, headers: Mapping[str, str] | None = None) -> None:
        self.message = message or type(self).message
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.message)


class BadRequest(GatewayError):
    status = 400
    message = "Bad request"


class Unauthorized(GatewayError):
    status = 401
    message = "Authentication error, API token missing/invalid"


class PaymentRequired(GatewayError):
    status = 402
    message = "Monthly spend cap reached"


class Forbidden(GatewayError):
    status = 403
    message = "Forbidden"


class NotFound(GatewayError):
    status = 404
    message = "Not found"


class RequestTimeout(GatewayError):
    status = 408
    message = "The request body did not arrive in time"


class Conflict(GatewayError):
    status = 409
    message = "Conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    message = "Request body too large"


class UnsupportedMediaType(GatewayError):
    status = 415
    message = "Unsupported Content-Encoding"


class RateLimited(GatewayError):
    """Refused by the gateway's own admission; ``limit`` names the limit that refused."""

    status = 429
    message = "Too Many Requests"

    def __init__(
        self, message: str, *, limit: str, retry_after_s: float, headers: Mapping[str, str] | None = None
    ):
        super().__init__(message, headers=headers)
        self.limit = limit
        self.retry_after_s = retry_after_s


class WaitTimeout(RateLimited):
    """Waited the route group's max wait without being admitted."""


class QueueFull(RateLimited):
    """``queue.max_depth`` waiters were already ahead on the limit."""


class ShuttingDown(RateLimited):
    """This instance received SIGTERM: a request still waiting for admission (or one that
    would have to wait) is handed back, charged nothing, to be retried on another instance."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__(
            "Too Many Requests: this gateway instance is shutting down; nothing was charged, "
            "try again (another instance will serve it)",
            limit="",
            retry_after_s=retry_after_s,
            headers={"Retry-After": str(max(1, round(retry_after_s)))},
        )


class NotImplementedYet(GatewayError):
    status = 501
    message = "Not implemented"


class BadGateway(GatewayError):
    status = 502
    message = "Could not reach the upstream API"


class StoreUnavailable(GatewayError):
    """The client sees only the generic message; ``detail`` (for logs) says what failed."""

    status = 503
    message = "The gateway's limit store is unavailable; nothing was charged, try again shortly"

    def __init__(self, detail: str = "") -> None:
        super().__init__(None, headers={"Retry-After": "1"})
        self.detail = detail


class Fenced(StoreUnavailable):
    """Redis answers, but another instance may be admitting locally through an outage
    (fallback.py's fence): this one joins it rather than admit from Redis meanwhile."""


class GatewayTimeout(GatewayError):
    status = 504
    message = "The upstream API did not answer in time"
