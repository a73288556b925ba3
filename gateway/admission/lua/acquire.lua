-- acquire: check and charge every limit a request needs, all or nothing, in one step.
--
-- KEYS[1]            arrival counter (string)
-- KEYS[2]            tombstone of this ticket
-- KEYS[3]            wake channel (declared so Cluster routes the publish with the account)
-- KEYS[4i..4i+3]     for limit i = 1..n, in the engine's total order: leases, wait, dead, resv
-- KEYS[4n+4..4n+6]   the account's share keys: share:dead, share:owner, share:lex (keys.py)
-- KEYS[4n+7..4n+9]   the outage fence's keys: tick, fence, instances (keys.py; fallback.py)
-- ARGV[1]            ticket id
-- ARGV[2]            priority, 0..99 (higher goes first)
-- ARGV[3]            arrival sequence, or 0 on the first acquire
-- ARGV[4]            ticket ttl (ms): deadline of a waiting ticket and its reservations
-- ARGV[5]            max depth: refuse (FULL) when this many tickets wait ahead on the blocking limit
-- ARGV[6]            publish command: PUBLISH or SPUBLISH
-- ARGV[7]            floor: the highest arrival sequence the caller has seen (0 if none)
-- ARGV[8]            owner id of the ticket (keys.owner_id; no tab), or '' for none
-- ARGV[9]            owner depth: refuse (SHARE_FULL) a ticket that would START waiting when
--                    this many of its owner's tickets already wait, account-wide; -1 for no share
-- ARGV[10]           n, the number of limits
-- ARGV[11]           the most (ticket, score) pairs a BLOCKED reply carries (store.FIRST_MAX)
-- ARGV[3i+9..3i+11]  for limit i: name, capacity, lease ms (window + guard, or concurrency ttl)
-- ARGV[3n+12]        gap ms: a stall this long since the last acquire or heartbeat raises the fence
-- ARGV[3n+13]        fence ms: how long a raised fence lives; 0 turns the fence off (fail_closed)
--
-- Returns an array of integers (never false: it would arrive as None):
--   ADMITTED {1, seq, score, 0, owed, now ms, remaining_1, reset_ms_1, ..., remaining_n, reset_ms_n}:
--             owed is the score of the last ticket the capacity now free is owed to, in the
--             queue this ticket left (the first min(free, queued) of it), or 0: the tickets
--             up to it may all be retried at once
--   BLOCKED  {2, seq, score, blocked index (1-based), tickets ahead, wait hint ms, now ms,
--             ticket_1, score_1, ..., ticket_k, score_k}: now is the Redis time the hint is
--             counted from (the caller wakes at now + hint, whenever the reply is read); then
--             the first k tickets of the blocking
--             queue, ahead of this one, with their current scores (k = min(ahead, max(free, 1),
--             ARGV[11])): the store's order, which the caller's local queues follow
--   FULL     {3, seq, score, blocked index, tickets ahead, 0}
--   ABORTED  {4, seq, 0, 0, 0, 0}
--   SHARE_FULL {5, seq, score, blocked index, the owner's waiting tickets, 0}
--   FENCED   {6, seq, 0, 0, 0, fence ms left}: another instance may be admitting locally (it
--             lost Redis): nothing was taken or changed, not even an arrival sequence
-- Times are Redis's clock (TIME), in ms; "now ms" (ADMITTED, BLOCKED) is when this ran, so
-- the caller can tell Redis's clock from its own and wake at a Redis-time instant. Members of leases:L are the ticket itself (a lease)
-- and ticket..':r' (a reservation), so a reservation refresh can never touch a lease.
-- resv:L maps each reservation holder to its ordering score (for priority inheritance).
-- Publishes "<limit>" when capacity on it may be owed to a waiter, and
-- "<limit>\t<ticket>\t<score>" when a waiter in that limit's queue inherited a priority.
-- A waiting ticket with an owner is in the share keys, with the same deadline as in dead:L
-- (so it lapses with it); it leaves them when it is admitted, refused or released.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local ticket = ARGV[1]
local prio = tonumber(ARGV[2])
if prio < 0 then prio = 0 elseif prio > 99 then prio = 99 end
local seq = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local max_depth = tonumber(ARGV[5])
local pubcmd = ARGV[6]
local floor = tonumber(ARGV[7])
local owner = ARGV[8]
local odepth = tonumber(ARGV[9])
local n = tonumber(ARGV[10])
local resv = ticket .. ':r'
local SPAN = 1000000000000

if redis.call('EXISTS', KEYS[2]) == 1 then
  return {4, seq, 0, 0, 0, 0}
end

-- The outage fence (fallback.py): with more than one instance, a stall of Redis longer than
-- the gap (no acquire or heartbeat ran meanwhile: heartbeats keep it short) may have sent an
-- instance to admit locally, as may an instance that raised the fence itself; until every
-- one of them has written back, nothing is admitted here: the caller joins them.
local fence_ms = tonumber(ARGV[3 * n + 13])
if fence_ms > 0 then
  local tick, fence = KEYS[4 * n + 7], KEYS[4 * n + 8]
  local last = tonumber(redis.call('GET', tick))
  -- The heartbeats keep the tick (every 50 ms per instance): an acquire writes it only when
  -- it finds it missing or stale, so the common path only reads.
  if not last or now - last > tonumber(ARGV[3 * n + 12]) then
    if last and redis.call('ZCARD', KEYS[4 * n + 9]) > 1 and redis.call('PTTL', fence) < fence_ms then
      redis.call('SET', fence, '1', 'PX', fence_ms)
    end
    redis.call('SET', tick, now, 'PX', 60000)
  end
  local left = redis.call('PTTL', fence)
  if left > 0 then
    return {6, seq, 0, 0, 0, left}
  end
end

-- The arrival sequence: taken once, kept for life. A lost or rolled-back counter (a Redis
-- restart or failover) must not put new arrivals ahead of old waiters: a missing counter is
-- seeded from the clock (1,000 arrivals a second of headroom since 2025, 31 years of room
-- below 10^12), no new sequence is at or below what the caller has already seen, and every
-- sequence an old waiter presents pushes the counter past it.
if seq == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', math.max((tonumber(t[1]) - 1735689600) * 1000, floor)))
  end
  seq = redis.call('INCR', KEYS[1])
  if seq <= floor then
    seq = floor + 1
    redis.call('SET', KEYS[1], string.format('%.0f', seq))
  end
else
  local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
  if cur < seq then redis.call('SET', KEYS[1], string.format('%.0f', seq)) end
end
local score = (99 - prio) * SPAN + seq

local function lk(i) return KEYS[4 * i] end
local function wk(i) return KEYS[4 * i + 1] end
local function dk(i) return KEYS[4 * i + 2] end
local function rk(i) return KEYS[4 * i + 3] end
local function name(i) return ARGV[3 * i + 9] end
local function cap(i) return tonumber(ARGV[3 * i + 10]) end
local function lease_ms(i) return tonumber(ARGV[3 * i + 11]) end
local first_max = tonumber(ARGV[11])
local sdead, sowner, slex = KEYS[4 * n + 4], KEYS[4 * n + 5], KEYS[4 * n + 6]
local function fmt(x) return string.format('%.0f', x) end
-- Key lifetimes only ever grow: a key outlives every entry written into it (a short-lived
-- ticket must not cut short a queue that also holds a longer-lived one).
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

local publish = {}

-- 1. Drop what has lapsed: expired leases and reservations, and dead tickets (their owners
--    stopped refreshing). A queue that lost a ticket may owe capacity to those behind it.
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', lk(i), '-inf', now)
  local dead = redis.call('ZRANGEBYSCORE', dk(i), '-inf', now)
  if #dead > 0 then
    for _, d in ipairs(dead) do
      redis.call('ZREM', wk(i), d)
      for j = 1, i - 1 do redis.call('ZREM', rk(j), d) end
    end
    redis.call('ZREMRANGEBYSCORE', dk(i), '-inf', now)
    publish[i] = true
  end
end

-- 2. Where the ticket waits now, and its effective score (an inherited priority is kept).
local cur_q = 0
for i = 1, n do
  local s = redis.call('ZSCORE', wk(i), ticket)
  if s then
    cur_q = i
    s = tonumber(s)
    if s < score then score = s end
  end
end

-- 3. Reads and checks, in order; stop at the first limit that blocks.
local holds = {}
local blocked, ahead_b, free_b = 0, 0, 0
for i = 1, n do
  if redis.call('ZSCORE', lk(i), ticket) then
    holds[i] = 'l'
  elseif redis.call('ZSCORE', lk(i), resv) then
    holds[i] = 'r'
  else
    local free = cap(i) - redis.call('ZCARD', lk(i))
    local ahead = redis.call('ZCOUNT', wk(i), '-inf', '(' .. fmt(score))
    if ahead >= free then
      blocked, ahead_b, free_b = i, ahead, free
      break
    end
  end
end

local inherited = {}
local function do_publish()
  for i = 1, n do
    if publish[i] then redis.call(pubcmd, KEYS[3], name(i)) end
  end
  for _, msg in ipairs(inherited) do redis.call(pubcmd, KEYS[3], msg) end
end

-- The ticket's entry in the share keys (it waited with an owner), if any.
local function leave_share(t)
  local o = redis.call('HGET', sowner, t)
  if o then
    redis.call('ZREM', slex, o .. '\t' .. t)
    redis.call('HDEL', sowner, t)
  end
  redis.call('ZREM', sdead, t)
end

local function leave_queue(i)
  redis.call('ZREM', wk(i), ticket)
  redis.call('ZREM', dk(i), ticket)
end

-- 4. Writes last; nothing below can fail on well-typed keys.
if blocked == 0 then
  local out = {1, seq, score, 0, 0, now}
  for i = 1, n do
    if holds[i] ~= 'l' then
      redis.call('ZREM', lk(i), resv)
      redis.call('ZREM', rk(i), ticket)
      redis.call('ZADD', lk(i), now + lease_ms(i), ticket)
      extend(lk(i), math.max(lease_ms(i), ttl) + 1000)
    else
      -- Held already: a re-run, or an acquire whose reply was lost (the caller then forwards
      -- only now). The lease counts from now, never less: the guard covers this admission.
      redis.call('ZADD', lk(i), 'GT', now + lease_ms(i), ticket)
      extend(lk(i), math.max(lease_ms(i), ttl) + 1000)
    end
    if cur_q == i then
      leave_queue(i)
      leave_share(ticket)
    end
    local first = redis.call('ZRANGE', lk(i), 0, 0, 'WITHSCORES')
    local reset = 0
    if #first > 0 then reset = tonumber(first[2]) - now end
    out[#out + 1] = cap(i) - redis.call('ZCARD', lk(i))
    out[#out + 1] = reset
    if cur_q == i and out[#out - 1] > 0 then
      local queued = redis.call('ZCARD', wk(i))
      if queued > 0 then
        local last = math.min(out[#out - 1], queued) - 1
        out[5] = tonumber(redis.call('ZRANGE', wk(i), last, last, 'WITHSCORES')[2])
      end
    end
  end
  do_publish()
  return out
end

-- The owner's share: a ticket about to START waiting is refused when its owner already has
-- odepth tickets waiting (lapsed ones pruned first, in Redis time). One that already waits
-- keeps its place. Only this path reads the share keys: an admission that does not wait
-- costs nothing more.
local mine = -1
if cur_q == 0 and odepth >= 0 then
  local lapsed = redis.call('ZRANGEBYSCORE', sdead, '-inf', now)
  for _, d in ipairs(lapsed) do leave_share(d) end
  mine = redis.call('ZLEXCOUNT', slex, '[' .. owner .. '\t', '(' .. owner .. '\n')
  if mine < odepth then mine = -1 end
end

if mine >= 0 or (cur_q ~= blocked and ahead_b >= max_depth) then
  -- Refused outright: keep nothing, and tell those this ticket was holding up.
  for i = 1, n do
    if holds[i] == 'r' then
      redis.call('ZREM', lk(i), resv)
      redis.call('ZREM', rk(i), ticket)
      publish[i] = true
    end
  end
  if cur_q > 0 then
    leave_queue(cur_q)
    leave_share(ticket)
    publish[cur_q] = true
  end
  do_publish()
  if mine >= 0 then return {5, seq, score, blocked, mine, 0} end
  return {3, seq, score, blocked, ahead_b, 0}
end

local deadline = now + ttl
for i = 1, n do
  if i < blocked then
    if holds[i] ~= 'l' then
      redis.call('ZADD', lk(i), deadline, resv)
      redis.call('ZADD', rk(i), score, ticket)
      extend(lk(i), math.max(lease_ms(i), ttl) + 1000)
      extend(rk(i), math.max(lease_ms(i), ttl) + 1000)
    end
  elseif holds[i] == 'r' then
    -- A reservation beyond the blocking limit (an earlier pass) is given back at once.
    redis.call('ZREM', lk(i), resv)
    redis.call('ZREM', rk(i), ticket)
    publish[i] = true
  end
end
if cur_q ~= blocked and cur_q > 0 then
  leave_queue(cur_q)
  -- Leaving a later queue without consuming its limit: those behind it move up.
  if cur_q > blocked then publish[cur_q] = true end
end
redis.call('ZADD', wk(blocked), score, ticket)
redis.call('ZADD', dk(blocked), deadline, ticket)
extend(wk(blocked), ttl + 1000)
extend(dk(blocked), ttl + 1000)
if odepth >= 0 then
  redis.call('ZADD', sdead, deadline, ticket)
  redis.call('HSET', sowner, ticket, owner)
  redis.call('ZADD', slex, 0, owner .. '\t' .. ticket)
  extend(sdead, ttl + 1000)
  extend(sowner, ttl + 1000)
  extend(slex, ttl + 1000)
end

-- Priority inheritance: a reservation is never taken away, but a holder that blocks this
-- ticket on B while ranking below it takes this ticket's priority (keeping its own arrival
-- sequence) in the queue it waits in, so the inversion lasts no longer than its own wait at
-- that priority. Classes that share B share every limit after it, so its queue is among ours.
local band = math.floor(score / SPAN)
local holders = redis.call('ZRANGEBYSCORE', rk(blocked), fmt((band + 1) * SPAN), '+inf', 'WITHSCORES')
for h = 1, #holders, 2 do
  local holder, hscore = holders[h], tonumber(holders[h + 1])
  if redis.call('ZSCORE', lk(blocked), holder .. ':r') then
    local lifted = band * SPAN + (hscore % SPAN)
    for j = 1, n do
      if redis.call('ZSCORE', rk(j), holder) then redis.call('ZADD', rk(j), lifted, holder) end
    end
    for j = blocked + 1, n do
      if redis.call('ZSCORE', wk(j), holder) then
        redis.call('ZADD', wk(j), lifted, holder)
        inherited[#inherited + 1] = name(j) .. '\t' .. holder .. '\t' .. fmt(lifted)
        break
      end
    end
  else
    redis.call('ZREM', rk(blocked), holder)
  end
end

-- Wait hint: until the lease that frees this ticket's turn ends (0-based index ahead - free
-- in expiry order), or until the earliest deadline in the queue, whichever comes first.
local hint = ttl
local k = ahead_b - free_b
if k >= 0 then
  local e = redis.call('ZRANGE', lk(blocked), k, k, 'WITHSCORES')
  if #e > 0 then hint = math.min(hint, tonumber(e[2]) - now) end
end
local d = redis.call('ZRANGE', dk(blocked), 0, 0, 'WITHSCORES')
if #d > 0 and d[1] ~= ticket then hint = math.min(hint, tonumber(d[2]) - now) end
if hint < 1 then hint = 1 end
do_publish()
local out = {2, seq, score, blocked, ahead_b, hint, now}
local k_first = math.min(ahead_b, math.max(free_b, 1), first_max)
if k_first > 0 then
  local firsts = redis.call('ZRANGE', wk(blocked), 0, k_first - 1, 'WITHSCORES')
  for f = 1, #firsts, 2 do
    out[#out + 1] = firsts[f]
    out[#out + 1] = tonumber(firsts[f + 1])
  end
end
return out
