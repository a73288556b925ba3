-- create: record a new queued job, unless its idempotency key already names one.
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued (job id -> queue score)
-- KEYS[3]   the idempotency key (the job's own hash when there is none)
-- KEYS[4]   the admission arrival counter: the job takes its place in line now
-- ARGV[1]   job id
-- ARGV[2]   queue score
-- ARGV[3]   idempotency ttl (ms), 0 for none
-- ARGV[4..] the job's fields: name, value, name, value, ...
--
-- Returns {"", seq} when the job was created (seq: its arrival sequence, also stored in the
-- job), else {id, 0}: the job the idempotency key already names.

if tonumber(ARGV[3]) > 0 then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
end
local seq = redis.call('INCR', KEYS[4])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {'', seq}
