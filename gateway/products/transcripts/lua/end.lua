-- end: a job ends, once. Its credential is deleted; the record (and its upstream id's index)
-- is kept for the retention period.
--
-- KEYS[1]   the job's hash
-- KEYS[2]   jobs:queued
-- KEYS[3]   jobs:running
-- KEYS[4]   the upstream id's index key (the job's own hash when it has none)
-- KEYS[5]   this end's receipt (a list, same hash tag as the job): token, then the fields
-- ARGV[1]   job id
-- ARGV[2]   retention (ms)
-- ARGV[3]   1 to create the upstream id's index (an id first learnt now, from an early webhook)
-- ARGV[4]   a token unique to this call
-- ARGV[5..] fields to set: name, value, ...
--
-- Returns the job's fields as they were before it ended (HGETALL), or an empty array if it
-- had already ended or does not exist. Idempotent: a replay of the same call (same token,
-- after a lost reply, within a minute) returns the same fields again, less the credential,
-- the body and the snapshot (the receipt never holds them), so the caller still releases the
-- lease and tells the webhook.

local state = redis.call('HGET', KEYS[1], 'state')
if state == 'ended' and redis.call('LINDEX', KEYS[5], 0) == ARGV[4] then
  return redis.call('LRANGE', KEYS[5], 1, -1)
end
if not state or state == 'ended' then return {} end
local before = redis.call('HGETALL', KEYS[1])
local receipt = {ARGV[4]}
-- The receipt keeps what the caller needs to finish (ticket, times, the webhook), never the
-- credential, the request body or upstream's view: nothing anyone could fill, nothing private.
local emptied = {body = '{}', snapshot = ''}
for i = 1, #before, 2 do
  local name = before[i]
  if name ~= 'cred' then
    receipt[#receipt + 1] = name
    receipt[#receipt + 1] = emptied[name] or before[i + 1]
  end
end
redis.call('DEL', KEYS[5])
redis.call('RPUSH', KEYS[5], unpack(receipt))
redis.call('PEXPIRE', KEYS[5], 60000)
local fields = {'state', 'ended'}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
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
