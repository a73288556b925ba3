-- usage: tokens out and tickets waiting on one limit, as of Redis's clock.
--
-- KEYS[1]  leases of the limit
-- KEYS[2]  wait queue of the limit
-- KEYS[3]  dead (deadlines) of the limit
-- ARGV     none
--
-- Returns {tokens out (unexpired leases and reservations), live tickets waiting}. Read only.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
local waiting = redis.call('ZCOUNT', KEYS[3], '(' .. string.format('%.0f', now), '+inf')
return {out, waiting}
