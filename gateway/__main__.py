"""The command line: ``aai-gateway`` (or ``python -m gateway``).

aai-gateway serve [--config PATH]     run the gateway (embedded store unless redis.url is set)
aai-gateway check-config [PATH]       validate a config file; exit 1 with the key path on error
aai-gateway demo [--port N]           the gateway in front of the upstream simulator
aai-gateway gen-key                   print a new secret key (AAI_GATEWAY_SECRET_KEY)
aai-gateway keys new --project P --name N   print a new gateway key (managed mode) and its config line
aai-gateway sim [--port N]            the upstream simulator alone (tests, benchmarks)
aai-gateway usage [--config PATH] [--from D] [--to D] [--group-by ...] [--format table|csv|json]
                                      usage and spend from the store (the gateway may be stopped)

A port that cannot be bound (another process holds it, no permission) ends the command at
once with one line on stderr and exit code 2, before anything is logged as listening; so does
a ``listen.tls`` certificate or key that cannot be served (the line names the key path,
``listen.tls.cert_file: ...``). ``check-config`` checks those files too (exit 1).

SIGHUP re-reads the config file (gateway/reload.py; so does ``POST /admin/v1/reload``).
SIGTERM (or SIGINT) shuts down gracefully: the listener stops accepting, waiting requests
are handed back (429 with Retry-After), streaming sessions are terminated, requests in
progress get ``shutdown_grace_s`` to finish, then the process exits 0. A second SIGTERM or
SIGINT during the grace ends the process at once.

This module is the parser and its wiring; each command family is a module of gateway/cli/
(serve.py: serve and demo; listen.py: the sockets and the serving loop; check.py:
check-config and gen-key; keys.py; usage.py; sim.py).
"""

from __future__ import annotations

import argparse
import sys

from .cli.check import cmd_check, cmd_gen_key
from .cli.keys import cmd_keys_new
from .cli.listen import ListenError, bind
from .cli.serve import _bind_sim, _warn_eviction, cmd_demo, cmd_serve, freeze_startup_heap, serve
from .cli.sim import DEFAULT_SIM_PORT, cmd_sim
from .cli.usage import cmd_usage
from .reload import masked

# Names that lived here before the commands moved to gateway/cli/, imported from here by
# tests and bench.
__all__ = [
    "DEFAULT_SIM_PORT",
    "ListenError",
    "_bind_sim",
    "_warn_eviction",
    "bind",
    "build_parser",
    "freeze_startup_heap",
    "main",
    "masked",
    "serve",
]


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
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: exit 1 with each error and its key path on stderr; "
        "warnings (valid but probably unintended values) are printed on stderr with exit 0.",
    )
    p.add_argument("path", nargs="?", help="YAML config file (default: $AAI_GATEWAY_CONFIG, or the defaults)")
    p.set_defaults(func=cmd_check)
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
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("gen-key", help="print a new AAI_GATEWAY_SECRET_KEY")
    p.set_defaults(func=cmd_gen_key)
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
    p.set_defaults(func=cmd_keys_new)
    p = sub.add_parser("sim", help="run the upstream simulator alone")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_SIM_PORT, help=f"port (default: {DEFAULT_SIM_PORT})")
    p.add_argument("--sim-config", help='JSON overrides, e.g. {"requests_limit": 50, "requests_window_s": 2}')
    p.set_defaults(func=cmd_sim)
    p = sub.add_parser(
        "usage",
        help="usage and spend, read from the store",
        description="Usage and spend by project, product, model, key, customer or day, read from the "
        "store the config names (Redis, or ledger.db in transcripts.data_dir): the gateway may be stopped.",
    )
    p.add_argument(
        "--config", metavar="PATH", help="YAML config file (default: $AAI_GATEWAY_CONFIG, or the defaults)"
    )
    p.add_argument(
        "--from", dest="from_day", metavar="YYYY-MM-DD", help="first UTC day (default: the 1st of this month)"
    )
    p.add_argument(
        "--to", dest="to_day", metavar="YYYY-MM-DD", help="last UTC day, included (default: today)"
    )
    p.add_argument(
        "--group-by",
        default="project,product",
        help="comma-separated: project, product, model, key, customer, day (default: project,product)",
    )
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="default: table")
    p.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
