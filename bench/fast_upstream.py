"""A fast stand-in upstream for the proxy-overhead benchmark (bench/proxy_overhead.py).

It answers, over HTTP/1.1 keep-alive, with small canned JSON bodies and nothing else:

    GET  /v2/transcript/{id}       200, ~300 bytes of transcript JSON
    POST /v1/chat/completions      200, a small chat completion (the request body is read, not parsed)
    anything else                  404

It is a raw asyncio protocol (no aiohttp server) on uvloop, so that the upstream costs as
little CPU as possible on a machine shared by the load generator, the proxy and Redis: the
benchmark measures the proxy, not this server. Request bodies may be sent with
Content-Length or chunked; pipelined requests are answered in order.

Run alone:  python bench/fast_upstream.py --port 8199   (then: curl localhost:8199/v2/transcript/x)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import cast

TRANSCRIPT = json.dumps(
    {
        "id": "6f1c2b9e-4a7d-4a53-9d3e-2f0c1b7e8a90",
        "status": "completed",
        "audio_url": "https://example.com/audio/meeting-2024-05-01.mp3",
        "text": "Thanks everyone for joining. Let's get started with the quarterly review.",
        "language_code": "en_us",
        "audio_duration": 1843,
        "confidence": 0.94,
        "speech_model": "universal",
        "webhook_url": None,
    },
    separators=(",", ":"),
).encode()

CHAT = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "gpt-4.1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The meeting covered the quarterly review."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 512, "completion_tokens": 9, "total_tokens": 521},
    },
    separators=(",", ":"),
).encode()


def _response(status: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


OK_TRANSCRIPT = _response("200 OK", TRANSCRIPT)
OK_CHAT = _response("200 OK", CHAT)
NOT_FOUND = _response("404 Not Found", b'{"error":"not found"}')


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 server: request line, headers, Content-Length or chunked body."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while True:
            consumed = self._one(out)
            if consumed <= 0:
                break
            del self.buf[:consumed]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _one(self, out: list[bytes]) -> int:
        """Parse one complete request at the head of the buffer; bytes consumed, or 0."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        head = bytes(buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        length = 0
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        pos = end + 4
        if chunked:
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return 0
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                pos = eol + 2 + size + 2
                if pos > len(buf):
                    return 0
                if size == 0:
                    break
        else:
            pos += length
            if pos > len(buf):
                return 0
        path = target.split("?", 1)[0]
        if method == "GET" and path.startswith("/v2/transcript/"):
            out.append(OK_TRANSCRIPT)
        elif method == "POST" and path == "/v1/chat/completions":
            out.append(OK_CHAT)
        else:
            out.append(NOT_FOUND)
        return pos


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.host, args.port))
    else:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
