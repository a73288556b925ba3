"""WebSocket frames on the wire (RFC 6455): read at their boundaries, checked, and written;
ws_wire.py's docstring says why the relay forwards frames unchanged instead of decoding them.

- ``FrameReader``: bytes in, whole frames out (``Frame``), checked (RFC 6455 section 5), with
  a size cap and, optionally, an instance-wide ``Budget`` for unfinished frames;
- ``check_close()``: a received Close frame's code and reason, as RFC 6455 7.4 allows them;
- ``frame()`` / ``close_frame()``: frames the gateway writes itself (masked towards upstream);
- ``accept_key()``: the server handshake's ``Sec-WebSocket-Accept``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass

# _mask is aiohttp's (or the fallback), imported below: named here so ws_wire.py may re-export it.
__all__ = [
    "BINARY",
    "CLOSE",
    "CONT",
    "GUID",
    "PING",
    "PONG",
    "TEXT",
    "Budget",
    "Frame",
    "FrameReader",
    "FrameTooLarge",
    "InvalidText",
    "OverBudget",
    "ProtocolError",
    "_mask",
    "_mask_python",
    "accept_key",
    "check_close",
    "close_frame",
    "frame",
    "parse_close",
    "unmask",
    "valid_close_code",
]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class ProtocolError(Exception):
    """The peer broke RFC 6455: the connection fails, closed with ``code``. ``frames``: the
    whole frames read before the bad one (the caller may still act on them)."""

    code = 1002  # protocol error

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.frames: list[Frame] = []


class FrameTooLarge(ProtocolError):
    code = 1009  # message too big


class OverBudget(ProtocolError):
    """An unfinished frame would take the instance past its cap on bytes held for its peers."""

    code = 1008  # policy violation


class InvalidText(ProtocolError):
    code = 1007  # not UTF-8 where UTF-8 is required (a close reason)


@dataclass(slots=True)
class Frame:
    opcode: int
    fin: bool
    raw: bytes  # the whole frame as received, header included
    head: int  # header length (mask key included)
    masked: bool

    def payload(self) -> bytes:
        """The payload, unmasked (only for the small frames the relay must read)."""
        data = self.raw[self.head :]
        if not self.masked or not data:
            return data
        return unmask(data, self.raw[self.head - 4 : self.head])

    @property
    def size(self) -> int:
        return len(self.raw) - self.head


def unmask(data: bytes, key: bytes) -> bytes:
    """RFC 6455 5.3 masking (its own inverse), in C: aiohttp's Cython ``websocket_mask``."""
    buf = bytearray(data)
    _mask(key, buf)
    return bytes(buf)


def _mask_python(mask: bytes, data: bytearray) -> None:  # only when aiohttp's is missing
    n = len(data)
    stream = (mask * (n // 4 + 1))[:n]
    data[:] = (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


try:
    from aiohttp._websocket.helpers import websocket_mask as _mask  # masks a bytearray in place
except ImportError:  # pragma: no cover
    _mask = _mask_python


def _first_byte_error(b0: int) -> str:
    """What is wrong with a frame's first byte (FIN, RSV1-3, opcode), or ""."""
    op = b0 & 0x0F
    if b0 & 0x70:
        return "RSV bits set, but no extension was negotiated"
    if 3 <= op <= 7 or op >= 0xB:
        return f"reserved opcode {op:#x}"
    if op >= 8 and not b0 & 0x80:
        return "a fragmented control frame"
    return ""


_B0_ERROR = tuple(_first_byte_error(b) for b in range(256))  # one lookup per frame


class Budget:
    """Bytes held for peers across all the connections of an instance, under a cap."""

    __slots__ = ("cap", "used")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.cap:
            return False
        self.used += n
        return True

    def force(self, n: int) -> None:
        """Held regardless of the cap (a few bytes that must never be dropped)."""
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n


class FrameReader:
    """Incremental: ``feed(chunk)`` returns the frames the chunk completed, checked as RFC
    6455 section 5 requires of a peer that negotiated no extension: no RSV bit, no reserved
    opcode, control frames final and at most 125 bytes, continuation frames only inside a
    fragmented message and no new message inside one, and every frame masked (``masked=True``:
    a server reading its client) or none (``masked=False``: a client reading its server;
    ``None``: not checked). A bad frame raises ``ProtocolError`` (``FrameTooLarge`` over
    ``max_frame``; ``OverBudget`` when an unfinished frame's bytes cannot be held within
    ``budget``), and so does every feed after it. Only frame headers are read."""

    __slots__ = ("_buf", "_max", "_need", "_mask_bit", "_open", "_budget", "_held", "_error")

    def __init__(self, max_frame: int, *, masked: bool | None = None, budget: Budget | None = None) -> None:
        self._buf = bytearray()  # an incomplete frame
        self._max = max_frame
        self._need = 0  # bytes the incomplete frame still lacks, when its header is known
        self._mask_bit = -1 if masked is None else (0x80 if masked else 0)
        self._open = False  # inside a fragmented message
        self._budget = budget
        self._held = 0  # bytes of _buf counted in the budget
        self._error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise type(self._error)(str(self._error))
        if self._buf:
            if len(self._buf) + len(data) < self._need:  # still unfinished: held
                if not self._hold(len(data)):
                    raise self._fail(OverBudget("the gateway holds too many unfinished frames"), [])
                self._buf += data  # a large frame arriving in many chunks: no quadratic copying
                return []
            self._buf += data
            buf: bytes = bytes(self._buf)
            self._buf.clear()
            self._release()
        else:
            buf = data
        self._need = 0
        out: list[Frame] = []
        pos, total = 0, len(buf)
        while total - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            error = _B0_ERROR[b0]
            if error:
                raise self._fail(ProtocolError(error), out)
            if self._mask_bit >= 0 and (b1 & 0x80) != self._mask_bit:
                error = "an unmasked client frame" if self._mask_bit else "a masked server frame"
                raise self._fail(ProtocolError(error), out)
            op = b0 & 0x0F
            length, head = b1 & 0x7F, 2
            if op >= 8:
                if length > 125:
                    raise self._fail(ProtocolError("a control frame over 125 bytes"), out)
            elif (op == CONT) != self._open:
                error = "a continuation frame outside a message" if op == CONT else "a new message inside one"
                raise self._fail(ProtocolError(error), out)
            if length == 126:
                if total - pos < 4:
                    break
                (length,) = struct.unpack_from("!H", buf, pos + 2)
                head = 4
            elif length == 127:
                if total - pos < 10:
                    break
                (length,) = struct.unpack_from("!Q", buf, pos + 2)
                head = 10
            if length > self._max:
                raise self._fail(FrameTooLarge(f"a frame of {length} bytes (the cap is {self._max})"), out)
            masked = bool(b1 & 0x80)
            if masked:
                head += 4
            end = pos + head + length
            if end > total:
                self._need = end - pos
                break
            raw = buf if (pos == 0 and end == total) else buf[pos:end]
            fin = bool(b0 & 0x80)
            if op < 8:
                self._open = not fin
            out.append(Frame(op, fin, raw, head, masked))
            pos = end
        if pos < total:
            if not self._hold(total - pos):
                raise self._fail(OverBudget("the gateway holds too many unfinished frames"), out)
            self._buf += memoryview(buf)[pos:]
        return out

    def _hold(self, n: int) -> bool:
        if self._budget is not None:
            if not self._budget.take(n):
                return False
            self._held += n
        return True

    def _release(self) -> None:
        if self._budget is not None and self._held:
            self._budget.give(self._held)
        self._held = 0

    def _fail(self, exc: ProtocolError, frames: list[Frame]) -> ProtocolError:
        exc.frames = frames
        self._error = exc
        self.close()
        return exc

    def close(self) -> None:
        """Drop the unfinished frame (its bytes leave the budget); safe to call again."""
        self._buf = bytearray()
        self._need = 0
        self._release()

    @property
    def pending(self) -> int:
        return len(self._buf)


def frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; masked (with a fresh random key) when the gateway is the client."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, bit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + (unmask(payload, key) if payload else b"")


def close_frame(code: int, reason: str = "", *, mask: bool) -> bytes:
    """A Close frame; its reason cut to the 123 bytes a control frame allows, never inside a
    UTF-8 character (a client must reject a reason that is not valid UTF-8)."""
    text = reason.encode()[:123].decode(errors="ignore").encode()
    payload = struct.pack("!H", code) + text if code not in (1005, 1006) else b""
    return frame(CLOSE, payload, mask=mask)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Lenient: (code, reason) of any Close body; 1005 when it has none."""
    if len(payload) < 2:
        return 1005, ""
    (code,) = struct.unpack_from("!H", payload)
    return code, payload[2:].decode(errors="replace")


def valid_close_code(code: int) -> bool:
    """A code an endpoint may send (RFC 6455 7.4 and IANA's registry): 1000-1003, 1007-1014,
    and 3000-4999 (registered and private use). Never 1004-1006 or 1015, nor anything else."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def check_close(payload: bytes) -> tuple[int, str]:
    """Strict: (code, reason) of a received Close body (1005 when it has none), or
    ``ProtocolError``: a 1-byte body, a code no endpoint may send; ``InvalidText`` (1007): a
    reason that is not UTF-8."""
    if not payload:
        return 1005, ""
    if len(payload) < 2:
        raise ProtocolError("a close frame with a 1-byte body")
    (code,) = struct.unpack_from("!H", payload)
    if not valid_close_code(code):
        raise ProtocolError(f"close code {code} is not one an endpoint may send")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise InvalidText("a close reason that is not UTF-8") from None


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
