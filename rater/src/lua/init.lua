-- init.lua: create a pool hash from its settled state, unless it exists already.
--
-- KEYS[1]  pool hash
-- ARGV[1]  overdraft (fixed int)
-- ARGV[2]  the pool's limit override: "hard", "soft" or "" (the credit type's)
-- ARGV[3]  number of grants N, then N groups of 3 values: grant id, order key, remaining
--          (ended grants are sent with remaining "v"; scheduled grants already activated with
--          remaining "a<n>")
-- Reply: 1 if created, 0 if the pool already existed (nothing written).

local n = tonumber(ARGV[3])
assert(#ARGV == 3 + 3 * n, 'init.lua: expected ' .. (3 + 3 * n) .. ' arguments')
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'off', '-1', 'od', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'lim', ARGV[2]) end
for i = 0, n - 1 do
  local id, key, rem = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  redis.call('HSET', KEYS[1], 'o:' .. id, key)
  if rem == 'v' then
    redis.call('HSET', KEYS[1], 'r:' .. id, '0', 'x:' .. id, '1')
  elseif string.sub(rem, 1, 1) == 'a' then
    redis.call('HSET', KEYS[1], 'r:' .. id, string.sub(rem, 2), 'a:' .. id, '1')
  else
    redis.call('HSET', KEYS[1], 'r:' .. id, rem)
  end
end
return 1
