"""A fast stand-in streaming upstream for bench/streaming_sessions.py.

``GET /v3/ws`` speaks just enough of streaming v3 for the benchmark: after the handshake it
sends ``Begin``; every binary frame counts as 50 ms of audio, and every ``--echo-every``-th
one is answered with a small ``Turn`` message carrying the frame's first 8 bytes (the load
generator's send time, a little-endian float64) back as ``"t"``, which is how the load
generator measures round trips; ``Terminate`` gets ``Termination`` (with the audio and
session durations) and a 1000 close; pings get pongs. ``GET /healthz`` answers ``ok``. No
limits, no transcription: the benchmark measures the relay, not this server.

It is a raw asyncio protocol on uvloop, framing with the gateway's own gateway/products/
ws_wire.py, so that it costs as little CPU as possible on a machine shared by the load
generator and the gateway; the direct baseline and the gateway's run use it alike.

Run alone:  python bench/ws_upstream.py --port 8198
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's gateway package

from gateway.proxy import ws_wire  # noqa: E402

FRAME_S = 0.05


class Session(asyncio.Protocol):
    def __init__(self, echo_every: int) -> None:
        self.echo_every = echo_every
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.reader: ws_wire.FrameReader | None = None
        self.frames = 0
        self.opened = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self._handshake(data)
            return
        for f in self.reader.feed(data):
            if f.opcode == ws_wire.BINARY:
                self.frames += 1
                if self.frames % self.echo_every == 0:
                    key = f.raw[f.head - 4 : f.head] * 2 if f.masked else bytes(8)
                    stamp = bytes(a ^ b for a, b in zip(f.raw[f.head : f.head + 8], key, strict=True))
                    (sent,) = struct.unpack("<d", stamp)
                    self.send(ws_wire.TEXT, f'{{"type":"Turn","end_of_turn":false,"t":{sent!r}}}'.encode())
            elif f.opcode == ws_wire.TEXT and b"Terminate" in f.payload():
                done = {
                    "type": "Termination",
                    "audio_duration_seconds": round(self.frames * FRAME_S, 3),
                    "session_duration_seconds": round(time.monotonic() - self.opened, 3),
                }
                self.send(ws_wire.TEXT, json.dumps(done).encode())
                self.close(1000)
            elif f.opcode == ws_wire.PING:
                self.send(ws_wire.PONG, f.payload())
            elif f.opcode == ws_wire.CLOSE:
                self.close(ws_wire.parse_close(f.payload())[0])

    def _handshake(self, data: bytes) -> None:
        assert self.transport is not None
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.head[:end].decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
        if path.startswith("/healthz"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            self.transport.close()
            return
        key = headers.get("sec-websocket-key")
        if not path.startswith("/v3/ws") or not key:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.close()
            return
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {ws_wire.accept_key(key)}\r\n\r\n"
            ).encode()
        )
        self.reader = ws_wire.FrameReader(8 * 1024 * 1024)
        self.opened = time.monotonic()
        begin = {"type": "Begin", "id": "bench", "expires_at": int(time.time()) + 10800}
        self.send(ws_wire.TEXT, json.dumps(begin).encode())
        rest = self.head[end + 4 :]
        self.head = b""
        if rest:
            self.data_received(rest)

    def send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ws_wire.frame(opcode, payload, mask=False))

    def close(self, code: int) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ws_wire.close_frame(code, mask=False))
            self.transport.close()


async def serve(host: str, port: int, echo_every: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Session(echo_every), host, port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8198)
    ap.add_argument("--echo-every", type=int, default=4, help="answer every Nth audio frame")
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port, args.echo_every))


if __name__ == "__main__":
    main()
