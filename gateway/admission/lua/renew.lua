-- renew: push back the end of a running job's concurrency lease, or restore a lost one.
--
-- KEYS[1]   leases of the limit
-- KEYS[2]   the ticket's "ended" marker (release.lua sets it when it removes a lease)
-- ARGV[1]   ticket id
-- ARGV[2]   ttl (ms): the lease now ends at now + ttl
-- ARGV[3]   1 to re-create the lease if it is missing (work the gateway knows is running
--           upstream: a lease lost in a Redis failover, or forgotten by the embedded store
--           on a restart), 0 to renew only a lease that is still live
-- ARGV[4]   the limit's capacity (to tell a restoration that puts the limit over it)
--
-- Returns (integer) 1 if the live lease was pushed back; 2 if it was missing and has been
-- restored within the capacity; 3 if restored and the limit's leases and reservations now
-- outnumber its capacity (the account runs over: the work runs anyway, and counting it stops
-- new admissions until the count is back under the capacity); 0 if it had lapsed or been
-- released and is not restored (ARGV[3] is 0, or the ended marker says a release removed it:
-- a renewal racing a release never revives the lease).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
  live = 1
elseif ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  live = 2
  if redis.call('ZCARD', KEYS[1]) > tonumber(ARGV[4]) then live = 3 end
else
  return 0
end
if redis.call('PTTL', KEYS[1]) < ttl + 1000 then
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
return live
