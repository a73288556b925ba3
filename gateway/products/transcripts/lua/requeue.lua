-- requeue: claimed -> queued under a new attempt (nothing reached upstream, or it refused).
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued
-- KEYS[3]   jobs:running
-- ARGV[1]   job id
-- ARGV[2]   the new attempt number
-- ARGV[3]   queue score
-- ARGV[4]   the claimer whose claim this ends, or "" for any (a stale requeue from an old
--           claim must not put back a job another claimer is POSTing)
--
-- Returns 1 if requeued, 0 if the job was not claimed (by that claimer). Idempotent: run again (a replay after
-- a lost reply) on a job already queued under that attempt, it returns 1 and changes nothing.

local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' and redis.call('HGET', KEYS[1], 'attempt') == ARGV[2] then return 1 end
if state ~= 'claimed' then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'claimer') ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', ARGV[2], 'claimer', '', 'claim_until_ms', '0')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
