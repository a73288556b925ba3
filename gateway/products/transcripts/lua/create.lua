-- create: record a new queued job, unless its idempotency key already names one.
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued (job id -> queue score)
-- KEYS[3]   the idempotency key (the job's own hash when there is none)
-- ARGV[1]   job id
-- ARGV[2]   queue score
-- ARGV[3]   idempotency ttl (ms), 0 for none
-- ARGV[4..] the job's fields: name, value, name, value, ...
--
-- Returns "" when the job was created, else the id of the job the idempotency key names.

if tonumber(ARGV[3]) > 0 then
  local existing = redis.call('GET', KEYS[3])
  if existing then return existing end
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return ''
