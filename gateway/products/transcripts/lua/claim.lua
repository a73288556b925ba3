-- claim: queued -> claimed, only if the job is still queued (compare-and-set).
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued
-- KEYS[3]   jobs:running (job id -> last heard, wall ms)
-- ARGV[1]   job id
-- ARGV[2]   claimer: the instance and a token unique to this claim (so a replay is recognised)
-- ARGV[3]   claim length (ms, Redis time)
-- ARGV[4]   now (wall ms, for jobs:running)
--
-- Returns the job's fields after the claim (HGETALL), or an empty array if it was not queued.
-- Idempotent: run again by the same claimer (a client replaying after a lost reply), it
-- returns the job it claimed, unchanged.

local state = redis.call('HGET', KEYS[1], 'state')
if state == 'claimed' and redis.call('HGET', KEYS[1], 'claimer') == ARGV[2] then
  return redis.call('HGETALL', KEYS[1])
end
if state ~= 'queued' then return {} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'state', 'claimed', 'claimer', ARGV[2],
  'claim_until_ms', string.format('%.0f', now + tonumber(ARGV[3])))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return redis.call('HGETALL', KEYS[1])
