"""The hot path's pipelined Redis connection: replies stay matched to their callers through
cancellations, timeouts and lost connections, and scripts survive a SCRIPT FLUSH."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from gateway.admission.keys import Keys
from gateway.admission.pipelined import FLUSH_AT, PipelinedRedis, array_header, bulk
from gateway.admission.redis_store import RedisStore, make_client
from tests.conftest import REDIS_URL, redis_client


async def test_replies_in_order_and_a_cancelled_caller_does_not_shift_them() -> None:
    await (await redis_client()).aclose()
    conn = PipelinedRedis(REDIS_URL, timeout_ms=2000)
    try:
        calls = [asyncio.ensure_future(conn.call("ECHO", f"m{i}")) for i in range(50)]
        await asyncio.sleep(0)
        calls[10].cancel()  # its reply arrives and is discarded; the others keep theirs
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[10], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 10] == [
            f"m{i}".encode() for i in range(50) if i != 10
        ]
    finally:
        await conn.close()


async def test_a_burst_in_one_loop_turn_is_written_while_the_turn_runs() -> None:
    """10,000 requests arriving at once issue their commands in one loop turn: Redis gets
    them in chunks as they are made, not all after the turn (the first waited ~0.3 s)."""
    conn = PipelinedRedis(REDIS_URL, timeout_ms=2000)
    try:
        await conn.connect()
        calls = [asyncio.ensure_future(conn.call("ECHO", f"m{i}")) for i in range(5 * FLUSH_AT)]
        buffered: list[int] = []

        async def look() -> None:  # runs in the same turn, after every call above was issued
            buffered.append(len(conn._proto.buffer))  # type: ignore[union-attr]

        await asyncio.gather(look(), *calls)
        assert buffered[0] < FLUSH_AT
        assert [c.result() for c in calls] == [f"m{i}".encode() for i in range(5 * FLUSH_AT)]
    finally:
        await conn.close()


async def test_a_store_opens_its_hot_path_connection_when_it_starts(keys: Keys) -> None:
    """Not on the first request: a burst arriving first would all wait for the connect."""
    client = make_client(REDIS_URL)
    pipe = PipelinedRedis(REDIS_URL, timeout_ms=2000)
    store = RedisStore(client, keys, pipelined=pipe)
    try:
        assert pipe._proto is None
        await store.subscribe(lambda _: None)
        assert pipe._proto is not None and pipe._proto.lost is None
    finally:
        await store.close()
        await client.aclose()


async def test_the_url_selects_the_database() -> None:
    conn = PipelinedRedis(REDIS_URL, timeout_ms=2000)
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await conn.call("SET", "pipelined-db-check", "1", "EX", 10)
        assert await client.get("pipelined-db-check") == b"1"  # same db as redis-py's client
    finally:
        await conn.close()
        await client.aclose()


async def test_script_reloaded_after_a_flush() -> None:
    script = "return 42"
    sha = hashlib.sha1(script.encode()).hexdigest()
    payload = array_header(3) + bulk("EVALSHA") + bulk(sha) + bulk(0)
    conn = PipelinedRedis(REDIS_URL, timeout_ms=2000)
    try:
        assert await conn.evalsha(script, payload) == 42
        await conn.call("SCRIPT", "FLUSH")
        assert await conn.evalsha(script, payload) == 42  # NOSCRIPT -> SCRIPT LOAD -> again
    finally:
        await conn.close()


async def test_a_silent_server_times_out_every_call_in_flight_and_the_next_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read(1 << 16)  # read, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_ms=200, connect_timeout_ms=500)
    try:
        t0 = time.monotonic()
        results = await asyncio.gather(*(conn.call("PING") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, redis_errors.TimeoutError) for r in results), results
        assert 0.15 < time.monotonic() - t0 < 1.0
        with pytest.raises(redis_errors.TimeoutError):
            await conn.call("PING")
        assert len(accepted) == 2  # the timed-out socket was dropped; a new one was opened
    finally:
        await conn.close()
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_refused_connection_is_a_connection_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    conn = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_ms=200)
    with pytest.raises(redis_errors.ConnectionError):
        await conn.call("PING")
