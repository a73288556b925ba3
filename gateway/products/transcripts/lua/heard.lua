-- heard: mark a running job heard of now, if nobody has since a given time (compare-and-set),
-- so one instance, not all, looks it up.
--
-- KEYS[1]   jobs:running (job id -> last heard, wall ms)
-- ARGV[1]   job id
-- ARGV[2]   heard before (wall ms): only if its last-heard time is older than this
-- ARGV[3]   now (wall ms)
--
-- Returns 1 if this caller marked it (and should look it up), 0 otherwise.

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
