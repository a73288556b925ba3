"""The outage fence and the heartbeats that keep it honest (used by fallback.py and redis_store.py).

While one instance admits locally through a Redis outage, no other may admit from Redis:
Redis sees that instance's tokens end too, and would hand their room out again. The fence is a
key (``<prefix>:{account}:fence``) that lives ``FENCE_MS``; while it does, acquire.lua admits
nothing (``Fenced``) and the instance goes local too. It is raised

- by an instance that goes local (``FENCE_LUA``, never shortening one already up): a
  stalled Redis runs the command as it resumes;
- by Redis itself, when an acquire or a heartbeat finds the tick older than the gap
  (``gap_ms``): every heartbeat stamps it (Redis TIME; an acquire only when it finds it
  stale or missing), and each instance beats every ``BEAT_S``, so an older tick means Redis
  stalled. Whatever Redis runs first
  after a stall sees it, so the order of what it was sent meanwhile does not matter.

One instance alone (one heartbeat in the set) is never fenced: nobody else admits.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from .keys import Keys

BEAT_S = 0.05  # how often an instance says it is alive (and keeps the tick fresh)
ALIVE_S = 5.0  # an instance not heard of for this long is not counted
# How long a fence lives. Every instance that lost Redis notices its return within
# fallback.PROBE_S and writes back well inside it; the fence is gone before the first one
# switches back (fallback.SETTLE_S after its probe), or that one would be fenced again.
FENCE_MS = 600

# Raise the outage fence for ARGV[1] ms, never shortening it.
FENCE_LUA = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 1
"""

# One heartbeat: this instance's entry, the stale ones dropped, how many are alive (Redis TIME);
# and the fence's tick (acquire.lua does the same): a silence longer than the gap raises it.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fence_ms = tonumber(ARGV[4])
if fence_ms > 0 then
  local last = tonumber(redis.call('GET', KEYS[2]))
  if last and now - last > tonumber(ARGV[3]) and redis.call('ZCARD', KEYS[1]) > 1
     and redis.call('PTTL', KEYS[3]) < fence_ms then
    redis.call('SET', KEYS[3], '1', 'PX', fence_ms)
  end
  redis.call('SET', KEYS[2], now, 'PX', 60000)
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"""


def gap_ms(timeout_ms: int) -> int:
    """The silence that raises the fence: under the Redis timeout (a stall shorter than it
    sends nobody local), well over the heartbeats' spacing."""
    return max(int(BEAT_S * 1000 * 3), int(timeout_ms * 0.8))


def heartbeat(
    client: Any, keys: Keys, instance: str | None = None, *, gap_ms: int = 0, fence_ms: int = FENCE_MS
) -> Callable[[], Awaitable[int]]:
    """One heartbeat in Redis for this instance: returns how many instances are alive. With
    ``gap_ms`` > 0 it also keeps the fence's tick (a stall longer than ``gap_ms`` raises it)."""
    script = client.register_script(HEARTBEAT_LUA)
    me = instance or os.urandom(6).hex()
    alive_ms = str(int(ALIVE_S * 1000))
    keys_ = [keys.instances, keys.tick, keys.fence]
    args = [me, alive_ms, str(gap_ms), str(fence_ms if gap_ms > 0 else 0)]

    async def beat() -> int:
        return int(await asyncio.wait_for(script(keys=keys_, args=args), 0.5))

    return beat
