"""The id a client knows (the gateway's job id) and the id upstream knows, swapped where they
travel: in JSON responses (every id the client sees is its own), and in request bodies the
gateway forwards (``transcript_id`` in LLM Gateway and ``/v1/understanding`` bodies).

Both ids are UUID strings, unique enough that a plain substring swap is exact: it also
covers URLs that carry an id (``resource_url``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

ID_KEYS = frozenset({"transcript_id", "transcript_ids"})
_VERSION = 0xF << 76  # a UUID's version nibble


def new_job_id() -> str:
    """A random UUID marked as the gateway's: version 8 (RFC 9562's vendor-specific) where
    upstream's ids are version 4. So a request naming any other id is forwarded without a
    store lookup (a pass-through poll would otherwise pay a Redis round trip for nothing)."""
    return str(uuid.UUID(int=(uuid.uuid4().int & ~_VERSION) | (0x8 << 76)))


def is_job_id(value: str) -> bool:
    """Could be one of the gateway's job ids (``new_job_id``); anything else is upstream's."""
    return len(value) == 36 and value[14] == "8"


def swap(doc: Any, mapping: Mapping[str, str]) -> Any:
    """``doc`` with every occurrence of a key of ``mapping`` replaced by its value."""
    if not mapping:
        return doc
    if isinstance(doc, str):
        for old, new in mapping.items():
            if old in doc:
                doc = doc.replace(old, new)
        return doc
    if isinstance(doc, list):
        return [swap(x, mapping) for x in doc]
    if isinstance(doc, dict):
        return {k: swap(v, mapping) for k, v in doc.items()}
    return doc


def transcript_ids(doc: Any) -> Iterator[str]:
    """Values of ``transcript_id``/``transcript_ids`` anywhere in a request body."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ID_KEYS:
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (x for x in v if isinstance(x, str))
            else:
                yield from transcript_ids(v)
    elif isinstance(doc, list):
        for x in doc:
            yield from transcript_ids(x)


def listed_ids(doc: Any) -> list[str]:
    """Transcript ids in a list response (``transcripts[].id``)."""
    items = doc.get("transcripts") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return []
    return [t["id"] for t in items if isinstance(t, dict) and isinstance(t.get("id"), str)]
