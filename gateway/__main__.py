"""The command line: ``aai-gateway`` (or ``python -m gateway``).

aai-gateway serve [--config PATH]     run the gateway (embedded store unless redis.url is set)
aai-gateway check-config [PATH]       validate a config file; exit 1 with the key path on error
aai-gateway demo [--port N]           the gateway in front of the upstream simulator
aai-gateway gen-key                   print a new secret key (AAI_GATEWAY_SECRET_KEY)
aai-gateway keys new --project P --name N   print a new gateway key (managed mode) and its config line
aai-gateway sim [--port N]            the upstream simulator alone (tests, benchmarks)

A port that cannot be bound (another process holds it, no permission) ends the command at
once with one line on stderr and exit code 2, before anything is logged as listening; so does
a ``listen.tls`` certificate or key that cannot be served (the line names the key path,
``listen.tls.cert_file: ...``). ``check-config`` checks those files too (exit 1).

SIGHUP re-reads the config file (gateway/reload.py; so does ``POST /admin/v1/reload``).
SIGTERM (or SIGINT) shuts down gracefully: the listener stops accepting, waiting requests
are handed back (429 with Retry-After), streaming sessions are terminated, requests in
progress get ``shutdown_grace_s`` to finish, then the process exits 0. A second SIGTERM or
SIGINT during the grace ends the process at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import ValidationError

from .app import RELOADER, build_app
from .config import Config, ConfigError, Project, load_config
from .logs import AccessLogger, setup_logging
from .reload import RELOAD_PATH, config_hash, masked
from .tls import SERVED_TLS, ListenSite, TlsError, server_context
from .vault import ENV as SECRET_ENV
from .vault import SecretError

log = logging.getLogger("gateway")

DEFAULT_SIM_PORT = 8099
CUT_WAIT_S = 1.0


class ListenError(Exception):
    """An address the command cannot listen on; the message is the one line the user sees."""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind(host: str, port: int, hint: str) -> list[socket.socket]:
    """Sockets bound to ``host``:``port`` (every address it resolves to), as asyncio's
    ``create_server`` would make them; not listening yet. ``ListenError`` (with ``hint``, what
    the user can change) if any of them cannot be bound; none is left open then."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {_hostport(host, port)}: {exc.strerror}; {hint}") from None
    socks: list[socket.socket] = []
    where = _hostport(host, port)
    try:
        for family, type_, proto, _, addr in dict.fromkeys(infos):
            where = _hostport(str(addr[0]), port)
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


def _urls(socks: list[socket.socket], scheme: str = "http") -> str:
    return ", ".join(f"{scheme}://{_hostport(*s.getsockname()[:2])}" for s in socks)


@contextmanager
def _sighup_ignored() -> Iterator[None]:
    """SIGHUP must not kill the gateway: ignored until the loop runs, then a reload."""
    if not hasattr(signal, "SIGHUP"):
        yield
        return
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


async def _reload_on_sighup(app: web.Application) -> None:
    if hasattr(signal, "SIGHUP"):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, app[RELOADER].reload_logged, "SIGHUP")


def _use_fast_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _warn_eviction(app: web.Application, config: Config) -> None:
    from .app import STORE, redis_client

    client = redis_client(app[STORE])
    if client is None:
        return
    try:
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
    except Exception:
        log.info(
            "could not read Redis's maxmemory-policy (CONFIG may be disabled); make sure it is noeviction"
        )
        return
    if policy not in (None, "noeviction"):
        log.warning(
            "Redis maxmemory-policy is %r: under memory pressure Redis may evict the gateway's lease keys "
            "(which carry TTLs) and let the account exceed its limits; set maxmemory-policy noeviction",
            policy,
        )


def freeze_startup_heap() -> None:
    """Move everything allocated while starting (modules, config, the app: ~65,000 objects)
    out of the garbage collector's sight. A full collection otherwise walks them all, a pause
    of tens of milliseconds that every frame of every open streaming session waits behind
    (bench/streaming_sessions.py); freezing halves it."""
    gc.collect()
    gc.freeze()


def serve(
    config: Config,
    *,
    load: Callable[[], Config] | None = None,
    announce: str = "",
    companion: web.Application | None = None,
    companion_sock: socket.socket | None = None,
    port_hint: str = "choose another with listen.port in the config (or $AAI_GATEWAY_PORT)",
) -> None:
    """Run the gateway until SIGINT/SIGTERM. ``load`` re-reads the config on a reload (the
    file it came from, the same environment). ``companion`` (the demo's simulator) runs beside
    it, on ``companion_sock``. ``TlsError`` if ``listen.tls`` cannot be served, ``ListenError``
    if the port is taken (both before anything is logged)."""
    served_tls = server_context(config.listen.tls) if config.listen.tls is not None else None
    socks = bind(config.listen.host, config.listen.port, port_hint)
    secrets = [os.environ.get(SECRET_ENV, ""), os.environ.get(config.admin.token_env, "")]
    if config.managed:  # the account's key: masked in every log line, whatever logs it
        secrets.append(os.environ.get(config.upstream.api_key_env, ""))
    if config.redis.url:
        secrets.append(urlsplit(config.redis.url).password or "")
    setup_logging(config.log.level, secrets, fmt=config.log.format)
    for warning in config.warnings():
        log.warning("config: %s", warning)
    loop_name = _use_fast_loop()
    try:
        app = build_app(config, load=load)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if served_tls is not None:
        app[SERVED_TLS] = served_tls  # for the reload: reload_tls(app[SERVED_TLS], new.listen.tls)
    if companion is not None and companion_sock is not None:
        sim_sock = companion_sock

        async def companion_ctx(app: web.Application) -> Any:
            runner = web.AppRunner(companion, access_log=None)
            await runner.setup()
            await web.SockSite(runner, sim_sock).start()
            yield
            await runner.cleanup()

        app.cleanup_ctx.insert(0, companion_ctx)
    store = "embedded (in-process; limits hold for ONE instance only)"
    if config.redis.url:
        store = f"redis {masked(config.redis.url)}"

    async def on_start(app: web.Application) -> None:
        await _warn_eviction(app, config)
        freeze_startup_heap()

    def listening() -> None:
        """Called once every socket is listening."""
        log.info(
            "aai-gateway listening on %s (store: %s; plan: %s; loop: %s; config %s)",
            _urls(socks, "https" if served_tls else "http"),
            store,
            config.limits.plan,
            loop_name,
            app[RELOADER].hash,
        )
        token_env = config.admin.token_env
        admin = "on" if os.environ.get(token_env) else f"off (set ${token_env} to open it)"
        if config.managed:
            keys = sum(len(p.keys) for p in config.projects)
            log.info("managed mode: %d projects, %d keys in the config; upstream key from $%s",
                     len(config.projects), keys, config.upstream.api_key_env)  # fmt: skip
        log.info("reload: SIGHUP; POST %s %s", RELOAD_PATH, admin)
        if served_tls is not None:
            log.info("TLS: %s", served_tls.describe())
        if announce:
            print(announce, file=sys.stderr, flush=True)

    app.on_startup.insert(0, _reload_on_sighup)
    app.on_startup.append(on_start)
    with _sighup_ignored():
        run(
            app,
            socks,
            tls=served_tls.context if served_tls else None,
            on_listening=listening,
            handler_cancellation=True,  # a client that disconnects cancels its handler (and its wait)
            access_log_class=AccessLogger,
            access_log=logging.getLogger("gateway.access") if config.log.access_log else None,
            # The grace is waited in app.py's drain; this is how long aiohttp then gives the
            # requests still in progress (twice: before and after cancelling them).
            shutdown_timeout=CUT_WAIT_S,
        )


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
    cleanup runs in a task nobody cancelled: stop listening, the app's on_shutdown (app.py's
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


def _cmd_serve(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("AAI_GATEWAY_CONFIG")
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"aai-gateway: invalid config\n{exc}", file=sys.stderr)
        return 2
    try:
        serve(config, load=partial(load_config, path))
    except (SecretError, ListenError, TlsError, ConfigError) as exc:
        print(f"aai-gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    path = args.path or os.environ.get("AAI_GATEWAY_CONFIG")
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    lim = config.limits
    print(f"{path or '<defaults>'}: ok")
    print(
        f"  store: {'redis ' + masked(config.redis.url) if config.redis.url else 'embedded (one instance)'}"
    )
    llm = "unavailable (free plan)"
    if lim.llm_available:
        llm = f"{lim.llm_requests.limit}/{lim.llm_requests.window_s:g}s per model"
    streaming = f"{lim.streaming_sessions.limit}/{lim.streaming_sessions.window_s:g}s"
    print(f"  plan: {lim.plan}; requests {lim.requests.limit}/{lim.requests.window_s:g}s")
    print(f"  async {lim.async_concurrency} at once; streaming {streaming}; llm {llm}")
    print(f"  config hash: {config_hash(config)} (what /readyz shows once it runs)")
    if config.listen.tls is not None:
        try:
            print(f"  tls: {server_context(config.listen.tls).describe()}")
        except TlsError as exc:
            print(f"{path or '<defaults>'}: {exc}", file=sys.stderr)
            return 1
    for warning in config.warnings():
        print(f"{path or '<defaults>'}: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_gen_key(args: argparse.Namespace) -> int:
    from .vault import generate_key

    print(generate_key())
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from .identity import key_digest, new_key

    try:
        Project.model_validate({"name": args.project, "keys": [{"name": args.name, "sha256": "0" * 64}]})
    except ValidationError as exc:
        print(f"aai-gateway: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2
    key = new_key()
    print("The key (shown once: give it to the client; the gateway keeps only its hash):")
    print(f"  {key}")
    print(f"Add it to the config under the project {args.project!r} (then SIGHUP or POST /admin/v1/reload):")
    print("projects:")
    print(f"  - name: {args.project}")
    print("    keys:")
    print(f'      - {{name: {json.dumps(args.name)}, sha256: "{key_digest(key)}"}}')
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from .sim.app import Sim, SimConfig, build_sim_app

    try:
        socks = bind(args.host, args.port, "choose another with --port")
    except ListenError as exc:
        print(f"aai-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging("warning")
    overrides: dict[str, Any] = json.loads(args.sim_config) if args.sim_config else {}
    web.run_app(build_sim_app(Sim(SimConfig.from_dict(overrides))), sock=socks, print=None)
    return 0


def _bind_sim(port: int | None) -> socket.socket:
    """The demo simulator's socket: ``port`` if given (else ``ListenError``), else 8099, or
    any free port if 8099 is taken (the simulator's address is the demo's own business)."""
    if port is not None:
        return bind("127.0.0.1", port, "choose another with --sim-port (or leave it out)")[0]
    try:
        return bind("127.0.0.1", DEFAULT_SIM_PORT, "")[0]
    except ListenError:
        return bind("127.0.0.1", 0, "")[0]


def _cmd_demo(args: argparse.Namespace) -> int:
    """The gateway in front of the simulator, both in this process: no account, no network."""
    from .sim.app import Sim, SimConfig, build_sim_app

    try:
        sim_sock = _bind_sim(args.sim_port)
    except ListenError as exc:
        print(f"aai-gateway: {exc}", file=sys.stderr)
        return 2
    sim_port = sim_sock.getsockname()[1]
    sim_url = f"http://127.0.0.1:{sim_port}"
    environ = {
        **os.environ,
        "AAI_GATEWAY_API_URL": sim_url,
        "AAI_GATEWAY_LLM_URL": sim_url,
        "AAI_GATEWAY_STREAMING_URL": f"ws://127.0.0.1:{sim_port}",
        "AAI_GATEWAY_PORT": str(args.port),
    }
    try:
        config = load_config(args.config, environ=environ)
    except ConfigError as exc:
        sim_sock.close()
        print(f"aai-gateway: invalid config\n{exc}", file=sys.stderr)
        return 2
    scheme = "https" if config.listen.tls else "http"
    base = f"{scheme}://{_hostport(config.listen.host, config.listen.port)}"
    try:
        serve(
            config,
            load=partial(load_config, args.config, environ=environ),
            companion=build_sim_app(Sim(SimConfig(job_seconds=3.0))),
            companion_sock=sim_sock,
            port_hint="choose another with --port",
            announce=(
                f"\n  demo: the upstream simulator answers on {sim_url} (any API key works)\n"
                f"  try:  export ASSEMBLYAI_BASE_URL={base} ASSEMBLYAI_LLM_GATEWAY_BASE_URL={base} "
                "ASSEMBLYAI_API_KEY=demo-key\n"
                '        python -c "import assemblyai as aai; '
                "print(aai.Transcriber().transcribe('https://example.com/a.mp3').text)\"\n"
                f"        curl -s {base}/metrics | grep aai_gateway_admissions\n"
            ),
        )
    except (SecretError, ListenError, TlsError) as exc:
        sim_sock.close()
        print(f"aai-gateway: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aai-gateway",
        description="Keeps a shared AssemblyAI account inside its limits.",
        epilog="Exit codes: 0 ok; 1 check-config found errors; 2 bad config, missing secret or a port "
        "that cannot be bound.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("serve", help="run the gateway", description="Run the gateway until SIGINT/SIGTERM "
                       "(graceful, within shutdown_grace_s); SIGHUP reloads the config.")  # fmt: skip
    p.add_argument(
        "--config",
        metavar="PATH",
        help="YAML config file (default: built-in defaults, or $AAI_GATEWAY_CONFIG)",
    )
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: exit 1 with each error and its key path on stderr; "
        "warnings (valid but probably unintended values) are printed on stderr with exit 0.",
    )
    p.add_argument("path", nargs="?", help="YAML config file (default: $AAI_GATEWAY_CONFIG, or the defaults)")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser(
        "demo",
        help="the gateway in front of the upstream simulator",
        description="The gateway in front of the upstream simulator, both in this process: no account, "
        "no network.",
    )
    p.add_argument(
        "--config", metavar="PATH", help="YAML config file (its upstream URLs and port are replaced)"
    )
    p.add_argument("--port", type=int, default=8080, help="the gateway's port (default: 8080)")
    p.add_argument(
        "--sim-port",
        type=int,
        default=None,
        help=f"the simulator's port (default: {DEFAULT_SIM_PORT}, or any free port if that one is taken)",
    )
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("gen-key", help="print a new AAI_GATEWAY_SECRET_KEY")
    p.set_defaults(func=_cmd_gen_key)
    p = sub.add_parser("keys", help="gateway keys (managed mode)")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION", help="new: a new key")
    p = keys.add_parser(
        "new",
        help="print a new gateway key and the config line that admits it",
        description="Print a new random gateway key (256 bits) once, and the line to paste into the "
        "config's projects: the file holds only the key's SHA-256.",
    )
    p.add_argument("--project", required=True, help="the project it belongs to ([a-z0-9-]+)")
    p.add_argument("--name", required=True, help="a name for the key (e.g. backend, ci)")
    p.set_defaults(func=_cmd_keys_new)
    p = sub.add_parser("sim", help="run the upstream simulator alone")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_SIM_PORT, help=f"port (default: {DEFAULT_SIM_PORT})")
    p.add_argument("--sim-config", help='JSON overrides, e.g. {"requests_limit": 50, "requests_window_s": 2}')
    p.set_defaults(func=_cmd_sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
