-- refresh: push back the deadlines of waiting tickets and of their reservations.
--
-- KEYS[1]            wake channel
-- KEYS[4i-2..4i+1]   for limit i = 1..n: leases, wait, dead, resv
-- KEYS[4n+2..4n+4]   the account's share keys: share:dead, share:owner, share:lex
-- ARGV[1]            ticket ttl (ms): the new deadline is now + ttl
-- ARGV[2]            publish command: PUBLISH or SPUBLISH
-- ARGV[3]            n, the number of limits
-- ARGV[3+i]          name of limit i
-- ARGV[3+n+j]        ticket j
--
-- Returns, per ticket, the 1-based index of the limit whose queue it waits in, or 0 when it
-- waits nowhere (its deadline lapsed and it was purged: the owner must acquire afresh).
-- Lapsed entries are purged first, so a refresh never revives one (ZADD XX only updates).
-- A ticket waiting with an owner has its share entry's deadline pushed back with it; one that
-- waits nowhere leaves its owner's share.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local pubcmd = ARGV[2]
local n = tonumber(ARGV[3])
local deadline = now + ttl
-- Key lifetimes only ever grow (see acquire.lua).
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

for i = 1, n do
  local lk, wk, dk = KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  redis.call('ZREMRANGEBYSCORE', lk, '-inf', now)
  local dead = redis.call('ZRANGEBYSCORE', dk, '-inf', now)
  if #dead > 0 then
    for _, d in ipairs(dead) do
      redis.call('ZREM', wk, d)
      for j = 1, i - 1 do redis.call('ZREM', KEYS[4 * j + 1], d) end
    end
    redis.call('ZREMRANGEBYSCORE', dk, '-inf', now)
    redis.call(pubcmd, KEYS[1], ARGV[3 + i])
  end
end

local sdead, sowner, slex = KEYS[4 * n + 2], KEYS[4 * n + 3], KEYS[4 * n + 4]
local out = {}
for j = 4 + n, #ARGV do
  local ticket = ARGV[j]
  local where = 0
  for i = 1, n do
    if redis.call('ZSCORE', KEYS[4 * i], ticket) then where = i end
  end
  if where > 0 then
    redis.call('ZADD', KEYS[4 * where], 'XX', deadline, ticket)
    extend(KEYS[4 * where - 1], ttl + 1000)
    extend(KEYS[4 * where], ttl + 1000)
    for i = 1, where - 1 do
      local lk = KEYS[4 * i - 2]
      redis.call('ZADD', lk, 'XX', deadline, ticket .. ':r')
      extend(lk, ttl + 1000)
      extend(KEYS[4 * i + 1], ttl + 1000)
    end
    if redis.call('ZADD', sdead, 'XX', 'CH', deadline, ticket) == 1 then
      extend(sdead, ttl + 1000)
      extend(sowner, ttl + 1000)
      extend(slex, ttl + 1000)
    end
  else
    local owner = redis.call('HGET', sowner, ticket)
    if owner then
      redis.call('ZREM', slex, owner .. '\t' .. ticket)
      redis.call('HDEL', sowner, ticket)
      redis.call('ZREM', sdead, ticket)
    end
  end
  out[#out + 1] = where
end
return out
