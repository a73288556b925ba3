"""The temporary-token book through a Redis outage (fail_open): notes made here while Redis
is away answer lookups here, and are written to Redis, for the time they have left, once it
answers."""

from __future__ import annotations

from typing import Any

import fakeredis

from gateway.admission.keys import Keys
from gateway.errors import StoreUnavailable
from gateway.products.streaming_tokens import OutageTokenBook, RedisTokenBook, TokenNote


class FlakyBook(RedisTokenBook):
    down = False

    async def issued(self, *args: Any) -> None:
        if self.down:
            raise StoreUnavailable("down")
        await super().issued(*args)

    async def lookup(self, fingerprint: str) -> TokenNote | None:
        if self.down:
            raise StoreUnavailable("down")
        return await super().lookup(fingerprint)


class Wall:
    t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


async def test_notes_made_during_an_outage_answer_here_and_reach_redis_after() -> None:
    wall = Wall()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    shared = FlakyBook(client, Keys(prefix="t"), wall=wall)
    book = OutageTokenBook(shared, wall=wall)
    await book.issued("before", 60, "alice")  # Redis up: noted there (and here)
    shared.down = True
    await book.issued("during", 60, "bob")
    assert await book.lookup("during") == TokenNote(wall.t + 60, "bob")
    assert await book.lookup("before") == TokenNote(wall.t + 60, "alice")  # here too
    assert await book.lookup("elsewhere") is None  # issued by another instance: not known
    assert await book.flush() == 0  # still down
    shared.down = False
    wall.t += 20
    assert await book.flush() == 1 and await book.flush() == 0
    other = RedisTokenBook(client, Keys(prefix="t"), wall=wall)  # another instance's view
    note = await other.lookup("during")
    assert note is not None and note.owner == "bob" and abs(note.valid_until - (wall.t + 40)) < 0.01
    assert 39_000 <= await client.pttl(Keys(prefix="t").streaming_token("during")) <= 40_000
    await client.aclose()


async def test_a_note_that_expired_during_the_outage_is_not_written() -> None:
    wall = Wall()
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    shared = FlakyBook(client, Keys(prefix="t"), wall=wall)
    shared.down = True
    book = OutageTokenBook(shared, wall=wall)
    await book.issued("short", 5, "bob")
    shared.down = False
    wall.t += 10
    assert await book.flush() == 1  # dropped, not written
    assert await book.lookup("short") is None
    assert await client.exists(Keys(prefix="t").streaming_token("short")) == 0
    await client.aclose()
