"""The gateway's job ids are told apart from upstream's without asking the store."""

from __future__ import annotations

import uuid

import aiohttp

from gateway.products.transcripts.ids import is_job_id, new_job_id
from gateway.sim.app import SimConfig
from tests.helpers import metric
from tests.test_transcripts import KEY, gateways


def test_job_ids_are_uuids_marked_as_the_gateways() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    for job_id in ids:
        assert uuid.UUID(job_id).version == 8 and is_job_id(job_id)
    assert not any(is_job_id(str(uuid.uuid4())) for _ in range(1000))  # upstream's are v4
    assert not is_job_id("not-a-transcript-id")


async def test_polling_an_upstream_id_is_forwarded_without_a_store_lookup() -> None:
    async with gateways(SimConfig(), redis=True) as (sim, [(url, registry)]):
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url + "/v2/transcript", json={"audio_url": "https://x/a.mp3"}, headers=KEY
            ) as r:
                job_id = (await r.json())["id"]
            assert is_job_id(job_id)
            before = metric(registry, "aai_gateway_store_calls_total", op="job_get")
            async with http.get(f"{url}/v2/transcript/{uuid.uuid4()}", headers=KEY) as r:
                assert r.status in (400, 404)  # upstream's answer for an id it does not know
            assert metric(registry, "aai_gateway_store_calls_total", op="job_get") == before
            async with http.get(f"{url}/v2/transcript/{job_id}", headers=KEY) as r:
                assert r.status == 200 and (await r.json())["id"] == job_id
            assert metric(registry, "aai_gateway_store_calls_total", op="job_get") > before
