"""What an LLM Gateway answer used, read from its bytes as they pass to the client.

The proxy feeds a ``Tap`` every chunk of a 2xx answer after writing it to the client
(forward.py's ``relay``), and says when the answer ended; nothing here delays, buffers or
changes what the client receives. When the answer ends, its ``usage`` is recorded once
(usage.py's ``Usage.llm``), on its model and the request's project, key and customer:

- a JSON answer (``stream`` off): the body, up to ``JSON_CAP`` bytes, is parsed once the
  answer ended, and only when it holds a ``"usage": {`` (a list of models never is);
- an SSE answer (``text/event-stream``): read event by event as it passes; only events
  whose data holds a ``"usage": {`` are parsed (OpenAI sends ``"usage": null`` on every
  chunk), and their fields are kept, the latest value of each winning (a provider that
  sends input tokens first and output tokens last is counted right; a cumulative count is
  its last value). Memory is bounded: the event being received, up to ``LINE_CAP`` bytes
  (a longer one is dropped up to its end), plus the counts. Events follow the SSE rules:
  an event counts once its blank line arrived, so a last event cut short is not counted,
  as a client's SSE parser would not have seen it;
- gzip and deflate answers are read through a decompressor (the handler asks upstream for
  nothing else, forward.py's ``readable_accept_encoding``).

A stream cut short (upstream closed, or the client left and the gateway stopped reading)
records what it saw if it saw a usage, and nothing otherwise (logged: upstream may still
bill it). Token counts must be integers from 0 to ``MAX_TOKENS``: anything else (a string,
a negative number, a float, a bool) is dropped and logged, never guessed. The model is the
answer's own (``model``, else ``request.model``: a fallback model may have run) when it is
a valid model name, else the request's.

The event's id is a fresh random one per client request, not its ``X-Request-Id``: a client
chooses that one, and sending it again would have its second answer counted as the first.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import hdrs, web

from ..identity import identity_of
from ..proxy.forward import Tap
from ..usage import Usage, customer_of, line_of
from .catalog import valid_model_name

log = logging.getLogger(__name__)

JSON_CAP = 4 * 1024 * 1024  # a JSON answer read for its usage (an LLM answer is far smaller)
LINE_CAP = 256 * 1024  # one SSE line, or one event's data, kept to be read
MAX_TOKENS = 10**9  # more tokens in one answer is not a count upstream could bill
UNDERSTANDING_MODEL = "speech-understanding"  # the ledger's model for an answer naming none

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_FIELDS = (("input_tokens", "input_tokens"), ("prompt_tokens", "input_tokens"),
           ("output_tokens", "output_tokens"), ("completion_tokens", "output_tokens"))  # fmt: skip


def counts_of(usage: Mapping[str, Any]) -> tuple[dict[str, int], list[str]]:
    """The valid token counts of a ``usage`` object (``input_tokens``/``output_tokens``, or
    OpenAI's ``prompt_tokens``/``completion_tokens``), and the fields dropped as invalid."""
    counts: dict[str, int] = {}
    bad = []
    for field, name in _FIELDS:
        value = usage.get(field)
        if value is None:
            continue
        if type(value) is int and 0 <= value <= MAX_TOKENS:
            counts.setdefault(name, value)
        else:
            bad.append(field)
    return counts, bad


class Found:
    """What an answer said it used, so far."""

    def __init__(self) -> None:
        self.seen = False  # a usage object was read
        self.counts: dict[str, int] = {}
        self.model = ""
        self.bad: list[str] = []

    def note(self, doc: Any) -> None:
        if not isinstance(doc, dict) or not isinstance(doc.get("usage"), dict):
            return
        counts, bad = counts_of(doc["usage"])
        self.seen = True
        self.counts.update(counts)
        self.bad += [b for b in bad if b not in self.bad]
        model = doc.get("model")
        if not isinstance(model, str) and isinstance(doc.get("request"), dict):
            model = doc["request"].get("model")
        if isinstance(model, str) and len(model) <= 100 and valid_model_name(model):
            self.model = model


class JsonReader:
    """A JSON answer: its chunks kept (references, not copies) up to ``JSON_CAP``."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.full = False

    def feed(self, chunk: bytes) -> None:
        if self.full:
            return
        self.size += len(chunk)
        if self.size > JSON_CAP:
            self.full, self.chunks = True, []
            return
        self.chunks.append(chunk)

    def found(self) -> Found:
        found = Found()
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        if self.full:
            log.warning("llm usage: a JSON answer over %d bytes was not read for its usage", JSON_CAP)
        elif _USAGE.search(body):
            try:
                found.note(json.loads(body))  # a parse of upstream's bytes; the client has its own
            except (UnicodeDecodeError, ValueError):  # cut short, or not JSON: nothing seen
                pass
        return found


def _first_end(data: bytes | bytearray, start: int = 0) -> int:
    """Where the first blank line at or after ``start`` ends (an event's end), or -1."""
    ends = [i + n for i, n in ((data.find(b"\n\n", start), 2), (data.find(b"\n\r\n", start), 3)) if i >= 0]
    return min(ends) if ends else -1


def _last_end(data: bytes | bytearray, start: int = 0, stop: int | None = None) -> int:
    """Where the last blank line in ``data[start:stop]`` ends, or -1."""
    stop = len(data) if stop is None else stop
    i, j = data.rfind(b"\n\n", start, stop), data.rfind(b"\n\r\n", start, stop)
    return max(i + 2 if i >= 0 else -1, j + 3 if j >= 0 else -1)


class SseReader:
    """An SSE answer, read event by event for the ones that carry a usage.

    Most events carry none, so a chunk costs two searches in C: for the last blank line (the
    events it completes) and for ``"usage": {`` in them; only events that match are split
    into lines and parsed. What is kept: the event being received, up to ``LINE_CAP`` (a
    longer one is dropped up to its end), and the counts.
    """

    def __init__(self) -> None:
        self.buf = bytearray()  # the event being received (complete events are dropped)
        self.skipping = False  # that event passed LINE_CAP: dropped up to its end
        self.result = Found()

    def feed(self, chunk: bytes) -> None:
        if not self.buf and not self.skipping and chunk.endswith(b"\n\n"):  # whole events: most chunks
            match = _USAGE.search(chunk)
            if match is not None:
                self._events(chunk[max(0, _last_end(chunk, 0, match.start())) :])
            return
        searched = max(0, len(self.buf) - 2)  # a blank line may straddle two chunks
        self.buf += chunk
        if self.skipping:
            end = _first_end(self.buf, searched)
            if end < 0:
                del self.buf[:-2]
                return
            del self.buf[:end]
            self.skipping, searched = False, 0
        last = _last_end(self.buf, searched)
        if last > 0:
            match = _USAGE.search(self.buf, 0, last)
            if match is not None:
                begin = max(0, _last_end(self.buf, 0, match.start()))
                self._events(bytes(self.buf[begin:last]))
            del self.buf[:last]
        if len(self.buf) > LINE_CAP:
            del self.buf[:-2]
            self.skipping = True

    def _events(self, text: bytes) -> None:
        """Whole events (``text`` ends with a blank line), by the SSE rules: ``data:`` lines
        joined by newlines; comments, ``event:``, ``id:``, ``retry:`` say nothing of usage."""
        data: list[bytes] = []
        for raw in text.split(b"\n"):
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if data and sum(map(len, data)) <= LINE_CAP:
                    self._event(b"\n".join(data))
                data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])

    def _event(self, data: bytes) -> None:
        if not _USAGE.search(data):
            return
        try:
            self.result.note(json.loads(data))
        except (UnicodeDecodeError, ValueError):  # malformed: this event says nothing
            pass

    def found(self) -> Found:
        return self.result  # an event not ended by its blank line is not counted (SSE rules)


class Inflating:
    """A reader behind a gzip or deflate decoder, fed in bounded pieces."""

    def __init__(self, reader: JsonReader | SseReader) -> None:
        self.reader = reader
        self.decoder = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or zlib header
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        while chunk and not self.broken and not getattr(self.reader, "full", False):
            try:
                out = self.decoder.decompress(chunk, 64 * 1024)
            except zlib.error:
                self.broken = True
                log.warning("llm usage: a compressed answer could not be decoded; its usage is not read")
                return
            self.reader.feed(out)
            chunk = self.decoder.unconsumed_tail

    def found(self) -> Found:
        return self.reader.found()


class AnswerTap:
    """The proxy's ``Tap`` for one answer: reads it as it passes, records it once it ended."""

    def __init__(
        self, reader: JsonReader | SseReader | Inflating, record: Callable[[Found, bool], Awaitable[None]]
    ) -> None:
        self._reader = reader
        self._record = record
        self._failed = False
        self._done = False

    def feed(self, chunk: bytes) -> None:
        if self._failed:
            return
        try:
            self._reader.feed(chunk)
        except Exception:  # a reading bug must never break the client's answer
            self._failed = True
            log.exception("llm usage: reading an answer failed; its usage is not recorded")

    async def done(self, complete: bool) -> None:
        if self._done or self._failed:
            return
        self._done = True
        await self._record(self._reader.found(), complete)


def tap_for(
    usage: Usage, request: web.Request, model: str, *, expected: bool
) -> Callable[[int, Mapping[str, str]], Tap | None]:
    """What the proxy calls when upstream answered: a ``Tap`` for a 2xx answer, else None.
    ``model``: the request's (the ledger's when the answer names none); ``expected``: the
    route's answers carry a usage (chat: one without it, or cut short before it, is logged;
    understanding's are not documented to)."""
    line = line_of(identity_of(request), "llm", model, customer_of(request))
    event_id = uuid.uuid4().hex  # not the client's X-Request-Id (see the module)

    async def record(found: Found, complete: bool) -> None:
        if found.bad:
            log.warning("llm usage: dropped invalid token counts %s in an answer of %s", found.bad, model)
        if not found.seen:
            if expected:
                why = "ended without a usage" if complete else "was cut short before its usage"
                log.warning("llm usage: an answer of %s %s; nothing recorded", model or "?", why)
            return
        answer = {"usage": found.counts, "model": found.model or model}
        await usage.llm(event_id, line, answer)

    def open_tap(status: int, headers: Mapping[str, str]) -> Tap | None:
        if not 200 <= status < 300:
            return None  # only a 2xx answer is billed
        kind = headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()
        plain: JsonReader | SseReader = SseReader() if kind == "text/event-stream" else JsonReader()
        reader: JsonReader | SseReader | Inflating = plain
        coding = headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            reader = Inflating(plain)
        elif coding not in ("", "identity"):
            log.warning("llm usage: an answer in %r cannot be read; its usage is not recorded", coding[:40])
            return None
        return AnswerTap(reader, record)

    return open_tap
