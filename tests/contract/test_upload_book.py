"""One contract, every upload book (who made each upload, managed mode): memory, fakeredis,
real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import fakeredis
import pytest

from gateway.admission.keys import Keys
from gateway.admission.redis_store import make_client
from gateway.errors import Forbidden
from gateway.products.uploads import MemoryUploadBook, RedisUploadBook, UploadBook, Uploads
from tests.conftest import REDIS_URL

URL = "https://cdn.assemblyai.com/upload/0f1e2d3c"


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def book(request: pytest.FixtureRequest) -> AsyncIterator[UploadBook]:
    if request.param == "memory":
        yield MemoryUploadBook(3600)
        return
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        keys = Keys(prefix="up")
    else:
        client = make_client(REDIS_URL, timeout_ms=2000)
        keys = Keys(prefix="up" + uuid.uuid4().hex[:8])
    yield RedisUploadBook(client, keys, 3600)
    async for key in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(key)
    await client.aclose()


async def test_an_upload_is_its_makers_and_nobody_elses(book: UploadBook) -> None:
    uploads = Uploads(book)
    assert await book.owner(URL) is None
    await uploads.note([URL], "project:alpha")
    assert await book.owner(URL) == "project:alpha"
    await uploads.check(URL, "project:alpha")
    await uploads.check(" " + URL + " ", "project:alpha")
    with pytest.raises(Forbidden, match="Cannot access uploaded file"):
        await uploads.check(URL, "project:beta")
    await uploads.check("https://example.com/never-uploaded.mp3", "project:beta")  # left to upstream


async def test_the_capture_keeps_only_an_upload_url() -> None:
    found: list[str] = []
    rewrite = Uploads(MemoryUploadBook(60)).capture("project:alpha", found)
    assert rewrite({"upload_url": URL}) == {"upload_url": URL} and found == [URL]
    rewrite({"error": "x"})
    rewrite([URL])
    assert found == [URL]
