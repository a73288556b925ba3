-- renew: push back the end of a running job's concurrency lease, or restore one.
--
-- KEYS[1]   leases of the limit
-- ARGV[1]   ticket id
-- ARGV[2]   ttl (ms): the lease now ends at now + ttl
-- ARGV[3]   what to do when the lease is missing:
--           '0' nothing: renew only a lease that is still live (ZADD XX);
--           '1' create it whatever the capacity (a job known to be running upstream, restored
--               into an embedded store that forgot everything on restart);
--           '2' restore it only if the limit has room (ARGV[4]): the work is known to be
--               running (a lease lost in a Redis failover), but a restoration never makes the
--               leases and reservations outnumber the capacity (I2)
-- ARGV[4]   the limit's capacity (mode '2')
--
-- Returns (integer) 1 if the live lease was pushed back, 2 if it was missing and has been
-- (re)created, 0 if it had lapsed or been released (mode '0'), -1 if it was missing and the
-- limit is full (mode '2': nothing written).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
  live = 1
elseif ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  live = 2
elseif ARGV[3] == '2' and redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  live = 2
elseif ARGV[3] == '2' then
  return -1
else
  return 0
end
if redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
return live
