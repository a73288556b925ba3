-- purge: an ended job keeps only what maps its ids (its transcript was deleted upstream).
--
-- KEYS[1]   the job's hash
-- ARGV[1]   the snapshot to keep (JSON: its id and status)
-- ARGV[2..] fields to delete (the job's x:* items)
--
-- Returns 1 if purged, 0 if the job has not ended or does not exist (its expiry is kept).

if redis.call('HGET', KEYS[1], 'state') ~= 'ended' then return 0 end
for i = 2, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[1], 'body', '{}', 'error', '')
return 1
