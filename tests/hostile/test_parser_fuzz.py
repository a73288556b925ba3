"""Property tests of the upstream response parser (gateway/proxy/http1.py: llhttp through
httptools, with the framing checks the client adds).

- A valid response, cut into any pieces, parses exactly as when it comes in one piece.
- Any response with ambiguous framing (two lengths, a length with chunked, a folded line, a
  coding other than chunked, a bare LF...) is refused, however it is cut.
- Random mutations of valid responses never raise out of the protocol, never leave it
  undecided once the connection ends, and never yield more body than the framing allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.proxy.http1 import MAX_HEAD, _Conn, parse_head

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Valid:
    raw: bytes
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # "length", "chunked", "close" or "none"
    version: str


NAMES = st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True)
VALUES = st.from_regex(r"([!-~]([ !-~]{0,30}[!-~])?)?", fullmatch=True)
INTERIM = st.sampled_from(
    [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"]
)


@st.composite
def valid_responses(draw: st.DrawFn) -> Valid:
    interim = b"".join(draw(st.lists(INTERIM, max_size=3)))
    status = draw(st.sampled_from([200, 201, 202, 204, 304, 400, 401, 404, 429, 500, 503]))
    version = draw(st.sampled_from(["1.1", "1.0"]))
    reason = draw(st.from_regex(r"[A-Za-z][A-Za-z ]{0,20}", fullmatch=True)).rstrip()
    headers = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    body = draw(st.binary(max_size=400))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if status in (204, 304):
        body, framing = b"", "none"
    wire = b""
    extra: list[tuple[str, str]] = []
    if framing == "length":
        extra = [("Content-Length", str(len(body)))]
        wire = body
    elif framing == "chunked":
        extra = [("Transfer-Encoding", draw(st.sampled_from(["chunked", "Chunked", "CHUNKED"])))]
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for piece in pieces:
            if piece:
                ext = draw(st.sampled_from([b"", b";a=1", b';name="v"']))
                wire += b"%x%b\r\n%b\r\n" % (len(piece), ext, piece)
        trailers = draw(st.sampled_from([b"", b"X-Trailer: t\r\n"]))
        wire += b"0\r\n" + trailers + b"\r\n"
    elif framing == "close":
        wire = body
    if version == "1.0" and framing != "close":
        extra.append(("Connection", "keep-alive"))
    order = draw(st.permutations(headers + extra))
    head = b"HTTP/%s %d %s\r\n" % (version.encode(), status, reason.encode())
    head += b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in order)
    return Valid(interim + head + b"\r\n" + wire, status, reason, list(order), body, framing, version)


def feed(raw: bytes, cuts: list[int], *, close: bool = True, head_only: bool = False) -> _Conn:
    conn = _Conn(("http", "h", 80, ""))
    conn.reset(head_only=head_only)
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    for a, b in zip(points, points[1:], strict=False):
        conn.data_received(raw[a:b])
        if conn.error is not None:
            break
    if close:
        conn.connection_lost(None)  # upstream closes: ends a body delimited by the close
    return conn


def body_of(conn: _Conn) -> bytes:
    return conn.take() if conn.chunks else b""


CUTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@FUZZ
@given(valid_responses(), CUTS)
def test_any_split_of_a_valid_response_parses_as_the_whole(v: Valid, cuts: list[int]) -> None:
    whole = feed(v.raw, [], close=v.framing == "close")
    split = feed(v.raw, cuts, close=v.framing == "close")
    for conn in (whole, split):
        assert conn.error is None, conn.error
        assert conn.head is not None and conn.eof
        status, reason, headers = conn.head
        assert (status, reason, list(headers.items())) == (v.status, v.reason, v.headers)
        assert conn.keep_alive == (v.framing != "close")
        assert not (conn.broken or conn.unfinished)
    assert body_of(whole) == body_of(split) == v.body


@FUZZ
@given(valid_responses(), CUTS)
def test_a_head_answer_has_no_body_whatever_its_headers_say(v: Valid, cuts: list[int]) -> None:
    conn = feed(v.raw, cuts, close=False, head_only=True)
    if conn.error is None:  # bytes past the head (the body a HEAD must not get) may be refused
        assert conn.head is not None and conn.head[0] == v.status and conn.eof and not conn.chunks


AMBIGUOUS = [
    b"Content-Length: 3\r\nContent-Length: 3\r\n",
    b"Content-Length: 3\r\nContent-Length: 30\r\n",
    b"Content-Length: 3, 3\r\n",
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked\r\n Content-Length: 3\r\n",  # folded
    b"X-A: a\r\n\tContent-Length: 3\r\n",  # folded with a tab
    b"Content-Length : 3\r\n",
    b"Content-Length: 3\nX-B: b\r\n",  # a bare LF
    b"Content-Length: +3\r\n",
    b"Content-Length: 0x3\r\n",
]


@FUZZ
@given(st.sampled_from(AMBIGUOUS), st.lists(NAMES, max_size=3), st.integers(0, 3), CUTS)
def test_ambiguous_framing_is_refused_however_it_is_cut(
    framing: bytes, names: list[str], at: int, cuts: list[int]
) -> None:
    lines = [b"%s: v\r\n" % n.encode() for n in names]
    lines.insert(min(at, len(lines)), framing)
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(lines) + b"\r\nabc" + b"0\r\n\r\n"
    conn = feed(raw, cuts, close=False)
    assert conn.error is not None and isinstance(conn.error, ConnectionError)
    assert not conn.reusable()
    with pytest.raises(ValueError):
        parse_head(raw.partition(b"\r\n\r\n")[0])


OPS = st.sampled_from(["flip", "insert", "delete", "dup"])
MUTATION = st.tuples(st.integers(0, 10_000), OPS, st.binary(min_size=1, max_size=4))


def mutate(raw: bytes, mutations: list[tuple[int, str, bytes]]) -> bytes:
    data = bytearray(raw)
    for pos, op, b in mutations:
        i = pos % (len(data) + 1)
        if op == "flip" and i < len(data):
            data[i] ^= b[0] or 1
        elif op == "insert":
            data[i:i] = b
        elif op == "delete":
            del data[i : i + len(b)]
        else:
            data[i:i] = data[i : i + 8 * len(b)]
    return bytes(data)


@FUZZ
@given(valid_responses(), st.lists(MUTATION, min_size=1, max_size=4), CUTS, st.booleans())
def test_mutated_responses_fail_only_as_documented_and_never_overrun_their_framing(
    v: Valid, mutations: list[tuple[int, str, bytes]], cuts: list[int], head_only: bool
) -> None:
    raw = mutate(v.raw, mutations)
    conn = feed(raw, cuts, close=False, head_only=head_only)  # never raises: errors are recorded
    assert conn.error is None or isinstance(conn.error, ConnectionError)
    body = body_of(conn)
    assert len(body) <= len(raw)
    if conn.head is not None:
        length = conn.head[2].get("Content-Length")
        if length is not None and conn.error is None:
            assert re.fullmatch(r"\d+", length) and len(body) <= int(length)
            assert "Transfer-Encoding" not in conn.head[2]
        if "Transfer-Encoding" in conn.head[2]:
            assert conn.head[2]["Transfer-Encoding"].lower() == "chunked"
    conn.connection_lost(None)  # the end: decided one way or the other, never left waiting
    assert conn.eof or conn.error is not None
    if not conn.eof or conn.error is not None:
        assert not conn.reusable()


@FUZZ
@given(st.binary(max_size=300) | valid_responses().map(lambda v: v.raw.partition(b"\r\n\r\n")[0]))
def test_parse_head_returns_a_head_or_raises_value_error(head: bytes) -> None:
    try:
        status, reason, headers, version = parse_head(head)
    except ValueError:
        return
    assert 100 <= status <= 999 and version in ("HTTP/1.1", "HTTP/1.0")
    assert len(headers.getall("Content-Length", [])) <= 1


def test_a_head_past_max_head_is_refused_whether_it_trickles_or_comes_whole() -> None:
    line = b"X-Big: " + b"a" * 1000 + b"\r\n"
    raw = b"HTTP/1.1 200 OK\r\n" + line * (MAX_HEAD // len(line) + 1)
    trickled = feed(raw, list(range(0, len(raw), 4096)), close=False)  # never ends
    whole = feed(raw + b"Content-Length: 0\r\n\r\n", [], close=False)
    for conn in (trickled, whole):
        assert conn.error is not None and conn.head is None
    assert feed(line * 8 + b"Content-Length: 0\r\n\r\n", [], close=False).error is not None  # no status


def test_endless_trailers_or_chunk_lines_are_refused() -> None:
    """llhttp holds a trailer line (or a chunk extension) until it ends: bounded by MAX_HEAD."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
    for endless in (b"0\r\nX-Trailer: " + b"a" * 80_000, b"5;ext=" + b"e" * 80_000):
        raw = head + endless
        conn = feed(raw, list(range(len(head), len(raw), 4096)), close=False)
        assert conn.error is not None and not conn.eof, endless[:10]
    fine = feed(head + b"0\r\nX-Trailer: t\r\n\r\n", [len(head) + 3], close=False)
    assert fine.error is None and fine.eof and fine.take() == b"ok"
