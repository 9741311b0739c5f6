-- portcullis admission (SPEC §9): the shared-state checks of SPEC §3 steps 5-8 for one request,
-- in order, stopping at the first refusal. One call, one round trip; atomic, so instances
-- behind a load balancer cannot race each other between "check" and "count".
--
-- KEYS[1] lockout marker of the client (exists while it is locked out)
-- KEYS[2] recent failed key checks of the client (sorted set, scored by time)
-- KEYS[3] per-IP limiter state (the GCRA theoretical arrival time, microseconds)
-- KEYS[4] per-key limiter state
-- ARGV[1] check the lockout: 1/0
-- ARGV[2], ARGV[3] per-IP limit: emission interval (us, 0 = no check), burst
-- ARGV[4] count a failed key check: 1/0
-- ARGV[5], ARGV[6], ARGV[7] lockout: failures, window (us), duration (ms)
-- ARGV[8] a fresh id for this failure (its member in KEYS[2]; made by the gateway for each call,
--         never from the request, so a client cannot make its failures one)
-- ARGV[9], ARGV[10] per-key limit: emission interval (us, 0 = no check), burst
--
-- Returns {stage, ip_remaining, key_remaining, wait, failures}: stage 0 admitted, 1 locked out
-- (wait: ms left), 2 per-IP limit (wait: us), 3 failure counted (wait: 1 if it started a
-- lockout), 4 per-key limit (wait: us). A remaining of -1: not checked.
-- Every key written gets a TTL: Redis holds nothing after its window has passed.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- GCRA, as governor computes it: a burst of n, then one every T. Returns remaining, or -1 and
-- the wait; a refusal changes nothing.
local function gcra(key, T, n)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + T
  local ahead = new_tat - now
  if ahead > T * n then
    return -1, ahead - T * n
  end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000) + 1)
  return math.floor((T * n - ahead) / T), 0
end

if ARGV[1] == '1' then
  local left = redis.call('PTTL', KEYS[1])
  if left > 0 then
    return {1, -1, -1, left, 0}
  end
end

local ip_left = -1
local ip_T = tonumber(ARGV[2])
if ip_T > 0 then
  local wait
  ip_left, wait = gcra(KEYS[3], ip_T, tonumber(ARGV[3]))
  if ip_left < 0 then
    return {2, -1, -1, wait, 0}
  end
end

if ARGV[4] == '1' then
  local limit = tonumber(ARGV[5])
  local window = tonumber(ARGV[6])
  -- Failures older than the window no longer count.
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('(%.0f', now - window))
  redis.call('ZADD', KEYS[2], string.format('%.0f', now), ARGV[8])
  redis.call('PEXPIRE', KEYS[2], math.ceil(window / 1000) + 1)
  local count = redis.call('ZCARD', KEYS[2])
  if count >= limit then
    -- A lockout of 0 ms begins and ends at once (as in the instance's own state).
    local duration = tonumber(ARGV[7])
    if duration > 0 then
      redis.call('SET', KEYS[1], '1', 'PX', duration)
    end
    redis.call('DEL', KEYS[2])
    return {3, ip_left, -1, 1, count}
  end
  return {3, ip_left, -1, 0, count}
end

local key_left = -1
local key_T = tonumber(ARGV[9])
if key_T > 0 then
  local wait
  key_left, wait = gcra(KEYS[4], key_T, tonumber(ARGV[10]))
  if key_left < 0 then
    return {4, ip_left, -1, wait, 0}
  end
end

return {0, ip_left, key_left, 0, 0}
