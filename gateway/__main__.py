"""The command line: ``aai-gateway`` (or ``python -m gateway``).

aai-gateway serve [--config PATH]     run the gateway (embedded store unless redis.url is set)
aai-gateway check-config [PATH]       validate a config file; exit 1 with the key path on error
aai-gateway demo [--port N]           the gateway in front of the upstream simulator
aai-gateway gen-key                   print a new secret key (AAI_GATEWAY_SECRET_KEY)
aai-gateway sim [--port N]            the upstream simulator alone (tests, benchmarks)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .app import build_app
from .config import Config, ConfigError, load_config
from .vault import SecretError

log = logging.getLogger("gateway")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def masked(url: str) -> str:
    """A Redis URL fit for a log line: any password (in the userinfo or the query) is ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        pairs = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(pairs, safe="*"))
    return urlunsplit(parts)


def _use_fast_loop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


class AccessLogger(AbstractAccessLogger):
    """Method, path (never the query string: it can carry a streaming token), status, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %s %.1fms', request.remote, request.method, request.path, response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return bool(self.logger.isEnabledFor(logging.INFO))


async def _warn_eviction(app: web.Application, config: Config) -> None:
    from .app import STORE

    client = getattr(app[STORE], "_client", None)
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
    config: Config, *, announce: str = "", companion: web.Application | None = None, companion_port: int = 0
) -> None:
    """Run the gateway until SIGINT/SIGTERM. ``companion`` (the demo's simulator) runs beside it."""
    _setup_logging(config.log.level)
    loop_name = _use_fast_loop()
    app = build_app(config)
    if companion is not None:

        async def companion_ctx(app: web.Application) -> Any:
            runner = web.AppRunner(companion, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", companion_port).start()
            yield
            await runner.cleanup()

        app.cleanup_ctx.insert(0, companion_ctx)
    store = "embedded (in-process; limits hold for ONE instance only)"
    if config.redis.url:
        store = f"redis {masked(config.redis.url)}"

    async def on_start(app: web.Application) -> None:
        await _warn_eviction(app, config)
        freeze_startup_heap()
        log.info(
            "aai-gateway listening on http://%s:%s (store: %s; plan: %s; loop: %s)%s",
            config.listen.host,
            config.listen.port,
            store,
            config.limits.plan,
            loop_name,
            announce,
        )

    app.on_startup.append(on_start)
    web.run_app(
        app,
        host=config.listen.host,
        port=config.listen.port,
        print=None,
        handler_cancellation=True,  # a client that disconnects cancels its handler (and its wait)
        access_log_class=AccessLogger,
        access_log=logging.getLogger("gateway.access") if config.log.access_log else None,
        shutdown_timeout=10,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("AAI_GATEWAY_CONFIG")
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"aai-gateway: invalid config\n{exc}", file=sys.stderr)
        return 2
    try:
        serve(config)
    except SecretError as exc:
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
    return 0


def _cmd_gen_key(args: argparse.Namespace) -> int:
    from .vault import generate_key

    print(generate_key())
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from .sim.app import Sim, SimConfig, build_sim_app

    _setup_logging("warning")
    overrides: dict[str, Any] = json.loads(args.sim_config) if args.sim_config else {}
    web.run_app(
        build_sim_app(Sim(SimConfig.from_dict(overrides))), host=args.host, port=args.port, print=None
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """The gateway in front of the simulator, both in this process: no account, no network."""
    from .sim.app import Sim, SimConfig, build_sim_app

    sim_port = args.sim_port
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
        print(f"aai-gateway: invalid config\n{exc}", file=sys.stderr)
        return 2
    base = f"http://{config.listen.host}:{config.listen.port}"
    serve(
        config,
        companion=build_sim_app(Sim(SimConfig(job_seconds=3.0))),
        companion_port=sim_port,
        announce=(
            f"\n\n  demo: the upstream simulator answers on {sim_url} (any API key works)\n"
            f"  try:  export ASSEMBLYAI_BASE_URL={base} ASSEMBLYAI_LLM_GATEWAY_BASE_URL={base} "
            "ASSEMBLYAI_API_KEY=demo-key\n"
            '        python -c "import assemblyai as aai; '
            "print(aai.Transcriber().transcribe('https://example.com/a.mp3').text)\"\n"
            f"        curl -s {base}/metrics | grep aai_gateway_admissions\n"
        ),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aai-gateway", description="Keeps a shared AssemblyAI account inside its limits."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help="YAML config file (default: built-in defaults, or $AAI_GATEWAY_CONFIG)")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("path", nargs="?")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("demo", help="the gateway in front of the upstream simulator")
    p.add_argument("--config")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--sim-port", type=int, default=8099)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("gen-key", help="print a new AAI_GATEWAY_SECRET_KEY")
    p.set_defaults(func=_cmd_gen_key)
    p = sub.add_parser("sim", help="run the upstream simulator alone")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8099)
    p.add_argument("--sim-config", help='JSON overrides, e.g. {"requests_limit": 50, "requests_window_s": 2}')
    p.set_defaults(func=_cmd_sim)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
