-- portcullis budget settlement (SPEC §7, §9): adds a charge to the spend of every scope it
-- counts against (day, week and month), releases the request's reservation (unless it is a
-- realtime response charged on top of a reservation still held), and answers what is now spent
-- of each cap, so the instance can tell which 80 % and 100 % lines this charge crossed.
--
-- Key names come in ARGV; for a standalone Redis or Valkey, not Redis Cluster.
-- ARGV: member ('' = release nothing), tokens, cost, keep (s after a period's end), n_scopes,
--   then per scope: reservations key, 3 x (spend key, period end in unix s), n_caps, then per
--   cap: period (1 day, 2 week, 3 month), unit ('t' or 'c')
-- Returns the spend of each cap, in order, as strings.

local member = ARGV[1]
local t = tonumber(ARGV[2])
local c = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local i = 6
local out = {}
for _ = 1, n do
  local rk = ARGV[i]
  i = i + 1
  if member ~= '' then
    redis.call('ZREM', rk, member)
  end
  local spend = {}
  for p = 1, 3 do
    local sk, till = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    spend[p] = sk
    if t > 0 then
      redis.call('HINCRBYFLOAT', sk, 't', t)
    end
    if c > 0 then
      redis.call('HINCRBYFLOAT', sk, 'c', c)
    end
    -- Kept a while past its period, then gone: Redis holds no spend forever.
    redis.call('EXPIREAT', sk, till + keep)
  end
  local ncaps = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, ncaps do
    local p, unit = tonumber(ARGV[i]), ARGV[i + 1]
    i = i + 2
    out[#out + 1] = redis.call('HGET', spend[p], unit) or '0'
  end
end
return out
