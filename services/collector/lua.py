"""Redis Lua scripts of the collector: fold a batch atomically, claim and retire a session.

Redis runs a script atomically, so "was this (agent, seq) folded before?" and
"fold it" cannot be separated by a crash or by another collector: that is what
makes redelivery and several collectors safe.  One script call folds a whole
batch, so the cost is one round trip per batch (pipelined across batches), not
per event.
"""

from __future__ import annotations

# KEYS: meta, fragments, seen(agent), active, finishing, done
# ARGV: now, agent, session_id, payload (records, see fold.ops_payload), finish_grace_s
# Record kinds: T target event, S started, H health, E finished, X refused (raw = code TAB reason).
# Returns {folded, finished_in_batch, late, announce}: announce = 1 when this call folded the
# session's first BuildStarted (meta field 'sa' = "agent:seq" claims it, once per session), or holds
# that same event again (a redelivery after a crash between fold and announcement: the collector
# announces again and JetStream's Nats-Msg-Id drops the duplicate).
APPLY = r"""
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {0, 0, 1, 0}
end
local now = tonumber(ARGV[1])
local agent = ARGV[2]
local sid = ARGV[3]
local payload = ARGV[4]
local pos = 1
local n = #payload
local new = 0
local high = -1
local first_new = -1
local finished = 0
local lost = 0
local announce = 0
local parts = {}
while pos <= n do
  local seq, kind, ts, raw, nextpos = struct.unpack('>I4c1Hc0I4c0', payload, pos)
  pos = nextpos
  if redis.call('SETBIT', KEYS[3], seq, 1) == 1 then
    if kind == 'S' and redis.call('HGET', KEYS[1], 'sa') == agent .. ':' .. seq then announce = 1 end
  else
    if seq > high then high = seq end
    if kind ~= 'X' then new = new + 1 end
    if kind == 'X' then
      -- A refused event (raw = "code<TAB>reason"): counted per agent and cause, never folded, so
      -- completion knows it is lost rather than waiting for it or calling the session whole.
      lost = lost + 1
      local tab = string.find(raw, '\t', 1, true) or (#raw + 1)
      local f = agent .. '|' .. string.sub(raw, 1, tab - 1)
      redis.call('HINCRBY', KEYS[1], 'x:' .. f, 1)
      redis.call('HSETNX', KEYS[1], 'xr:' .. f, string.sub(raw, tab + 1))
      local lo = tonumber(redis.call('HGET', KEYS[1], 'xf:' .. f) or '-1')
      if lo < 0 or seq < lo then redis.call('HSET', KEYS[1], 'xf:' .. f, seq) end
      local hi = tonumber(redis.call('HGET', KEYS[1], 'xl:' .. f) or '-1')
      if seq > hi then redis.call('HSET', KEYS[1], 'xl:' .. f, seq) end
    elseif kind == 'T' then
      if first_new < 0 then first_new = seq end
      parts[#parts + 1] = raw
    elseif kind == 'S' or kind == 'H' then
      local field = (kind == 'S') and 'started' or 'health'
      local cur = redis.call('HGET', KEYS[1], field .. '_ts')
      -- The earliest BuildStarted and the latest checkpoint win, whatever order they arrive in.
      local t = tonumber(ts)
      if (not cur) or (kind == 'S' and t < tonumber(cur)) or (kind == 'H' and t >= tonumber(cur)) then
        redis.call('HSET', KEYS[1], field, raw, field .. '_ts', ts)
      end
      if kind == 'S' and redis.call('HSETNX', KEYS[1], 'sa', agent .. ':' .. seq) == 1 then announce = 1 end
      if kind == 'H' then
        -- Health over time: one checkpoint per 5 s slot (the run's default interval), at most 2160 slots (3 hours); a
        -- checkpoint past the cap is counted, never silently gone (the latest is 'health' above).
        -- The earliest of a slot wins, whatever order batches arrive in (as for BuildStarted).
        local n = string.format('%d', math.floor(t / 5))
        local held = redis.call('HGET', KEYS[1], 'ht:' .. n)
        if held then
          if t < tonumber(held) then
            redis.call('HSET', KEYS[1], 'hh:' .. n, raw, 'ht:' .. n, ts)
          end
        elseif tonumber(redis.call('HGET', KEYS[1], 'hn') or '0') < 2160 then
          redis.call('HSET', KEYS[1], 'hh:' .. n, raw, 'ht:' .. n, ts)
          redis.call('HINCRBY', KEYS[1], 'hn', 1)
        else
          redis.call('HINCRBY', KEYS[1], 'hdrop', 1)
        end
      end
    elseif kind == 'E' then
      redis.call('HSET', KEYS[1], 'finished', raw)
      redis.call('ZADD', KEYS[5], now + tonumber(ARGV[5]), sid)
      finished = 1
    end
  end
end
if #parts > 0 then
  -- One fragment per call, framed as a msgpack array32; its field is the first seq that was new
  -- here, which no other call can also claim.
  redis.call('HSET', KEYS[2], agent .. ':' .. first_new, struct.pack('>BI4', 0xdd, #parts) .. table.concat(parts))
end
if lost > 0 then
  redis.call('HINCRBY', KEYS[1], 'lost:' .. agent, lost)
end
if new > 0 then
  redis.call('HINCRBY', KEYS[1], 'events', new)
  redis.call('HINCRBY', KEYS[1], 'n:' .. agent, new)
end
if new + lost > 0 then
  local cur = tonumber(redis.call('HGET', KEYS[1], 'max:' .. agent) or '-1')
  if high > cur then redis.call('HSET', KEYS[1], 'max:' .. agent, high) end
  redis.call('HSET', KEYS[1], 'last', ARGV[1])
  redis.call('ZADD', KEYS[4], now, sid)
end
return {new, finished, 0, announce}
"""

# KEYS: lock; ARGV: owner, lease_ms.  A lease, not a permanent lock: a collector killed
# while completing a session lets another one finish the job when the lease runs out.
CLAIM = r"""
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""

# KEYS: done, active, finishing, meta, fragments, lock, seen keys...
# ARGV: session_id, done_ttl_s
RETIRE = r"""
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

# A batch refused before its events could be read (undecodable): only its session is known (from
# the subject).  KEYS: meta, active, done; ARGV: now, session_id, reason.  Returns 1 if recorded,
# 0 if the session had already completed (the caller counts it as late).
LOST_BATCH = r"""
if redis.call('EXISTS', KEYS[3]) == 1 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'ub', 1)
redis.call('HSETNX', KEYS[1], 'ubr', ARGV[3])
redis.call('HSET', KEYS[1], 'last', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""
