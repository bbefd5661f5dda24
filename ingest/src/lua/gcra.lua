-- gcra.lua: the tenant's events-per-second limit, shared by every ingest replica (GCRA).
--
-- KEYS[1]  the tenant's theoretical arrival time (TAT), microseconds since the epoch, as an
--          integer string: cr:{tenant}:rl
-- ARGV[1]  emission interval T, microseconds per event (1e6 / rate, at least 1)
-- ARGV[2]  burst: events that may arrive at once (the rate: one second's worth)
-- ARGV[3]  n, the events of this request
--
-- Returns {1, 0} when allowed (the TAT moved n*T on), {0, wait_us} when refused (nothing
-- changes): the request fits once the TAT minus the burst's tolerance is not after now.
-- The clock is the server's (TIME), so replicas with skewed clocks agree.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
if n > burst then
  return {0, -1}
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + n * T
local allow_at = new_tat - burst * T
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
return {1, 0}
