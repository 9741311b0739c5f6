-- portcullis budget admission (SPEC §7 "Reservations", §9): admits a request only if, for every
-- cap of every scope that applies (its key, its user, the gateway), spent + reserved in flight
-- + its own reservation stays within the cap; then holds its reservation in each scope. Atomic:
-- parallel requests on several instances see each other's reservations.
--
-- Key names come in ARGV (they depend on how many scopes and caps apply); this script is for a
-- standalone Redis or Valkey, not Redis Cluster.
-- ARGV: now_ms, deadline_ms, member, own_tokens, own_cost, n_scopes, then per scope:
--   reservations key, n_caps, then per cap: spend key, unit ('t' or 'c'), limit, period end (s)
-- A reservation is a member "<id>|<tokens>|<cost>" of its scope's sorted set, scored by the time
-- it lapses (an instance that died with requests in flight holds them no longer than that).
-- Returns 0 when admitted, else the latest end (unix seconds) of the caps that refused.

local now = tonumber(ARGV[1])
local deadline = tonumber(ARGV[2])
local member = ARGV[3]
local own = {t = tonumber(ARGV[4]), c = tonumber(ARGV[5])}
local n = tonumber(ARGV[6])
local i = 7
local refused = nil
local holds = {}
for _ = 1, n do
  local rk = ARGV[i]
  local ncaps = tonumber(ARGV[i + 1])
  i = i + 2
  holds[#holds + 1] = rk
  redis.call('ZREMRANGEBYSCORE', rk, '-inf', now)
  local reserved = {t = 0, c = 0}
  if ncaps > 0 then
    for _, m in ipairs(redis.call('ZRANGE', rk, 0, -1)) do
      local t, c = string.match(m, '|([^|]*)|([^|]*)$')
      reserved.t = reserved.t + (tonumber(t) or 0)
      reserved.c = reserved.c + (tonumber(c) or 0)
    end
  end
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
for _, rk in ipairs(holds) do
  redis.call('ZADD', rk, deadline, member)
  if redis.call('PTTL', rk) < deadline - now then
    redis.call('PEXPIRE', rk, deadline - now)
  end
end
return 0
