"""The keep-alive race: upstream closes an idle connection just as the gateway writes the
next request on it. Nothing of an answer came back, so the request most likely never reached
upstream's application; a client pool (Go's, urllib3's) sends a safe one again on a new
connection. The gateway does the same, once, for GET, HEAD and OPTIONS, taking a new token
for it (the first is kept: it may have arrived); anything else is a 502, sent once.
"""

from __future__ import annotations

import asyncio

import aiohttp
from multidict import CIMultiDict

from gateway.proxy.http1 import StaleConnection
from tests.helpers import gateway_config, metric, running_gateway
from tests.hostile.test_upstream_hostile import TAG, Link, hostile_upstream, pool, tagged


async def answer_once_per_connection(link: Link, who: str, body: bytes) -> bool:
    """The first request on a connection is answered; the next one finds it closed."""
    if link.served:
        link.reset()
        return False
    link.send(tagged(who))
    return True


async def test_a_reused_connection_closed_before_any_answer_is_stale_a_new_one_is_not() -> None:
    async with hostile_upstream(answer_once_per_connection) as h:
        p = pool()
        try:
            first = await p.request("GET", h.url, CIMultiDict({"Authorization": "key-A"}), None, identity="a")
            assert (await first.read()).startswith(b'{"for=key-A"}')
            first.release()  # back in the pool, idle
            try:
                await p.request("GET", h.url, CIMultiDict({"Authorization": "key-A"}), None, identity="a")
            except StaleConnection:
                pass
            else:
                raise AssertionError("a reused connection closed unanswered must be StaleConnection")
            assert len(h.links) == 1
        finally:
            await p.close()

    async def never_answer(link: Link, who: str, body: bytes) -> bool:
        link.reset()
        return False

    async with hostile_upstream(never_answer) as h:
        p = pool()
        try:
            await p.request("GET", h.url, CIMultiDict({"Authorization": "key-A"}), None, identity="a")
        except StaleConnection:
            raise AssertionError("a NEW connection's failure is not the keep-alive race") from None
        except ConnectionError:
            pass
        finally:
            await p.close()


async def test_the_gateway_sends_a_safe_request_again_once_and_never_a_post() -> None:
    async with hostile_upstream(answer_once_per_connection) as h:
        base = f"http://{h.url.host}:{h.url.port}"
        config = gateway_config(base)
        async with running_gateway(config) as (url, app, registry), aiohttp.ClientSession() as http:
            path = "/v2/transcript/5551e0b4-0000-4000-8000-000000000001/sentences"
            for n in range(3):  # each after the first on a pooled connection that then dies
                async with http.get(url + path, headers={"Authorization": "key-A"}) as r:
                    assert r.status == 200, (n, await r.text())
                    assert (await r.read()).startswith(b'{"for=key-A"}')
                    # The pool holds the resent GET's connection: a POST on it meets the same race and
            # is a 502, sent once (it may have arrived: sending it again could run it twice).
            sent = len(h.requests)
            chat = {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(
                url + "/v1/chat/completions", json=chat, headers={"Authorization": "key-A"}
            ) as r:
                assert r.status == 502, await r.text()
                assert await r.json() == {"error": "Upstream request failed (ConnectionError)"}
            assert len(h.requests) - sent == 1
            assert metric(registry, "aai_gateway_upstream_resent_total", group="llm") == 0


async def test_two_keys_at_once_each_reads_only_its_own_answers_through_resends() -> None:
    """Two clients on different keys, at once, every request after the first on a pooled
    connection that upstream then drops: each request is sent again on a new connection of
    its own key's pool, and no client ever reads an answer tagged for the other."""
    async with hostile_upstream(answer_once_per_connection) as h:
        base = f"http://{h.url.host}:{h.url.port}"
        async with (
            running_gateway(gateway_config(base)) as (url, _, registry),
            aiohttp.ClientSession() as http,
        ):
            path = "/v2/transcript/5551e0b4-0000-4000-8000-000000000001/sentences"

            async def client(key: str) -> None:
                for _ in range(6):
                    async with http.get(url + path, headers={"Authorization": key}) as r:
                        body = await r.read()
                        assert r.status == 200, body
                        assert TAG.findall(body) == [key.encode()], (key, body)

            await asyncio.gather(client("key-A"), client("key-B"))
            assert metric(registry, "aai_gateway_upstream_resent_total", group="rest") >= 2
