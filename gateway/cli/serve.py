"""``aai-gateway serve`` and ``aai-gateway demo``: the gateway run until a signal, its
listening sockets bound first, SIGHUP turned into a reload; the demo puts the upstream
simulator beside it in the same process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from ..app import RELOADER, build_app
from ..config import Config, ConfigError, load_config
from ..logs import AccessLogger, setup_logging
from ..reload import RELOAD_PATH, masked
from ..tls import SERVED_TLS, TlsError, server_context
from ..vault import ENV as SECRET_ENV
from ..vault import SecretError
from .listen import ListenError, bind, hostport, run, urls
from .sim import DEFAULT_SIM_PORT

log = logging.getLogger("gateway")

CUT_WAIT_S = 1.0


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
    from ..app import STORE, redis_client

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
            urls(socks, "https" if served_tls else "http"),
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
            # The grace is waited in lifecycle.py's drain; this is how long aiohttp then gives the
            # requests still in progress (twice: before and after cancelling them).
            shutdown_timeout=CUT_WAIT_S,
        )


def cmd_serve(args: argparse.Namespace) -> int:
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


def _bind_sim(port: int | None) -> socket.socket:
    """The demo simulator's socket: ``port`` if given (else ``ListenError``), else 8099, or
    any free port if 8099 is taken (the simulator's address is the demo's own business)."""
    if port is not None:
        return bind("127.0.0.1", port, "choose another with --sim-port (or leave it out)")[0]
    try:
        return bind("127.0.0.1", DEFAULT_SIM_PORT, "")[0]
    except ListenError:
        return bind("127.0.0.1", 0, "")[0]


def cmd_demo(args: argparse.Namespace) -> int:
    """The gateway in front of the simulator, both in this process: no account, no network."""
    from ..sim.app import Sim, SimConfig, build_sim_app

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
    base = f"{scheme}://{hostport(config.listen.host, config.listen.port)}"
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
