"""Property-based fuzzing of the relay's WebSocket framing (gateway/proxy/ws_wire.py) and of
its handling of a client's frames (streaming_relay._ClientLeg / _Session):

- any split of a byte stream into chunks yields the same frames, byte for byte, and the same
  verdict (frames, then the same error or none), whether the stream is valid or mutated;
- a mutated stream raises only the documented errors (ws_wire.ProtocolError and its kinds);
- no frame above the cap is ever buffered, and the bytes held for unfinished frames across
  readers stay within the shared budget (and are all given back);
- the relay never lets an exception out of its parser, answers only with well-formed server
  frames and the documented close codes, reads no text frame above READ_MAX, sends upstream
  only a well-formed client stream, and gives back every byte it held.
"""

from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.products import streaming_relay
from gateway.products.streaming_relay import RELAYING, WAITING, _Session
from gateway.proxy import ws_wire
from tests.helpers import ws_frame

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
CAP = 600  # the readers' frame cap in these tests


def build(op: int, payload: bytes, *, fin: bool, key: bytes | None) -> bytes:
    return ws_frame((0x80 if fin else 0) | op, payload, key=key)


keys = st.binary(min_size=4, max_size=4)
controls = st.one_of(
    st.tuples(st.just(ws_wire.PING), st.binary(max_size=125)),
    st.tuples(st.just(ws_wire.PONG), st.binary(max_size=125)),
)


@st.composite
def messages(draw: st.DrawFn) -> list[tuple[int, bytes, bool]]:
    """One data message (1-3 fragments, control frames between them), as (op, payload, fin)."""
    op = draw(st.sampled_from([ws_wire.TEXT, ws_wire.BINARY]))
    parts = draw(st.lists(st.binary(max_size=300), min_size=1, max_size=3))
    if op == ws_wire.TEXT and draw(st.booleans()):
        parts = [b'{"type": "Terminate"}']
    out: list[tuple[int, bytes, bool]] = []
    for i, part in enumerate(parts):
        out.append((op if i == 0 else ws_wire.CONT, part, i == len(parts) - 1))
        if i < len(parts) - 1 and draw(st.booleans()):
            c_op, c_payload = draw(controls)
            out.append((c_op, c_payload, True))
    return out


@st.composite
def streams(draw: st.DrawFn, *, masked: bool = True) -> tuple[list[bytes], list[bytes]]:
    """(frames, their payloads) of a valid stream, masked as a client's or not."""
    frames: list[bytes] = []
    payloads: list[bytes] = []
    for message in draw(st.lists(st.one_of(messages(), controls.map(lambda c: [(*c, True)])), max_size=8)):
        for op, payload, fin in message:
            frames.append(build(op, payload, fin=fin, key=draw(keys) if masked else None))
            payloads.append(payload)
    if draw(st.booleans()):
        code = draw(st.sampled_from([1000, 1001, 3000, 4999]))
        frames.append(
            build(
                ws_wire.CLOSE, struct.pack("!H", code) + b"bye", fin=True, key=draw(keys) if masked else None
            )
        )
        payloads.append(struct.pack("!H", code) + b"bye")
    return frames, payloads


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=12).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)]
    )


def read(chunks: list[bytes], reader: ws_wire.FrameReader) -> tuple[list[bytes], str]:
    """(every frame delivered, the error's kind and text or "")."""
    got: list[bytes] = []
    for chunk in chunks:
        try:
            got += [f.raw for f in reader.feed(chunk)]
        except ws_wire.ProtocolError as exc:
            return got + [f.raw for f in exc.frames], f"{type(exc).__name__}: {exc}"
        assert reader.pending <= CAP + 14  # an unfinished frame is never above the cap
    return got, ""


@FUZZ
@given(st.data(), streams())
def test_any_split_of_a_valid_stream_yields_the_same_frames(
    data: st.DataObject, stream: tuple[list[bytes], list[bytes]]
) -> None:
    frames, payloads = stream
    whole = b"".join(frames)
    chunks = data.draw(splits(whole))
    budget = ws_wire.Budget(1 << 20)
    reader = ws_wire.FrameReader(CAP, masked=True, budget=budget)
    got: list[ws_wire.Frame] = []
    for chunk in chunks:
        got += reader.feed(chunk)
        assert budget.used == reader.pending
    assert [f.raw for f in got] == frames and [f.payload() for f in got] == payloads
    assert reader.pending == 0 and budget.used == 0


mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
        st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("cut"), st.integers(0, 10_000), st.integers(1, 40)),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, changes: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for kind, at, arg in changes:
        if not out:
            out += b"\x00"
        i = at % len(out)
        if kind == "flip":
            out[i] ^= arg
        elif kind == "insert":
            out[i:i] = arg
        else:
            del out[i : i + arg]
    return bytes(out)


@FUZZ
@given(st.data(), streams(), mutations, st.booleans())
def test_a_mutated_stream_gives_the_same_verdict_from_any_split(
    data: st.DataObject, stream: tuple[list[bytes], list[bytes]], changes: Any, masked: bool
) -> None:
    bad = mutate(b"".join(stream[0]), changes)
    whole = read([bad], ws_wire.FrameReader(CAP, masked=masked))  # raises nothing but ProtocolError
    assert read(data.draw(splits(bad)), ws_wire.FrameReader(CAP, masked=masked)) == whole


@FUZZ
@given(st.data(), st.lists(streams(), min_size=3, max_size=3), mutations)
def test_unfinished_frames_across_readers_stay_within_the_budget(
    data: st.DataObject, streams3: list[tuple[list[bytes], list[bytes]]], changes: Any
) -> None:
    budget = ws_wire.Budget(data.draw(st.integers(1, 2 * CAP)))
    readers = [ws_wire.FrameReader(CAP, masked=True, budget=budget) for _ in range(3)]
    feeds = [data.draw(splits(mutate(b"".join(s[0]), changes))) for s in streams3]
    order = data.draw(st.lists(st.integers(0, 2), max_size=40)) + [0, 1, 2] * 13
    for i in order:  # the readers' chunks, interleaved
        if not feeds[i]:
            continue
        try:
            readers[i].feed(feeds[i].pop(0))
        except ws_wire.ProtocolError:
            feeds[i] = []
        assert budget.used == sum(r.pending for r in readers) <= budget.cap
        assert all(r.pending <= CAP + 14 for r in readers)
    for r in readers:
        r.close()
    assert budget.used == 0


# -- the relay's handling of a client's frames ------------------------------------------------
class Wire:
    """A fake transport (the client's connection, or upstream): what the gateway writes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def fake_session(state: str, loop: asyncio.AbstractEventLoop) -> tuple[_Session, Any, Wire, Wire]:
    cfg = Config.model_validate({"streaming": {"buffer_bytes": 4000, "terminate_wait_s": 0.01}})
    metrics = Metrics(CollectorRegistry())
    relay: Any = SimpleNamespace(
        _s=cfg.streaming,
        _budget=ws_wire.Budget(6000),
        _metrics=metrics,
        _frames_audio=metrics.child(metrics.session_frames, "audio"),
        _frames_message=metrics.child(metrics.session_frames, "message"),
        _frames_termination=metrics.child(metrics.session_frames, "termination"),
    )
    client, up = Wire(), Wire()
    request: Any = SimpleNamespace(transport=client, headers={})
    session = _Session(relay, request, owner="fuzz", max_wait_s=1.0)
    session.state = state
    session.queued = state == WAITING  # as while it waits for admission
    if state == RELAYING:
        upstream = ws_wire.Upstream(1 << 20)
        upstream.transport = up  # type: ignore[assignment]
        session.upstream = upstream
    return session, relay, client, up


# The gateway's own codes, and any a client may send (3000-4999), which it echoes as RFC 6455
# asks: a mutated 4999 is still a client's code (a fuzz run found 4743).
CLOSE_CODES = {1000, 1001, 1002, 1007, 1008, 1009, *range(3000, 5000)}


@settings(FUZZ, max_examples=200)
@given(st.data(), streams(), st.one_of(st.just([]), mutations), st.sampled_from([WAITING, RELAYING]))
def test_the_relay_handles_any_client_stream_within_its_rules(
    data: st.DataObject, stream: tuple[list[bytes], list[bytes]], changes: Any, state: str
) -> None:
    raw = b"".join(stream[0])
    chunks = data.draw(splits(mutate(raw, changes) if changes else raw))
    parsed: list[int] = []
    kind = streaming_relay._kind

    def counting_kind(text: bytes) -> str:
        parsed.append(len(text))
        return kind(text)

    loop = asyncio.new_event_loop()
    streaming_relay._kind = counting_kind  # type: ignore[assignment]
    try:

        async def run() -> tuple[_Session, Any, Wire, Wire]:
            session, relay, client, up = fake_session(state, loop)
            for chunk in chunks:
                assert session.leg.feed_data(chunk) == (False, b"")  # never raises
                assert relay._budget.used == session.backlog_bytes + session.leg.reader.pending
            for _ in range(3):
                await asyncio.sleep(0)  # the gateway's own Terminate, if it sends one
            for task in list(session.tasks):
                task.cancel()
            if session.give_up is not None:
                session.give_up.cancel()
            await asyncio.gather(*session.tasks, return_exceptions=True)
            return session, relay, client, up

        session, relay, client, up = loop.run_until_complete(run())
    finally:
        streaming_relay._kind = kind  # type: ignore[assignment]
        loop.close()
    assert all(n <= streaming_relay.READ_MAX for n in parsed)
    # What the client got: well-formed server frames, and a close code among the documented.
    answers = ws_wire.FrameReader(1 << 20, masked=False).feed(bytes(client.data))
    for f in answers:
        if f.opcode == ws_wire.CLOSE:
            assert ws_wire.check_close(f.payload())[0] in CLOSE_CODES
    # What went upstream: a well-formed client stream (no orphan continuation, no message
    # opened inside another, even around the gateway's own Terminate).
    sent = ws_wire.FrameReader(1 << 20, masked=True).feed(bytes(up.data))
    assert sum(len(f.raw) for f in sent) == len(up.data)
    session.release()
    assert relay._budget.used == 0
