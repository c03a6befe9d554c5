"""Redis scripts of the analyzer; each runs atomically, which is what makes replicas safe.

COMMIT folds the points of one session into their series, all or per series:

* a series already folded for this session (a field of the session's ``done`` hash)
  is skipped (status 2): a redelivered session is never counted twice, even when
  the replica that first took it died half-way through its series;
* a series whose version moved since we read it is refused (status 0): another
  replica folded a newer session meanwhile, so the caller re-reads and re-folds;
* otherwise the state is replaced, the version bumped, the done marker set and the
  alert (if any) parked in the outbox, in one step (status 1).  The alert leaves
  the outbox only once JetStream has it; a replica dying in between leaves it for
  the outbox sweeper of any replica.

KEYS: done-hash, outbox-hash, stats-hash, series-hash... all of ONE shard (shared/keys.py: one hash
slot on a Redis Cluster); a session's series of several shards are committed by one call per shard.
ARGV: done-ttl-s, series-ttl-s, then per series: name, expected-version, state, alert-id, alert, late (0/1)
"""

COMMIT = """
local done, outbox, stats = KEYS[1], KEYS[2], KEYS[3]
local done_ttl, series_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for j = 0, #KEYS - 4 do
  local key = KEYS[4 + j]
  local b = 3 + 6 * j
  local name = ARGV[b]
  if redis.call('HEXISTS', done, name) == 1 then
    out[j + 1] = 2
  else
    local v = tonumber(redis.call('HGET', key, 'v') or '0')
    if v ~= tonumber(ARGV[b + 1]) then
      out[j + 1] = 0
    else
      redis.call('HSET', key, 'v', v + 1, 's', ARGV[b + 2])
      redis.call('EXPIRE', key, series_ttl)
      redis.call('HSET', done, name, 1)
      redis.call('HINCRBY', stats, 'points', 1)
      if ARGV[b + 5] == '1' then
        redis.call('HINCRBY', stats, 'late', 1)
      end
      if ARGV[b + 3] ~= '' then
        redis.call('HSET', outbox, ARGV[b + 3], ARGV[b + 4])
        redis.call('HINCRBY', stats, 'alerts', 1)
      end
      out[j + 1] = 1
    end
  end
end
redis.call('EXPIRE', done, done_ttl)
return out
"""

# A session counted once: a marker field in its done hash (the series names are the other fields).
# KEYS: done-hash, stats-hash; ARGV: done-ttl-s.  Returns 1 the first time.
SESSION_SEEN = """
if redis.call('HSETNX', KEYS[1], '#session', 1) == 0 then
  return 0
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('HINCRBY', KEYS[2], 'sessions', 1)
return 1
"""
