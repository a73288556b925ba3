-- create: record a new queued job, unless its idempotency key already names one.
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued (job id -> queue score)
-- KEYS[3]   the idempotency key (the job's own hash when there is none)
-- KEYS[4]   the admission arrival counter: the job takes its place in line now
-- ARGV[1]   job id
-- ARGV[2]   queue score
-- ARGV[3]   idempotency ttl (ms), 0 for none
-- ARGV[4]   floor: the highest arrival sequence the caller has seen (0 if none)
-- ARGV[5..] the job's fields: name, value, name, value, ...
--
-- Returns {"", seq} when the job was created (seq: its arrival sequence, also stored in the
-- job), else {id, 0}: the job the idempotency key already names.
--
-- The sequence is taken as acquire.lua takes it: a lost or rolled-back counter (a Redis
-- restart, a failover, an eviction) must not put new jobs ahead of old ones, so a missing
-- counter is seeded from the clock (ms since 2025: 1,000 arrivals a second of headroom, as
-- acquire's seed), and no new sequence is at or below what the caller has already seen.

if tonumber(ARGV[3]) > 0 then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3])
end
local floor = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[4]) == 0 then
  local t = redis.call('TIME')
  local ms = (tonumber(t[1]) - 1735689600) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('SET', KEYS[4], string.format('%.0f', math.max(ms, floor)))
end
local seq = redis.call('INCR', KEYS[4])
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[4], string.format('%.0f', seq))
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {'', seq}
