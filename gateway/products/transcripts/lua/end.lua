-- end: a job ends, once. Its credential is deleted; the record (and its upstream id's index)
-- is kept for the retention period.
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued
-- KEYS[3]   jobs:running
-- KEYS[4]   the upstream id's index key (the job's own hash when it has none)
-- ARGV[1]   job id
-- ARGV[2]   retention (ms)
-- ARGV[3]   1 to create the upstream id's index (an id first learnt now, from an early webhook)
-- ARGV[4..] fields to set: name, value, ...
--
-- Returns the job's fields as they were before it ended (HGETALL), or an empty array if it
-- had already ended or does not exist.

local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'ended' then return {} end
local before = redis.call('HGETALL', KEYS[1])
local fields = {'state', 'ended'}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HDEL', KEYS[1], 'cred')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if KEYS[4] ~= KEYS[1] then
  if ARGV[3] == '1' then redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
  else redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
end
return before
