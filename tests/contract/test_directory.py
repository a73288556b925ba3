"""One contract, every directory of runtime projects and keys: SQLite (the embedded store),
fakeredis, real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import make_client
from gateway.directory import Directory, RedisDirectory, Refused, SqliteDirectory
from tests.conftest import REDIS_URL

SHA = "ab" * 32


class Wall:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "fakeredis", "redis"])
async def directory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Directory]:
    wall = Wall()
    if request.param == "sqlite":
        d = SqliteDirectory(tmp_path / "directory.db", wall=wall)
        yield d
        await d.close()
        return
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        keys = Keys(prefix="dir")
    else:
        client = make_client(REDIS_URL, timeout_ms=2000)
        keys = Keys(prefix="dir" + uuid.uuid4().hex[:8])
    yield RedisDirectory(client, keys, wall=wall)
    async for key in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(key)
    await client.aclose()


async def test_projects_and_keys_round_trip_and_every_write_moves_the_version(directory: Directory) -> None:
    assert await directory.version() == 0
    snap = await directory.snapshot()
    assert snap.projects == () and snap.keys == ()
    rec = await directory.add_project("ci", cap=None)
    assert rec.name == "ci" and rec.created == 1_800_000_000.0
    key = await directory.add_key("ci", "runner", SHA, cap=None, known=False)
    assert key.id.startswith("key_") and key.project == "ci"
    snap = await directory.snapshot()
    assert snap.version == await directory.version() == 2
    assert [p.name for p in snap.projects] == ["ci"]
    assert snap.keys == (key,)
    assert await directory.delete_key(key.id) == key
    assert await directory.delete_key(key.id) is None
    assert (await directory.snapshot()).keys == () and await directory.version() == 3


async def test_refusals(directory: Directory) -> None:
    await directory.add_project("a", cap=None)
    for name, cap, reason in (("a", None, Refused.EXISTS), ("b", 1, Refused.CAP)):
        with pytest.raises(Refused) as info:
            await directory.add_project(name, cap=cap)
        assert info.value.reason == reason
    with pytest.raises(Refused) as info:
        await directory.add_key("nope", "k", SHA, cap=None, known=False)
    assert info.value.reason == Refused.NO_PROJECT
    await directory.add_key("from-file", "k", SHA, cap=None, known=True)  # a config file's project
    await directory.add_key("a", "k", "cd" * 32, cap=None, known=False)
    for project, name, cap, reason in (("a", "k", None, Refused.EXISTS), ("a", "k2", 2, Refused.CAP)):
        with pytest.raises(Refused) as info:
            await directory.add_key(project, name, "ef" * 32, cap=cap, known=False)
        assert info.value.reason == reason
    assert len((await directory.snapshot()).keys) == 2  # nothing refused was written


async def test_a_deleted_project_takes_its_keys_and_its_name_is_not_given_again(directory: Directory) -> None:
    await directory.add_project("gone", cap=None)
    await directory.add_project("stays", cap=None)
    k1 = await directory.add_key("gone", "one", "01" * 32, cap=None, known=False)
    k2 = await directory.add_key("gone", "two", "02" * 32, cap=None, known=False)
    kept = await directory.add_key("stays", "one", "03" * 32, cap=None, known=False)
    await directory.touch({k1.id: 5.0})
    assert sorted(await directory.delete_project("gone") or []) == sorted([k1, k2])
    assert await directory.delete_project("gone") is None
    snap = await directory.snapshot()
    assert [p.name for p in snap.projects] == ["stays"] and snap.keys == (kept,)
    assert await directory.last_used([k1.id]) == {}
    with pytest.raises(Refused) as info:
        await directory.add_project("gone", cap=None)
    assert info.value.reason == Refused.REUSED


async def test_last_use_keeps_the_latest(directory: Directory) -> None:
    await directory.touch({"key_a": 10.0, "key_b": 20.0})
    await directory.touch({"key_a": 5.0, "key_b": 30.0})  # an instance that saw key_a earlier
    assert await directory.last_used(["key_a", "key_b", "key_c"]) == {"key_a": 10.0, "key_b": 30.0}
    assert await directory.last_used([]) == {}


async def test_the_cap_holds_under_concurrent_creation(directory: Directory) -> None:
    outcomes = await asyncio.gather(
        *(directory.add_project(f"p{i}", cap=3) for i in range(10)), return_exceptions=True
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 3
    assert all(o.reason == Refused.CAP for o in outcomes if isinstance(o, Refused))
    assert len((await directory.snapshot()).projects) == 3


async def test_sqlite_survives_a_restart(tmp_path: Path) -> None:
    first = SqliteDirectory(tmp_path / "d.db")
    await first.add_project("ci", cap=None)
    key = await first.add_key("ci", "k", SHA, cap=None, known=False)
    await first.close()
    again = SqliteDirectory(tmp_path / "d.db")
    assert (await again.snapshot()).keys == (key,)
    await again.close()
