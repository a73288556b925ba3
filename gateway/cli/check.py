"""``aai-gateway check-config`` (a config file validated, and what it sets summed up) and
``aai-gateway gen-key`` (a new secret key for ``AAI_GATEWAY_SECRET_KEY``)."""

from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError, load_config
from ..reload import config_hash, masked
from ..tls import TlsError, server_context


def cmd_check(args: argparse.Namespace) -> int:
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


def cmd_gen_key(args: argparse.Namespace) -> int:
    from ..vault import generate_key

    print(generate_key())
    return 0
