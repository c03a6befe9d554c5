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
# Returns {folded, finished_in_batch, late}
APPLY = r"""
if redis.call('EXISTS', KEYS[6]) == 1 then
  return {0, 0, 1}
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
local parts = {}
while pos <= n do
  local seq, kind, ts, raw, nextpos = struct.unpack('>I4c1Hc0I4c0', payload, pos)
  pos = nextpos
  if redis.call('SETBIT', KEYS[3], seq, 1) == 0 then
    new = new + 1
    if seq > high then high = seq end
    if kind == 'T' then
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
if new > 0 then
  redis.call('HINCRBY', KEYS[1], 'events', new)
  redis.call('HINCRBY', KEYS[1], 'n:' .. agent, new)
  local cur = tonumber(redis.call('HGET', KEYS[1], 'max:' .. agent) or '-1')
  if high > cur then redis.call('HSET', KEYS[1], 'max:' .. agent, high) end
  redis.call('HSET', KEYS[1], 'last', ARGV[1])
  redis.call('ZADD', KEYS[4], now, sid)
end
return {new, finished, 0}
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
