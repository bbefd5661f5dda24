-- apply.lua: apply one poll's operations for ONE credit pool, atomically.
--
-- KEYS[1]  pool hash    cr:{tenant:customer}:p:<credit_type>/<resource>
-- KEYS[2]  journal list cr:{tenant:customer}:p:<credit_type>/<resource>:j
-- KEYS[3]  the customer's dedupe set of the current period (cr:{tenant:customer}:d:<start s>):
--          a usage event's mark goes there, and the set expires one dedupe window after
--          the last mark added
-- KEYS[4..] the customer's other dedupe sets a mark made within the window may be in
--          (shared::keys::dedupe_sets): a repeat is found whatever timestamp it carries
-- then, last, one key per reverse operation, in the operations' order: its reverse mark
--          (shared::keys::Keys::reverse_mark, cr:{tenant:customer}:d:rv:<event uid>), so every
--          key the script touches is in KEYS (Redis Cluster); the dedupe sets are the KEYS
--          between the journal and these
-- ARGV[1]  the customer's key prefix for reverse marks (cr:{tenant:customer}:d:): each reverse
--          mark key must be this prefix, "rv:" and the operation's event uid
-- ARGV[2]  dedupe window, seconds
-- ARGV[3]  the partition's committed input offset: journal entries wholly below it are dropped
-- ARGV[4]  limit kind: "hard" or "soft"
-- ARGV[5]  number of operations N, then N groups of 7 values:
--          offset, kind, a, b, c, ts_ms, id
--          id: the identity of the message (the event uid an ingest assigned, the grant id...):
--          a journal entry answers an operation only if both its offset and its id match, so a
--          new topic (offsets from 0 again) never gets an old topic's decisions (guarantee 8)
--          kind "u" usage:   a = dedupe member (12 bytes of SHA-256 of the idempotency key),
--                            b = cost (fixed int), c = ""
--          kind "g" grant:   a = grant id, b = amount (fixed int), c = order key
--          kind "v" void:    a = grant id, b = "", c = ""
--          kind "e" expire:  a = grant id, b = "", c = ""  (applies once ts >= its expiry)
--          kind "a" activate: a = grant id, b = "", c = "" (a scheduled grant, once ts >= effective)
--          kind "r" reverse: a = event uid, b = "gid:amt,gid:amt" (gid "-" = overdraft),
--                            c = "" or the dedupe member of a dead-lettered event (its mark is
--                            removed too, from every set of KEYS[3..])
--          kind "l" limit:   a = "hard", "soft" or "" (back to ARGV[4]), b = "", c = ""
--
-- Pool hash fields: off (the highest input offset in the journal's newest entry),
-- od (overdraft, fixed int >= 0),
-- lim (the pool's limit override, "hard" or "soft"; absent = ARGV[4]),
-- o:<grant id> (order key), r:<grant id> (remaining, fixed int), x:<grant id> (ended: "1" voided,
-- "e" expired), a:<grant id> (a scheduled grant was activated).
-- Order key: PPPP.EEEEEEEEEEEEE.C.FFFFFFFFFFFFF.RRRRRRRRRRRRR.<id>
--   priority, expires_at ms (9999999999999 = never), category (0 promo, 1 paid),
--   effective_at ms, created_at ms, id: sorting the keys as strings is the consumption order.
--
-- Reply: {"MISSING"} if the pool hash does not exist (the caller rebuilds it and retries), else
-- one string per operation, "<offset>|<result>":
--   usage   S|<end balance>|<gid>:<delta>:<end>;...   (gid "-" = overdraft)  charged
--           a part "+<gid>:<amount>:<end>:<repaid>:<effective ms>" is a scheduled grant that the
--           event drew on before the sweeper activated it: it is activated here, and its part
--           comes before the parts that draw on it (its ledger entry precedes theirs)
--           D|<end balance>|insufficient_balance                           denied (hard limit)
--           P                                                              duplicate key
--   grant   G|<end balance>|<remaining>|<repaid overdraft>     X (id already known)
--   void    V|<end balance>|<removed>                          N (unknown or already ended)
--   expire  V|<end balance>|<removed>                          N (unknown, ended, or not yet due)
--   activate A|<end balance>|<remaining>|<repaid overdraft>    N (unknown, ended, done, not
--                                                              scheduled, or not due)
--   reverse R|<end balance>|<gid>:<amount>:<end>;...          N (already applied)
--           (what went back, gid "-" = overdraft; written to the ledger as adjust entries)
--   limit   L
--   any     E|<reason>                                         refused, nothing changed
-- An operation at or below `off` may have been applied before (a redelivery after a crash): if
-- the journal holds its offset and id, its recorded result is replayed and nothing changes.
-- Journal: a list of entries, one per call that changed something: "<highest offset of the
-- entry>\n<offset>#<id>|<result>\n...". Within one topic the entries' offsets only grow; an
-- entry followed by a lower one belongs to an earlier topic (or a group reset) and is dropped,
-- as are entries below the committed offset.
-- Every value stays below 2^53 (Lua numbers are doubles); what would not fit is refused.
--
-- End balances are the pool's LEDGER balance: the remaining of every grant that has entered
-- the ledger (granted active, or a scheduled one once activated; not ended) minus overdraft,
-- so each entry's end balance is the running sum of the pool's entries in ledger order. What
-- an event may spend is decided by its timestamp (spendable: effective <= ts < expiry); a
-- scheduled grant enters the ledger when it is activated (by the sweeper, or by the first
-- event that draws on it), and voiding or expiring one that never entered removes nothing
-- from the ledger.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'MISSING'}
end
local n = tonumber(ARGV[5])
assert(#ARGV == 5 + 7 * n, 'apply.lua: expected ' .. (5 + 7 * n) .. ' arguments')
-- The reverse marks are the last KEYS, one per reverse operation: find each one's.
local marks = {}
local nmarks = 0
for i = 0, n - 1 do
  if ARGV[7 + 7 * i] == 'r' then nmarks = nmarks + 1; marks[i] = nmarks end
end
local sets_end = #KEYS - nmarks
assert(sets_end >= 3, 'apply.lua: expected a dedupe set and ' .. nmarks .. ' reverse mark keys')
for i, k in pairs(marks) do
  assert(KEYS[sets_end + k] == ARGV[1] .. 'rv:' .. ARGV[8 + 7 * i], 'apply.lua: reverse mark key out of order')
end
local MAX = 9007199254740992
-- A per-pool override (field lim) takes precedence over the credit type's limit.
local lim = redis.call('HGET', KEYS[1], 'lim')
local hard = (lim or ARGV[4]) == 'hard'
local window = tonumber(ARGV[2])
local dated = false
-- Was this mark made before, in an earlier (or, by a faster clock, the next) period?
local function marked_before(member)
  for i = 4, sets_end do
    if redis.call('SISMEMBER', KEYS[i], member) == 1 then return true end
  end
  return false
end
local off = tonumber(redis.call('HGET', KEYS[1], 'off') or '-1')
local od = tonumber(redis.call('HGET', KEYS[1], 'od') or '0')

-- Load the grants once, sorted into consumption order.
local grants = {}
local byid = {}
local total = 0
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local f = flat[i]
  if string.sub(f, 1, 2) == 'o:' then
    local id = string.sub(f, 3)
    local ok = flat[i + 1]
    local g = { id = id, key = ok, exp = tonumber(string.sub(ok, 6, 18)),
                eff = tonumber(string.sub(ok, 22, 34)), rem = 0, dirty = false,
                sched = tonumber(string.sub(ok, 22, 34)) > tonumber(string.sub(ok, 36, 48)) }
    grants[#grants + 1] = g
    byid[id] = g
  end
end
for i = 1, #flat, 2 do
  local f = flat[i]
  local p = string.sub(f, 1, 2)
  local g = byid[string.sub(f, 3)]
  if g then
    if p == 'r:' then g.rem = tonumber(flat[i + 1]); total = total + g.rem
    elseif p == 'x:' then g.voided = true
    elseif p == 'a:' then g.activated = true end
  end
end
table.sort(grants, function(x, y) return x.key < y.key end)

local function spendable(g, ts) return g.eff <= ts and ts < g.exp end
local function balance(ts)
  local b = 0
  for _, g in ipairs(grants) do
    if spendable(g, ts) then b = b + g.rem end
  end
  return b - od
end
-- In the ledger: granted active, or a scheduled grant that was activated; and not ended.
local function entered(g) return not g.voided and (not g.sched or g.activated) end
local function ledger_balance()
  local b = 0
  for _, g in ipairs(grants) do
    if entered(g) then b = b + g.rem end
  end
  return b - od
end
local function fmt(x) return string.format('%d', x) end

-- Results recorded before, for redelivered operations, keyed by "<offset>#<id>" (entries
-- written before ids were journaled are keyed by the offset alone).
local journal = nil
local function replayed(o, id)
  if journal == nil then
    journal = {}
    for _, entry in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
      for line in string.gmatch(entry, '[^\n]+') do
        local p = string.find(line, '|', 1, true)
        if p then
          local k = string.sub(line, 1, p - 1)
          local h = string.find(k, '#', 1, true)
          local reply = (h and string.sub(k, 1, h - 1) or k) .. string.sub(line, p)
          journal[k] = reply
        end
      end
    end
  end
  return journal[o .. '#' .. id] or journal[o]
end

local out = {}
local fresh = {}
local maxoff = -1
local pool_dirty = false
-- Nothing to replay from an empty journal, whatever `off` says.
if off >= 0 and redis.call('LLEN', KEYS[2]) == 0 then off = -1 end
for i = 0, n - 1 do
  local base = 6 + 7 * i
  local o, kind, a, b, c = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local ts = tonumber(ARGV[base + 5])
  local id = ARGV[base + 6]
  local oi = tonumber(o)
  local res
  if oi <= off then
    res = replayed(o, id)
  end
  if res then
    out[#out + 1] = res
  else
    local r
    if kind == 'u' then
      local cost = tonumber(b)
      local added = redis.call('SADD', KEYS[3], a) == 1
      if added and not dated then
        -- The set goes one dedupe window after the last mark added to it (whether or not the
        -- mark turns out to repeat one in an earlier set: the set may have just been created).
        redis.call('EXPIRE', KEYS[3], window)
        dated = true
      end
      if not added or marked_before(a) then
        r = 'P'
      else
        local avail = balance(ts)
        if hard and cost > avail then
          r = 'D|' .. fmt(ledger_balance()) .. '|insufficient_balance'
        else
          local parts = {}
          local left = cost
          local bal = ledger_balance()
          -- Scheduled grants not yet activated that this event draws on enter the ledger first,
          -- whole, repaying overdraft as the sweeper's activation would: find them with a dry
          -- run of the loop below, activate them, then consume.
          local l, o = cost, od
          for _, g in ipairs(grants) do
            if l <= 0 then break end
            if g.rem > 0 and spendable(g, ts) then
              local r = g.rem
              if not entered(g) then
                local rp = math.min(o, r)
                r = r - rp; o = o - rp
                local whole = g.rem
                g.rem = r; total = total - rp
                od = o
                if rp > 0 then pool_dirty = true end
                g.dirty = true; g.activated = true; g.newly_activated = true
                bal = bal + whole
                parts[#parts + 1] = '+' .. g.id .. ':' .. fmt(whole) .. ':' .. fmt(bal) .. ':' .. fmt(rp) .. ':' .. fmt(g.eff)
              end
              l = l - math.min(r, l)
            end
          end
          for _, g in ipairs(grants) do
            if left <= 0 then break end
            if g.rem > 0 and spendable(g, ts) then
              local take = math.min(g.rem, left)
              g.rem = g.rem - take; g.dirty = true
              total = total - take
              left = left - take
              bal = bal - take
              parts[#parts + 1] = g.id .. ':' .. fmt(-take) .. ':' .. fmt(bal)
            end
          end
          if left > 0 then
            od = od + left; pool_dirty = true
            bal = bal - left
            parts[#parts + 1] = '-:' .. fmt(-left) .. ':' .. fmt(bal)
          end
          r = 'S|' .. fmt(bal) .. '|' .. table.concat(parts, ';')
        end
      end
    elseif kind == 'g' then
      local amt = tonumber(b)
      if byid[a] then
        r = 'X'
      elseif total + amt >= MAX then
        r = 'E|pool_total_too_large'
      else
        local g = { id = a, key = c, exp = tonumber(string.sub(c, 6, 18)),
                    eff = tonumber(string.sub(c, 22, 34)), rem = amt, dirty = true, new = true,
                    sched = tonumber(string.sub(c, 22, 34)) > tonumber(string.sub(c, 36, 48)) }
        -- Overdraft (soft limit) is repaid first by the next grant that is spendable.
        local repaid = 0
        if spendable(g, ts) then repaid = math.min(od, amt) end
        g.rem = amt - repaid
        od = od - repaid
        if repaid > 0 then pool_dirty = true end
        total = total + g.rem
        grants[#grants + 1] = g
        byid[a] = g
        table.sort(grants, function(x, y) return x.key < y.key end)
        r = 'G|' .. fmt(ledger_balance()) .. '|' .. fmt(g.rem) .. '|' .. fmt(repaid)
      end
    elseif kind == 'v' or kind == 'e' then
      local g = byid[a]
      if g == nil or g.voided or (kind == 'e' and ts < g.exp) then
        r = 'N'
      else
        -- What leaves the ledger: nothing for a scheduled grant that never entered it.
        local removed = entered(g) and g.rem or 0
        total = total - g.rem
        g.rem = 0; g.dirty = true; g.voided = true
        g.ended = (kind == 'v') and '1' or 'e'
        r = 'V|' .. fmt(ledger_balance()) .. '|' .. fmt(removed)
      end
    elseif kind == 'a' then
      local g = byid[a]
      if g == nil or g.voided or g.activated or not g.sched or ts < g.eff then
        r = 'N'
      else
        local repaid = math.min(od, g.rem)
        g.rem = g.rem - repaid; total = total - repaid
        od = od - repaid
        if repaid > 0 then pool_dirty = true end
        g.dirty = true; g.activated = true; g.newly_activated = true
        r = 'A|' .. fmt(ledger_balance()) .. '|' .. fmt(g.rem) .. '|' .. fmt(repaid)
      end
    elseif kind == 'r' then
      if redis.call('SET', KEYS[sets_end + marks[i]], '1', 'NX', 'EX', ARGV[2]) == false then
        r = 'N'
      else
        -- What actually went back, per grant, with the ledger balance after each (a grant that
        -- ended since takes nothing back; overdraft is repaid at most to zero).
        local bal = ledger_balance()
        local parts = {}
        for gid, amt in string.gmatch(b, '([^:,]+):(%-?%d+)') do
          local back = -tonumber(amt)
          if gid == '-' then
            local d = math.min(od, back)
            if d > 0 then
              od = od - d; pool_dirty = true
              bal = bal + d
              parts[#parts + 1] = '-:' .. fmt(d) .. ':' .. fmt(bal)
            end
          elseif byid[gid] and not byid[gid].voided then
            local g = byid[gid]
            g.rem = g.rem + back; g.dirty = true
            total = total + back
            if entered(g) then
              bal = bal + back
              parts[#parts + 1] = gid .. ':' .. fmt(back) .. ':' .. fmt(bal)
            end
          end
        end
        r = 'R|' .. fmt(bal) .. '|' .. table.concat(parts, ';')
        if c ~= '' then
          for k = 3, sets_end do redis.call('SREM', KEYS[k], c) end
        end
      end
    elseif kind == 'l' then
      if a == '' then
        redis.call('HDEL', KEYS[1], 'lim')
        hard = ARGV[4] == 'hard'
      else
        redis.call('HSET', KEYS[1], 'lim', a)
        hard = a == 'hard'
      end
      r = 'L'
    else
      r = 'E|unknown_operation'
    end
    res = o .. '|' .. r
    out[#out + 1] = res
    fresh[#fresh + 1] = o .. '#' .. id .. '|' .. r
    if oi > maxoff then maxoff = oi end
  end
end

-- Write back only what changed.
for _, g in ipairs(grants) do
  if g.dirty then
    if g.new then redis.call('HSET', KEYS[1], 'o:' .. g.id, g.key) end
    redis.call('HSET', KEYS[1], 'r:' .. g.id, fmt(g.rem))
    if g.ended then redis.call('HSET', KEYS[1], 'x:' .. g.id, g.ended) end
    if g.newly_activated then redis.call('HSET', KEYS[1], 'a:' .. g.id, '1') end
  end
end
if pool_dirty then redis.call('HSET', KEYS[1], 'od', fmt(od)) end
if #fresh > 0 then
  redis.call('HSET', KEYS[1], 'off', fmt(maxoff))
  redis.call('RPUSH', KEYS[2], fmt(maxoff) .. '\n' .. table.concat(fresh, '\n'))
  -- An idle pool's last entries go with the dedupe window (redeliveries are seconds old).
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
-- Drop journal entries that were committed (their offsets are never delivered again) and
-- entries followed by a lower offset (an earlier topic's, or from before a group reset).
local committed = tonumber(ARGV[3])
local function top(entry) return tonumber(string.match(entry, '^(%-?%d+)')) end
while true do
  local head = redis.call('LINDEX', KEYS[2], 0)
  if not head then break end
  local m = top(head)
  local drop = m < committed
  if not drop then
    local second = redis.call('LINDEX', KEYS[2], 1)
    drop = second ~= false and top(second) < m
  end
  if drop then redis.call('LPOP', KEYS[2]) else break end
end
return out
