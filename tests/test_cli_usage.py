"""``aai-gateway usage``: the report read straight from the store, with no gateway running:
the embedded store's ledger.db, and real Redis (its own key prefix)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from gateway.admission.keys import Keys
from gateway.config import load_config
from gateway.ledger import Ledger, RedisLedger, SqliteLedger
from gateway.report import COLUMNS, report

from .conftest import REDIS_URL
from .test_report import events, rows

REPO = Path(__file__).resolve().parent.parent
SPAN = ["--from", "2026-12-01", "--to", "2026-12-31"]


def usage(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAI_GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
    )  # fmt: skip


def write_config(tmp_path: Path, **extra: object) -> Path:
    doc = {
        "transcripts": {"data_dir": str(tmp_path / "data")},
        "pricing": {"transcription": {"universal-3-pro": 0.36, "speaker_labels": 0.072},
                    "streaming": {"universal-streaming": 0.18},
                    "llm": {"claude-x": {"input": 2.0, "output": 10.0}}},
        **extra,
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def fill(ledger: Ledger) -> None:
    for event in events():
        assert await ledger.record(event)


def expected(config: Path, group_by: list[str]) -> dict[str, object]:
    prices = load_config(config, environ={}).pricing
    return {
        "from": "2026-12-01",
        "to": "2026-12-31",
        "group_by": group_by,
        **report(rows(), group_by, prices),
    }


async def test_embedded_store_json_csv_and_table(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ledger = SqliteLedger(tmp_path / "data" / "ledger.db")
    await fill(ledger)
    await ledger.close()  # the gateway is stopped: the file alone

    done = usage(config, *SPAN, "--format", "json", "--group-by", "project,model")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected(config, ["project", "model"])

    done = usage(config, *SPAN, "--format", "csv")
    assert done.returncode == 0, done.stderr
    parsed = list(csv.DictReader(io.StringIO(done.stdout)))
    assert list(parsed[0]) == ["project", "product", *COLUMNS]
    assert [(r["project"], r["product"]) for r in parsed] == [
        ("", "transcription"), ("alpha", "streaming"), ("alpha", "transcription"), ("beta", "llm")
    ]  # fmt: skip

    done = usage(config, *SPAN)  # table: the default
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["project", "product", *COLUMNS]
    total = next(line for line in lines if line.startswith("TOTAL"))
    assert total.split() == [
        "TOTAL",
        "9",
        "1",
        "2",
        "2",
        "1",
        "4560.0",
        "3600.0",
        "1200.0",
        "500100",
        "10050",
        "1.592000",
        "2",
    ]
    assert len(lines[0]) >= len(total)  # right-aligned under the header

    other_month = usage(config, "--from", "2026-11-01", "--to", "2026-11-30", "--format", "json")
    assert json.loads(other_month.stdout)["rows"] == []


def test_embedded_store_never_written_is_an_empty_report(tmp_path: Path) -> None:
    done = usage(write_config(tmp_path), *SPAN, "--format", "json")
    assert done.returncode == 0 and json.loads(done.stdout)["rows"] == []
    assert "no usage recorded in" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing made by looking


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group-by", "project,tenant"], "group_by: 'tenant' is not one of project, product, model"),
        (["--from", "2026-02-30"], "from: '2026-02-30' is not a date"),
        (["--from", "2024-01-01", "--to", "2026-01-01"], "at most 400"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = usage(write_config(tmp_path), *args)
    assert done.returncode == 2 and message in done.stderr and done.stdout == ""


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"test-usage-{uuid.uuid4().hex[:8]}"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    async for key in client.scan_iter(match=f"{prefix}:*"):
        await client.delete(key)
    await client.aclose()


async def test_redis_store(tmp_path: Path, redis_prefix: str) -> None:
    config = write_config(tmp_path, redis={"url": REDIS_URL, "key_prefix": redis_prefix}, account="acct")
    client = aioredis.from_url(REDIS_URL)
    try:
        await fill(RedisLedger(client, Keys(prefix=redis_prefix, account="acct")))
    finally:
        await client.aclose()

    done = usage(config, *SPAN, "--format", "json", "--group-by", "project,product,model,key,customer,day")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == expected(
        config, ["project", "product", "model", "key", "customer", "day"]
    )
    assert not (tmp_path / "data").exists()  # Redis alone: no local file read or made


def test_redis_that_does_not_answer_exits_1(tmp_path: Path) -> None:
    config = write_config(tmp_path, redis={"url": "redis://127.0.0.1:1/0", "key_prefix": "x"})
    done = usage(config, *SPAN)
    assert done.returncode == 1 and done.stderr.startswith("aai-gateway: redis failed reading usage")
