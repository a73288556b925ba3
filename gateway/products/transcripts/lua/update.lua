-- update: set fields of a job that has not ended; optionally mark it heard of.
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:running
-- KEYS[3]   an index key to set (the upstream id's), or the job's own hash for none
-- ARGV[1]   job id
-- ARGV[2]   now (wall ms) to record in jobs:running, or "" to leave it
-- ARGV[3]   1 to SET KEYS[3] to the job id (indexing its upstream id), else 0
-- ARGV[4..] fields: name, value, ...
--
-- Returns 1 if the job was updated, 0 if it had ended or does not exist.

local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'ended' then return 0 end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
if ARGV[3] == '1' then redis.call('SET', KEYS[3], ARGV[1]) end
return 1
