"""Redis Lua scripts of the collector: fold a batch atomically, claim and retire a session.

Redis runs a script atomically, so "was this (agent, seq) folded before?" and
"fold it" cannot be separated by a crash or by another collector: that is what
makes redelivery and several collectors safe.  One script call folds a whole
batch, so the cost is one round trip per batch (pipelined across batches), not
per event.
"""

from __future__ import annotations

# KEYS: meta, targets, running, seen(agent), active, finishing, done
# ARGV: now, agent, session_id, payload (packed records, see fold.ops_payload), finish_grace_s
# Returns {folded, finished_in_batch, late}
APPLY = r"""
if redis.call('EXISTS', KEYS[7]) == 1 then
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
local finished = 0
while pos <= n do
  local seq, kind, f1, f2, val, nextpos = struct.unpack('>I4c1Hc0Hc0I4c0', payload, pos)
  pos = nextpos
  if redis.call('SETBIT', KEYS[4], seq, 1) == 0 then
    new = new + 1
    if seq > high then high = seq end
    if kind == 'F' then
      redis.call('HSET', KEYS[2], f1, val)
      redis.call('HDEL', KEYS[3], f2)
    elseif kind == 'T' then
      redis.call('HSET', KEYS[3], f1, val)
    elseif kind == 'S' or kind == 'H' then
      local field = (kind == 'S') and 'started' or 'health'
      local cur = redis.call('HGET', KEYS[1], field .. '_ts')
      -- The earliest BuildStarted and the latest checkpoint win, whatever order they arrive in.
      local ts = tonumber(f1)
      if (not cur) or (kind == 'S' and ts < tonumber(cur)) or (kind == 'H' and ts >= tonumber(cur)) then
        redis.call('HSET', KEYS[1], field, val, field .. '_ts', f1)
      end
    elseif kind == 'E' then
      redis.call('HSET', KEYS[1], 'finished', val)
      redis.call('ZADD', KEYS[6], now + tonumber(ARGV[5]), sid)
      finished = 1
    end
  end
end
if new > 0 then
  redis.call('HINCRBY', KEYS[1], 'events', new)
  redis.call('HINCRBY', KEYS[1], 'n:' .. agent, new)
  local cur = tonumber(redis.call('HGET', KEYS[1], 'max:' .. agent) or '-1')
  if high > cur then redis.call('HSET', KEYS[1], 'max:' .. agent, high) end
  redis.call('HSET', KEYS[1], 'last', ARGV[1])
  redis.call('ZADD', KEYS[5], now, sid)
end
return {new, finished, 0}
"""

# KEYS: lock; ARGV: owner, lease_ms.  A lease, not a permanent lock: a collector killed
# while completing a session lets another one finish the job when the lease runs out.
CLAIM = r"""
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""

# KEYS: done, active, finishing, meta, targets, running, lock, seen keys...
# ARGV: session_id, done_ttl_s
RETIRE = r"""
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""
