-- portcullis budget settlement (SPEC §7, §9): adds a charge to the spend of every scope it
-- counts against (day, week and month), releases the request's reservation (unless it is a
-- realtime response charged on top of a reservation still held, or a request admitted while
-- Redis did not answer), and answers what is now spent of each cap, so the instance can tell
-- which 80 % and 100 % lines this charge crossed.
--
-- Idempotent, so a call retried (a lost reply, a charge queued during an outage and sent again)
-- counts once: the charge's id is remembered for a day, and a release happens only once (the
-- hold is gone after the first).
-- Key names come in ARGV; for a standalone Redis or Valkey, not Redis Cluster.
-- ARGV: charge marker key, member ('' = release nothing), tokens, cost, keep (s after a period's
--   end), n_scopes, then per scope: holds key, totals key, 3 x (spend key, period end in unix
--   s), n_caps, then per cap: period (1 day, 2 week, 3 month), unit ('t' or 'c')
-- Returns {applied (1, or 0 for a charge already counted), spend of each cap in order...}, as
-- strings.

local first = redis.call('SET', ARGV[1], '1', 'NX', 'EX', 86400)
local apply = first ~= false and first ~= nil
local member = ARGV[2]
local t = tonumber(ARGV[3])
local c = tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local i = 7
local out = {apply and '1' or '0'}
for _ = 1, n do
  local holds, totals = ARGV[i], ARGV[i + 1]
  i = i + 2
  if member ~= '' and redis.call('ZREM', holds, member) == 1 then
    local rt, rc = string.match(member, '|([^|]*)|([^|]*)$')
    redis.call('HINCRBYFLOAT', totals, 't', -(tonumber(rt) or 0))
    redis.call('HINCRBYFLOAT', totals, 'c', -(tonumber(rc) or 0))
    if redis.call('ZCARD', holds) == 0 then
      redis.call('DEL', totals)
    end
  end
  local spend = {}
  for p = 1, 3 do
    local sk, till = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    spend[p] = sk
    if apply and t > 0 then
      redis.call('HINCRBYFLOAT', sk, 't', t)
    end
    if apply and c > 0 then
      redis.call('HINCRBYFLOAT', sk, 'c', c)
    end
    -- Kept a while past its period, then gone: Redis holds no spend forever.
    if redis.call('EXISTS', sk) == 1 then
      redis.call('EXPIREAT', sk, till + keep)
    end
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
