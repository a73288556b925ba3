"""The Redis store: the engine's verbs as Lua scripts, one round trip each, Redis's clock.

Scripts live in ``lua/*.lua`` (each opens with its KEYS/ARGV/return contract) and are
registered once with ``register_script`` (EVALSHA, reloaded on NOSCRIPT). Every key a script
touches is passed in KEYS and carries the account's hash tag (keys.py), so the scripts run
unchanged on Redis Cluster. Redis errors and timeouts become ``StoreUnavailable`` here, in
one place (``RedisStore._call``), which also fails fast for a second after repeated
connection failures.

Wake-ups come over pub/sub: one subscription per instance on the account's channel. Pub/sub
is at-most-once, so after every (re)subscribe the callback gets ``RESYNC`` and the engine
re-checks all its waiters; the engine also re-checks its head waiters about once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from ..errors import Fenced, StoreUnavailable
from .fence import FENCE_LUA
from .health import renewed, supervise
from .keys import Keys
from .limits import Limit
from .pipelined import PipelinedRedis, array_header, bulk
from .store import FIRST_MAX, RESYNC, AcquireRequest, AcquireResult, LimitState, Status, WakeCallback

log = logging.getLogger(__name__)

TOMBSTONE_MS = 60_000
BREAKER_FAILURES = 3
BREAKER_OPEN_S = 1.0
HEARTBEAT_S = 0.5  # a silent subscription is PINGed after this, and remade if still silent after 2x
HEARTBEAT = "aai-gateway-heartbeat"
FENCED = 6  # acquire.lua's status when the outage fence is up (not a Status: it raises Fenced)


def make_client(
    url: str, *, timeout_ms: int = 250, connect_timeout_ms: int = 500, pool_size: int = 64
) -> aioredis.Redis:
    """A Redis client whose calls never hang: tight socket timeouts, a bounded pool.

    A blocking pool makes a burst of admissions queue briefly for a connection instead of
    opening hundreds of them; its wait is bounded by the same timeout.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout_ms / 1000,
        socket_timeout=timeout_ms / 1000,
        socket_connect_timeout=connect_timeout_ms / 1000,
        # A pooled connection that Redis closed (a restart, an idle timeout) is retried once on
        # a fresh one, so the first call after a restart does not fail for nothing.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis_errors.ConnectionError],
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def load_script(name: str) -> str:
    return resources.files("gateway.admission").joinpath("lua", f"{name}.lua").read_text()


class RedisStore:
    kind = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        sharded_pubsub: bool = False,
        shebang: bool = True,
        on_call: Any = None,
        pipelined: PipelinedRedis | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        subscriber: Callable[[], Awaitable[aioredis.Redis]] | None = None,
        fence_ms: int = 0,
        gap_ms: int = 0,
    ) -> None:
        """``client`` is shared and owned by the caller's lifecycle unless ``close`` is called.

        ``sharded_pubsub`` publishes with SPUBLISH (Redis Cluster); ``shebang`` prefixes the
        scripts with ``#!lua`` (Redis 7 checks their keys; fakeredis cannot parse it).
        ``on_call(verb)`` is called once per round trip (metrics, benchmark counts).
        ``pipelined``, when given, carries the scripts (the hot path); ``client`` then serves
        only pub/sub, pings and reads. ``heartbeat_s`` bounds how long a silent
        subscription goes unchecked (see _listen). ``subscriber``, when given, makes the
        client each (re)subscription uses, closed with it (Cluster: the channel's shard owner,
        topology.py); else ``client`` subscribes. ``fence_ms`` > 0 turns on the outage fence
        (fallback.py): an acquire that finds it raised, or finds Redis was silent for more than
        ``gap_ms``, admits nothing and raises ``Fenced``.
        """
        self._fence_ms = fence_ms
        self._gap_ms = gap_ms
        self._subscriber = subscriber
        self._heartbeat_s = heartbeat_s
        self.heartbeat_failures = 0  # subscriptions torn down because a PING went unanswered
        self._pipe = pipelined
        self._client = client
        self._keys = keys
        self._pubcmd = "SPUBLISH" if sharded_pubsub else "PUBLISH"
        self._on_call = on_call
        head = "#!lua\n" if shebang else ""
        self._acquire = client.register_script(head + load_script("acquire"))
        self._release = client.register_script(head + load_script("release"))
        self._refresh = client.register_script(head + load_script("refresh"))
        self._renew = client.register_script(head + load_script("renew"))
        self._fence_lua = head + FENCE_LUA
        self._usage = client.register_script(
            ("#!lua flags=no-writes\n" if shebang else "") + load_script("usage")
        )
        self._sub_task: asyncio.Task[None] | None = None
        self._sharded = sharded_pubsub
        self._frames: dict[tuple[Limit, ...], tuple[bytes, bytes, bytes, bytes]] = {}
        self._last_limits: tuple[Limit, ...] | None = None
        self._last_frame = (b"", b"", b"", b"")
        self._tomb_prefix = keys.tomb("")
        self._failures = 0  # consecutive connection failures
        self._open_until = 0.0  # while in the future, fail fast instead of waiting on a dead Redis

    async def _call(self, op: str, call: Awaitable[Any], *, breaker: bool = True) -> Any:
        """Await a Redis call, translating its failures (see _failed)."""
        if breaker and self._open_until:
            try:
                self._fail_fast(op)
            except StoreUnavailable:
                if inspect.iscoroutine(call):
                    call.close()  # never awaited: close it quietly
                raise
        try:
            result = await call
        except (TimeoutError, OSError, redis_errors.RedisError) as exc:
            raise self._failed(op, exc) from exc
        self._failures = 0
        return result

    def _fail_fast(self, op: str) -> None:
        """After repeated connection failures, fail at once for a second (a request gets its
        503 now, not after a connect timeout); then let calls through again."""
        if time.monotonic() < self._open_until:
            raise StoreUnavailable(f"redis unavailable during {op}: failing fast after repeated errors")
        self._open_until = 0.0

    def _failed(self, op: str, exc: BaseException) -> StoreUnavailable:
        """Every Redis failure becomes StoreUnavailable here; connection trouble counts
        towards the breaker."""
        if isinstance(exc, TimeoutError | OSError | redis_errors.ConnectionError | redis_errors.TimeoutError):
            self._failures += 1
            if self._failures >= BREAKER_FAILURES:
                self._open_until = time.monotonic() + BREAKER_OPEN_S
            return StoreUnavailable(f"redis unavailable during {op}: {type(exc).__name__}")
        return StoreUnavailable(f"redis error during {op}: {exc}")

    def _count(self, verb: str) -> None:
        if self._on_call is not None:
            self._on_call(verb)

    def _limit_keys(self, limits: Sequence[Limit]) -> list[str]:
        keys: list[str] = []
        for limit in limits:
            n = limit.name
            keys += [self._keys.leases(n), self._keys.wait(n), self._keys.dead(n), self._keys.resv(n)]
        return keys

    def _share_keys(self) -> list[str]:
        k = self._keys
        return [k.share_dead, k.share_owner, k.share_lex]

    async def acquire(self, request: AcquireRequest) -> AcquireResult:
        self._count("acquire")
        pipe = self._pipe
        if pipe is not None:
            # The hot path: everything but the ticket's own fields is packed once per set of
            # limits (_acquire_frame); the ticket's fields in one format each side of them.
            head, middle, pub, tail = self._acquire_frame(request.limits)
            r = request
            t, p, q, ttl, d, f, o, od = (
                r.ticket,
                str(r.priority),
                str(r.seq),
                str(r.ttl_ms),
                str(r.max_depth),
                str(r.floor),
                r.owner,
                str(r.owner_depth),
            )
            tomb = self._tomb_prefix + t
            payload = b"".join((
                head,
                f"${len(tomb)}\r\n{tomb}\r\n".encode(),
                middle,
                f"${len(t)}\r\n{t}\r\n${len(p)}\r\n{p}\r\n${len(q)}\r\n{q}\r\n${len(ttl)}\r\n{ttl}\r\n"
                f"${len(d)}\r\n{d}\r\n".encode(),
                pub,
                f"${len(f)}\r\n{f}\r\n${len(o)}\r\n{o}\r\n${len(od)}\r\n{od}\r\n".encode(),
                tail,
            ))  # fmt: skip
            if self._open_until:
                self._fail_fast("acquire")
            try:
                raw = await pipe.evalsha(self._acquire.script, payload)
            except (TimeoutError, OSError, redis_errors.RedisError) as exc:
                raise self._failed("acquire", exc) from exc
            self._failures = 0
            if raw[0] == FENCED:
                raise Fenced(f"fenced for {raw[5]}ms: another instance lost Redis")
            return parse_acquire(raw)
        k = self._keys
        keys = [
            k.seq,
            k.tomb(request.ticket),
            k.channel,
            *self._limit_keys(request.limits),
            *self._share_keys(),
            *self._fence_keys(),
        ]
        args: list[Any] = [request.ticket, request.priority, request.seq, request.ttl_ms, request.max_depth]
        args += [self._pubcmd, request.floor, request.owner, request.owner_depth, len(request.limits)]
        args.append(FIRST_MAX)
        for limit in request.limits:
            args += [limit.name, limit.capacity, limit.lease_ms]
        args += [self._gap_ms, self._fence_ms]
        raw = await self._call("acquire", self._acquire(keys=keys, args=args))
        if raw[0] == FENCED:
            raise Fenced(f"fenced for {raw[5]}ms: another instance lost Redis")
        return parse_acquire(raw)

    def _fence_keys(self) -> list[str]:
        k = self._keys
        return [k.tick, k.fence, k.instances]

    async def fence(self, ms: int, timeout_s: float) -> bool:
        """Raise the outage fence for ``ms`` (never shortening it): every other instance's
        next acquire fails with Fenced and it joins this one admitting locally. Sent even
        while the breaker is open (a stalled Redis runs it as it resumes, before what comes
        after); True when Redis confirmed it within ``timeout_s``."""
        self._count("fence")
        try:
            # EVAL, not EVALSHA: a Redis that stalls before the script was ever loaded would
            # answer NOSCRIPT as it resumes, and the fence would never land.
            await asyncio.wait_for(self._client.eval(self._fence_lua, 1, self._keys.fence, ms), timeout_s)
        except (TimeoutError, OSError, redis_errors.RedisError):
            return False
        return True

    def _acquire_frame(self, limits: tuple[Limit, ...]) -> tuple[bytes, bytes, bytes, bytes]:
        """acquire's EVALSHA in RESP form, cut around the fields that change per call."""
        if limits is self._last_limits:  # the engine passes one tuple per set (limits.ordered):
            return self._last_frame  # skip hashing every Limit of it on every call
        frame = self._frames.get(limits)
        if frame is None:
            k, n = self._keys, len(limits)
            limit_keys = self._limit_keys(limits) + self._share_keys() + self._fence_keys()
            nkeys, nargs = 3 + len(limit_keys), 13 + 3 * n
            head = array_header(3 + nkeys + nargs) + bulk("EVALSHA") + bulk(self._acquire.sha)
            head += bulk(nkeys) + bulk(k.seq)
            middle = bulk(k.channel) + b"".join(bulk(key) for key in limit_keys)
            tail = (
                bulk(n)
                + bulk(FIRST_MAX)
                + b"".join(bulk(limit.name) + bulk(limit.capacity) + bulk(limit.lease_ms) for limit in limits)
                + bulk(self._gap_ms)
                + bulk(self._fence_ms)
            )
            frame = self._frames[limits] = (head, middle, bulk(self._pubcmd), tail)
            if len(self._frames) > 4096:  # unknown models make new limit sets: stay bounded
                self._frames.clear()
        self._last_limits, self._last_frame = limits, frame
        return frame

    async def release(self, ticket: str, limits: Sequence[Limit], *, tombstone: bool = False) -> int:
        k = self._keys
        keys = [k.tomb(ticket), k.channel, *self._limit_keys(limits), *self._share_keys(), k.ended(ticket)]
        args: list[Any] = [ticket, TOMBSTONE_MS if tombstone else 0, self._pubcmd, len(limits)]
        args += [limit.name for limit in limits]
        self._count("release")
        return int(await self._call("release", self._run(self._release, keys, args)))

    async def refresh(self, limits: Sequence[Limit], tickets: Sequence[str], ttl_ms: int) -> list[int]:
        if not tickets:
            return []
        keys = [self._keys.channel, *self._limit_keys(limits), *self._share_keys()]
        args: list[Any] = [ttl_ms, self._pubcmd, len(limits), *[limit.name for limit in limits], *tickets]
        self._count("refresh")
        raw = await self._call("refresh", self._run(self._refresh, keys, args))
        return [int(x) for x in raw]

    async def renew(self, ticket: str, limit: Limit, ttl_ms: int, *, create: bool = False) -> bool:
        self._count("renew")
        keys = [self._keys.leases(limit.name), self._keys.ended(ticket)]
        args = [ticket, ttl_ms, int(create), limit.capacity]
        return renewed(ticket, limit, int(await self._call("renew", self._run(self._renew, keys, args))))

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if self._pipe is not None:
            payload = hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))
            return await self._pipe.evalsha(script.script, payload)
        return await script(keys=keys, args=args)

    async def usage(self, limit: Limit) -> tuple[int, int]:
        keys = self._limit_keys([limit])
        out, waiting = await self._call("usage", self._usage(keys=keys, args=[]))
        return int(out), int(waiting)

    async def ping(self) -> None:
        client = self._client
        if isinstance(client, RedisCluster):
            await self._call("ping", self._ping_shard(client), breaker=False)
            return
        await self._call("ping", client.ping(), breaker=False)

    async def _ping_shard(self, client: RedisCluster) -> Any:
        """PING the master that holds the account (a Cluster's default node may be another)."""
        await client.initialize()
        return await client.ping(target_nodes=client.get_node_from_key(self._keys.base))

    async def subscribe(self, callback: WakeCallback, *, ready_timeout_s: float = 2.0) -> None:
        """Start the subscription; wait (bounded) until it is live, so no early wake is lost.

        It runs supervised (health.supervise): whatever ends it, it is restarted, and its
        liveness is exported as ``aai_gateway_background_alive{task="wake-subscription"}``.
        """
        if self._sub_task is None:
            ready = asyncio.Event()
            self._sub_task = supervise("wake-subscription", lambda: self._listen(callback, ready))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ready.wait(), ready_timeout_s)
            if self._pipe is not None:
                # The hot path's connection too: the first burst of requests (thousands in one
                # loop turn) would otherwise all wait for its connect, then for each other.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._pipe.connect(), ready_timeout_s)

    async def _listen(self, callback: WakeCallback, ready: asyncio.Event) -> None:
        """Hold one subscription; on any failure resubscribe with backoff, then RESYNC.

        A half-open socket (the peer gone without a FIN or RST: a failover, a NAT or proxy
        dropping the flow) delivers nothing and raises nothing, so silence is checked: after
        ``heartbeat_s`` without a message the subscription sends a PING on its own
        connection, and if nothing (its PONG or any message) comes back within another
        ``heartbeat_s`` the connection is torn down and the subscription remade.
        """
        channel = self._keys.channel
        backoff = 0.1
        loop = asyncio.get_running_loop()
        beat = self._heartbeat_s
        me = asyncio.current_task()
        while True:
            _still_wanted(me)
            own: aioredis.Redis | None = None
            pubsub: Any = None
            try:
                if self._subscriber is not None:
                    own = await asyncio.wait_for(self._subscriber(), beat * 4)
                pubsub = (self._client if own is None else own).pubsub(ignore_subscribe_messages=True)
                if self._sharded:
                    await asyncio.wait_for(pubsub.ssubscribe(channel), beat * 2)
                else:
                    await asyncio.wait_for(pubsub.subscribe(channel), beat * 2)
                backoff = 0.1
                heard = loop.time()
                pinged = 0.0  # when the PING still unanswered was sent; 0: none
                ready.set()
                callback(RESYNC)
                while True:
                    _still_wanted(me)
                    now = loop.time()
                    if pinged:
                        if now - pinged >= beat:
                            self.heartbeat_failures += 1
                            raise redis_errors.ConnectionError(
                                f"no answer to a PING within {beat}s: half-open connection"
                            )
                        wait = pinged + beat - now
                    elif now - heard >= beat:
                        await asyncio.wait_for(pubsub.ping(HEARTBEAT), beat)
                        pinged = loop.time()
                        continue
                    else:
                        wait = heard + beat - now
                    msg = await pubsub.get_message(timeout=wait)
                    if msg is None:
                        continue
                    heard, pinged = loop.time(), 0.0
                    if msg.get("type") == "pong":
                        continue
                    data = msg.get("data")
                    if isinstance(data, bytes):
                        callback(data.decode())
                    elif isinstance(data, str):
                        callback(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: resubscribe
                log.warning("wake-up subscription lost (%s: %s); resubscribing", type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                # Bounded: closing a half-open connection must not hang the resubscription.
                if pubsub is not None:
                    with contextlib.suppress(Exception, asyncio.TimeoutError):
                        await asyncio.wait_for(pubsub.aclose(), 1.0)
                if own is not None:
                    with contextlib.suppress(Exception, asyncio.TimeoutError):
                        await asyncio.wait_for(own.aclose(), 1.0)

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()
        if self._sub_task is not None:
            self._sub_task.cancel()
            # Bounded: a subscription stuck in a dead connection must not hold up shutdown.
            await asyncio.wait({self._sub_task}, timeout=1.0)
            self._sub_task = None

    def __repr__(self) -> str:
        return f"RedisStore({self._keys.base}, publish={self._pubcmd})"


def _still_wanted(task: asyncio.Task[Any] | None) -> None:
    """Raise if ``task`` was cancelled, even when a library call it awaited swallowed the
    CancelledError (Python 3.11's ``wait_for`` can, racing a result): a loop that went on
    would hold up shutdown for ever."""
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def parse_acquire(raw: Sequence[Any]) -> AcquireResult:
    """acquire.lua's reply (integers: Lua numbers arrive as Redis integers) as a result."""
    status = STATUSES[raw[0]]
    if status is Status.ADMITTED:
        values = raw[6:]
        states = tuple(LimitState(values[i], max(0, values[i + 1])) for i in range(0, len(values), 2))
        return AcquireResult(status, raw[1], raw[2], 0, 0, 0, states, (), raw[5], raw[4])
    if status is Status.BLOCKED:
        first = tuple(zip([_text(t) for t in raw[7::2]], raw[8::2], strict=True))
        return AcquireResult(status, raw[1], raw[2], raw[3], raw[4], raw[5], (), first, raw[6])
    return AcquireResult(status, raw[1], raw[2], raw[3], raw[4], raw[5])


def _text(value: Any) -> str:
    return value.decode() if type(value) is bytes else str(value)


STATUSES = {s.value: s for s in Status}
