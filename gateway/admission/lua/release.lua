-- release: give back what a ticket holds on some limits (leases, reservations, its place in
-- their queues), and optionally leave a tombstone so a late acquire of it does nothing.
--
-- KEYS[1]            tombstone of this ticket
-- KEYS[2]            wake channel
-- KEYS[4i-1..4i+2]   for limit i = 1..n: leases, wait, dead, resv
-- KEYS[4n+3..4n+5]   the account's share keys: share:dead, share:owner, share:lex
-- KEYS[4n+6]         this ticket's "ended" marker: set (ENDED_MS) when a lease is removed, so a
--                    renewal racing this release never restores the lease (renew.lua)
-- ARGV[1]            ticket id
-- ARGV[2]            tombstone ttl (ms), 0 for none
-- ARGV[3]            publish command: PUBLISH or SPUBLISH
-- ARGV[4]            n, the number of limits
-- ARGV[4+i]          name of limit i
--
-- Returns the number of live entries removed (integer; a lease, reservation or waiting ticket
-- that already lapsed does not count: lapsed entries are purged first, as acquire does). Publishes the name of every limit on which something live was
-- removed: capacity, or a place in a queue, may now be owed to a waiter. The ticket also leaves
-- its owner's share of the queue (share keys), if it waited with an owner.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ticket = ARGV[1]
local tomb_ms = tonumber(ARGV[2])
local pubcmd = ARGV[3]
local n = tonumber(ARGV[4])

local removed = 0
local leases_gone = 0
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[4 * i - 1], '-inf', now)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4 * i + 1], '-inf', now)
  if #dead > 0 then
    for _, d in ipairs(dead) do
      redis.call('ZREM', KEYS[4 * i], d)
      for j = 1, i - 1 do redis.call('ZREM', KEYS[4 * j + 2], d) end
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[4 * i + 1], '-inf', now)
    redis.call(pubcmd, KEYS[2], ARGV[4 + i])
  end
  local lease = redis.call('ZREM', KEYS[4 * i - 1], ticket)
  leases_gone = leases_gone + lease
  local got = lease + redis.call('ZREM', KEYS[4 * i - 1], ticket .. ':r')
    + redis.call('ZREM', KEYS[4 * i], ticket)
  redis.call('ZREM', KEYS[4 * i + 1], ticket)
  redis.call('ZREM', KEYS[4 * i + 2], ticket)
  if got > 0 then
    removed = removed + got
    redis.call(pubcmd, KEYS[2], ARGV[4 + i])
  end
end
local sdead, sowner, slex = KEYS[4 * n + 3], KEYS[4 * n + 4], KEYS[4 * n + 5]
local owner = redis.call('HGET', sowner, ticket)
if owner then
  redis.call('ZREM', slex, owner .. '\t' .. ticket)
  redis.call('HDEL', sowner, ticket)
  redis.call('ZREM', sdead, ticket)
end
if tomb_ms > 0 then
  redis.call('SET', KEYS[1], '1', 'PX', tomb_ms)
end
if leases_gone > 0 then
  redis.call('SET', KEYS[4 * n + 6], '1', 'PX', 60000)
end
return removed
