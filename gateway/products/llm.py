"""LLM Gateway (/v1/*): what its requests take from the engine.

- ``POST /v1/chat/completions``: one token from the model's own window (the model is read
  from the body; a missing model or a malformed body is a 400), plus the account window.
  Only the primary ``model`` counts: ``fallbacks`` run upstream only when it fails.
- ``POST /v1/understanding``: its own bucket (``llm_requests.understanding``), no model.
- ``GET /v1/models`` and anything else: the account window only.
- On the free plan the LLM Gateway does not exist: 403 without calling upstream.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from ..config import Config
from ..errors import BadRequest, Forbidden
from .catalog import Catalog, valid_model_name
from .plan import Plan, held_body, parse_object, read_capped

CHAT = "/v1/chat/completions"
UNDERSTANDING = "/v1/understanding"
PUBLIC = frozenset({("GET", "/v1/models")})  # served upstream without a key


async def plan(request: web.Request, cfg: Config, catalog: Catalog) -> Plan:
    if not cfg.limits.llm_available:
        raise Forbidden(
            "The LLM Gateway is not available on the free plan; "
            "set limits.plan: paid once the account is upgraded"
        )
    method, path = request.method, request.path.rstrip("/")
    window = catalog.account_window("llm", method)
    cap = cfg.proxy.max_json_body_bytes
    if method == hdrs.METH_POST and path == CHAT:
        body = await read_capped(request, cap)
        model = parse_object(body).get("model")
        if not isinstance(model, str) or not model.strip():
            raise BadRequest("`model` is required: a non-empty string naming the model")
        if not valid_model_name(model):
            raise BadRequest(f"`model` is not a valid model name: {model[:80]!r}")
        return Plan(
            "llm", cfg.upstream.llm_url, [catalog.model(model), *window], cfg.queue.llm_max_wait_s, body
        )
    if method == hdrs.METH_POST and path == UNDERSTANDING:
        body = await read_capped(request, cap)
        parse_object(body)
        return Plan("llm", cfg.upstream.llm_url, [catalog.understanding, *window], cfg.queue.max_wait_s, body)
    return Plan("llm", cfg.upstream.llm_url, window, cfg.queue.llm_max_wait_s, await held_body(request, cap))
