"""LLM Gateway (/v1/*): what its requests take from the engine.

- ``POST /v1/chat/completions``: one token from the model's own window (the model is read
  from the body; a missing model or a malformed body is a 400), plus the account window.
  Only the primary ``model`` counts: ``fallbacks`` run upstream only when it fails.
- ``POST /v1/understanding``: its own bucket (``llm_requests.understanding``), no model.
- ``GET /v1/models`` and anything else: the account window only, waiting up to
  ``queue.max_wait_s`` (only chat waits the shorter ``queue.llm_max_wait_s``).
- A chat or understanding body is read whatever its Content-Type, inflated to be read when
  compressed (gzip, deflate), and forwarded as received.
- On the free plan the LLM Gateway does not exist: 403 without calling upstream.
- A ``transcript_id`` in a chat or understanding body names a transcript by the gateway's
  id: it is swapped for upstream's on the way out, and back in the response.
- Every 2xx answer with a ``usage`` (chat, understanding, any other keyed /v1 route; JSON or
  SSE) is recorded in the usage ledger once, read as it passes (llm_usage.py).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Protocol

from aiohttp import hdrs, web

from ..config import Config
from ..errors import BadRequest, Forbidden
from ..identity import owner_of
from ..proxy.plan import Plan
from ..usage import Usage
from .bodies import hold, parse_object, read_held
from .catalog import Catalog, valid_model_name
from .llm_usage import UNDERSTANDING_MODEL, tap_for
from .transcripts.ids import swap, transcript_ids

CHAT = "/v1/chat/completions"
UNDERSTANDING = "/v1/understanding"
PUBLIC = frozenset({("GET", "/v1/models")})  # served upstream without a key


class TranscriptIds(Protocol):
    async def to_upstream(self, ids: list[str], owner: str) -> dict[str, str]: ...


async def plan(
    request: web.Request,
    cfg: Config,
    catalog: Catalog,
    *,
    ids: TranscriptIds | None = None,
    usage: Usage | None = None,
) -> Plan:
    if not cfg.limits.llm_available:
        raise Forbidden(
            "The LLM Gateway is not available on the free plan; "
            "set limits.plan: paid once the account is upgraded"
        )
    method, path = request.method, request.path.rstrip("/")
    window = catalog.account_window("llm", method)
    cap = cfg.proxy.max_json_body_bytes
    if method == hdrs.METH_POST and path in (CHAT, UNDERSTANDING):
        held = await read_held(request, cap)  # whatever its Content-Type: curl sends form data
        doc = parse_object(held.decoded(cap))
        body, own = held.raw, False  # forwarded as received (compressed, if it was)
        model = UNDERSTANDING_MODEL
        if path == CHAT:
            named = doc.get("model")
            if not isinstance(named, str) or not named.strip():
                raise BadRequest("`model` is required: a non-empty string naming the model")
            if not valid_model_name(named):
                raise BadRequest(f"`model` is not a valid model name: {named[:80]!r}")
            model = named
            limits, max_wait = [catalog.model(model), *window], cfg.queue.llm_max_wait_s
        else:
            limits, max_wait = [catalog.understanding, *window], cfg.queue.max_wait_s
        rewrite = None
        wanted = list(dict.fromkeys(transcript_ids(doc)))
        if ids is not None and wanted:
            # The client names transcripts by the gateway's ids; upstream knows its own.
            mapping = await ids.to_upstream(wanted, owner_of(request))
            if mapping:
                body, own = json.dumps(swap(doc, mapping)).encode(), True
                back = {up: mine for mine, up in mapping.items()}
                rewrite = partial(swap, mapping=back)
        tap = tap_for(usage, request, model, expected=path == CHAT) if usage is not None else None
        return Plan(
            "llm", cfg.upstream.llm_url, limits, max_wait, body, rewrite=rewrite, own_body=own, tap=tap
        )
    keyed = (method, path) not in PUBLIC  # an anonymous answer is nobody's usage
    tap = tap_for(usage, request, "", expected=False) if usage is not None and keyed else None
    return Plan("llm", cfg.upstream.llm_url, window, cfg.queue.max_wait_s, await hold(request, cap), tap=tap)
