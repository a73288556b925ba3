-- renew: push back the end of a running job's concurrency lease, or restore one.
--
-- KEYS[1]   leases of the limit
-- ARGV[1]   ticket id
-- ARGV[2]   ttl (ms): the lease now ends at now + ttl
-- ARGV[3]   1 to create the lease if it is missing, whatever the capacity (a job known to be
--           running upstream: restored after a restart, or adopted by the reconciler); 0 to
--           renew only a lease that is still live
--
-- Returns 1 if the lease is live afterwards, 0 if it had lapsed or been released (integer).
-- A renewal never revives what a release removed: without ARGV[3] it only updates (ZADD XX).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  live = 1
else
  live = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[1])
  if live == 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) then live = 1 end
end
if live == 1 and redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
return live
