"""``aai-gateway sim``: the upstream simulator alone (tests, benchmarks)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from aiohttp import web

from ..logs import setup_logging
from .listen import ListenError, bind

DEFAULT_SIM_PORT = 8099


def cmd_sim(args: argparse.Namespace) -> int:
    from ..sim.app import Sim, SimConfig, build_sim_app

    try:
        socks = bind(args.host, args.port, "choose another with --port")
    except ListenError as exc:
        print(f"aai-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging("warning")
    overrides: dict[str, Any] = json.loads(args.sim_config) if args.sim_config else {}
    web.run_app(build_sim_app(Sim(SimConfig.from_dict(overrides))), sock=socks, print=None)
    return 0
