"""Listening sockets for the commands that serve: bound before anything is logged, so a port
that cannot be had ends the command with one line (``ListenError``), and the loop that serves
on them until a signal, then shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..tls import ListenSite

log = logging.getLogger("gateway")


class ListenError(Exception):
    """An address the command cannot listen on; the message is the one line the user sees."""


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int, hint: str) -> list[socket.socket]:
    """Sockets bound to ``host``:``port`` (every address it resolves to), as asyncio's
    ``create_server`` would make them; not listening yet. ``ListenError`` (with ``hint``, what
    the user can change) if any of them cannot be bound; none is left open then."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {hostport(host, port)}: {exc.strerror}; {hint}") from None
    socks: list[socket.socket] = []
    where = hostport(host, port)
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            where = hostport(str(addr[0]), port)
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError as exc:
        for sock in socks:
            sock.close()
        reason = {
            errno.EADDRINUSE: "the address is already in use (another process holds it)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
            errno.EADDRNOTAVAIL: "that address is not one of this machine's",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {where}: {reason}; {hint}") from None
    return socks


def urls(socks: list[socket.socket], scheme: str = "http") -> str:
    return ", ".join(f"{scheme}://{hostport(*s.getsockname()[:2])}" for s in socks)


def run(
    app: web.Application,
    socks: list[socket.socket],
    *,
    tls: ssl.SSLContext | None,
    on_listening: Callable[[], None],
    **runner_args: Any,
) -> None:
    """``web.run_app`` on bound sockets, but through ``ListenSite`` (run_app offers no TLS
    handshake timeout): serve until SIGINT/SIGTERM, then shut down gracefully.

    run_app raises GracefulExit out of the loop and cleans up inside the cancelled main task;
    aiohttp then cuts the wait for requests in progress short (a cancelling task re-raises at
    its timeout) and skips the app's cleanup. Here the signal only sets an event, and the
    cleanup runs in a task nobody cancelled: stop listening, the app's on_shutdown (lifecycle.py's
    drain: waiters handed back, sessions ended, up to shutdown_grace_s for the requests in
    progress), aiohttp's own wait (``shutdown_timeout``) and cancellation of what is left,
    then the app's cleanup. The handlers are removed first, so a second signal has its
    default effect (the process ends)."""
    loop = asyncio.new_event_loop()
    signals = [signal.SIGINT, signal.SIGTERM]

    async def main() -> None:
        runner = web.AppRunner(app, handle_signals=False, **runner_args)
        await runner.setup()
        stop = asyncio.Event()
        got: list[str] = []

        def on_signal(sig: signal.Signals) -> None:
            got.append(sig.name)
            stop.set()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            for sock in socks:
                await ListenSite(runner, sock, ssl_context=tls).start()
            on_listening()
            await stop.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            if got:
                log.info("%s received: shutting down gracefully", got[0])
            started = time.monotonic()
            await runner.cleanup()
            if got:
                log.info("shut down in %.1fs", time.monotonic() - started)

    task = loop.create_task(main())
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)
        rest = asyncio.all_tasks(loop)
        for left in rest:
            left.cancel()
        loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
