-- portcullis budget admission (SPEC §7 "Reservations", §9): admits a request only if, for every
-- cap of every scope that applies (its key, its user, the gateway), spent + reserved in flight
-- + its own reservation stays within the cap; then holds its reservation in each scope. Atomic:
-- parallel requests on several instances see each other's reservations.
--
-- Key names come in ARGV (they depend on how many scopes and caps apply); this script is for a
-- standalone Redis or Valkey, not Redis Cluster.
-- ARGV: now_ms, deadline_ms, member, own_tokens, own_cost, n_scopes, then per scope:
--   holds key, totals key, n_caps, then per cap: spend key, unit ('t' or 'c'), limit,
--   period end (unix s)
-- A scope's reservations in flight are the members "<id>|<tokens>|<cost>" of its holds (a sorted
-- set scored by the time each lapses: an instance that died with requests in flight holds them
-- no longer than that), summed in its totals (a hash, so admission reads two numbers, not every
-- hold). Returns 0 when admitted, else the latest end (unix seconds) of the caps that refused.

local now = tonumber(ARGV[1])
local deadline = tonumber(ARGV[2])
local member = ARGV[3]
local own = {t = tonumber(ARGV[4]), c = tonumber(ARGV[5])}
local n = tonumber(ARGV[6])

local function amounts(m)
  local t, c = string.match(m, '|([^|]*)|([^|]*)$')
  return tonumber(t) or 0, tonumber(c) or 0
end

local i = 7
local refused = nil
local scopes = {}
for _ = 1, n do
  local holds, totals, ncaps = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  scopes[#scopes + 1] = {holds, totals}
  -- Holds that lapsed no longer count.
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', holds, '-inf', now)) do
    local t, c = amounts(m)
    redis.call('HINCRBYFLOAT', totals, 't', -t)
    redis.call('HINCRBYFLOAT', totals, 'c', -c)
  end
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', now)
  if redis.call('ZCARD', holds) == 0 then
    redis.call('DEL', totals)
  end
  local reserved = {
    t = math.max(tonumber(redis.call('HGET', totals, 't')) or 0, 0),
    c = math.max(tonumber(redis.call('HGET', totals, 'c')) or 0, 0),
  }
  for _ = 1, ncaps do
    local sk, unit, limit, till = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
    i = i + 4
    local spent = tonumber(redis.call('HGET', sk, unit)) or 0
    if spent >= limit or spent + reserved[unit] + own[unit] > limit then
      if refused == nil or till > refused then
        refused = till
      end
    end
  end
end
if refused then
  return refused
end
for _, s in ipairs(scopes) do
  local holds, totals = s[1], s[2]
  redis.call('ZADD', holds, deadline, member)
  redis.call('HINCRBYFLOAT', totals, 't', own.t)
  redis.call('HINCRBYFLOAT', totals, 'c', own.c)
  -- Both live as long as their longest hold.
  if redis.call('PTTL', holds) < deadline - now then
    redis.call('PEXPIRE', holds, deadline - now)
    redis.call('PEXPIRE', totals, deadline - now)
  end
end
return 0
