"""``aai-gateway usage``: usage and spend, read from the store the config names (Redis, or
ledger.db in ``transcripts.data_dir``) without the gateway, which may be stopped."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from ..config import Config, ConfigError, load_config
from ..errors import StoreUnavailable


def cmd_usage(args: argparse.Namespace) -> int:
    from ..report import group_by_of, span, utc_today

    try:
        config = load_config(args.config or os.environ.get("AAI_GATEWAY_CONFIG"))
        first, last = span(args.from_day, args.to_day, utc_today())
        group_by = group_by_of(args.group_by)
    except (ConfigError, ValueError) as exc:
        print(f"aai-gateway: {exc}", file=sys.stderr)
        return 2
    try:
        print(asyncio.run(_usage(config, first, last, group_by, args.format)), end="")
    except StoreUnavailable as exc:
        print(f"aai-gateway: {exc.detail}", file=sys.stderr)
        return 1
    return 0


class _NoLedger:
    kind = "none"

    async def rows(self, first: str, last: str) -> list[Any]:
        return []

    async def close(self) -> None:
        return None


async def _usage(config: Config, first: str, last: str, group_by: list[str], fmt: str) -> str:
    """The report, read from the store the config names, without the gateway: Redis (and the
    usage still waiting in this host's usage-pending.db after an outage), or ledger.db."""
    from pathlib import Path

    from ..admission.keys import Keys
    from ..admission.topology import connect
    from ..ledger import Ledger, OutageLedger, RedisLedger, SqliteLedger
    from ..report import report, to_csv, to_table

    data = Path(config.transcripts.data_dir)
    client = None
    ledger: Ledger | _NoLedger
    if config.redis.url is not None:
        keys = Keys(prefix=config.redis.key_prefix, account=config.account)
        client = connect(config.redis, keys).client
        ledger = RedisLedger(client, keys)
        if (data / "usage-pending.db").exists():
            ledger = OutageLedger(ledger, data / "usage-pending.db")
    elif (data / "ledger.db").exists():
        ledger = SqliteLedger(data / "ledger.db")
    else:  # nothing recorded here: an empty report, and no file or folder made
        print(f"aai-gateway: no usage recorded in {data / 'ledger.db'}", file=sys.stderr)
        ledger = _NoLedger()
    try:
        result = report(await ledger.rows(first, last), group_by, config.pricing)
    finally:
        await ledger.close()
        if client is not None:
            await client.aclose()
    if fmt == "json":
        return json.dumps({"from": first, "to": last, "group_by": group_by, **result}, indent=2) + "\n"
    return to_csv(result, group_by) if fmt == "csv" else to_table(result, group_by)
