"""Every Redis key the project writes, in one module (as arq keeps its prefixes).

Hot state of in-flight sessions lives here; nothing in Redis is the only copy of
completed history (that is the file store), so every key has a TTL or is removed
when its session completes.

Redis Cluster (docs/scaling.md "Redis Cluster"): a Lua script or MULTI may only touch keys of one
hash slot.  So every key a script or transaction touches together carries the same hash tag
(``{…}``): a session's keys and its shard's ``active``/``finishing`` sets share ``{sNN}``, where
NN = :func:`shard` of the session id (one of :data:`SHARDS`); a detector series' keys and its
shard's done markers, outbox and counters share ``{aNN}`` (the shard of the series name).  Keys
only ever read or written alone (counters, API keys, alert acknowledgements) carry no tag.  On a
single Redis the tags are just characters of the name.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# Hot-state shards.  Fixed: a session's (or series') keys are found through its shard, so changing
# this strands the in-flight state written before (docs/scaling.md).  32 spreads the load over up to
# ~10 cluster masters; the collector's sweeper and the analyzer's outbox sweeper visit each shard.
SHARDS = 32


def shard(ident: str) -> int:
    """The hot-state shard of a session id or series name (CRC-32, stable across processes)."""
    return zlib.crc32(ident.encode()) % SHARDS


@dataclass(frozen=True, slots=True)
class Keys:
    ns: str = "buildtel"

    def _s(self, n: int) -> str:
        """The prefix of hot-state shard ``n`` of the collector: its hash tag is the shard's slot."""
        return f"{self.ns}:{{s{n:02d}}}"

    def session_meta(self, sid: str) -> str:
        """Hash: started/finished/health records, per-agent seen and max-seq counters."""
        return f"{self.session_prefix(sid)}meta"

    def session_fragments(self, sid: str) -> str:
        """Hash: ``agent:first_seq`` -> msgpack array of the target events one fold added."""
        return f"{self.session_prefix(sid)}frags"

    def session_seen(self, sid: str, agent: str) -> str:
        """Bitmap: bit ``seq`` set once that event is folded (idempotency by agent + seq)."""
        return f"{self.session_prefix(sid)}seen:{agent}"

    def session_prefix(self, sid: str) -> str:
        """What every key of one session starts with (its shard's hash tag included)."""
        return f"{self._s(shard(sid))}:sess:{sid}:"

    def session_lock(self, sid: str) -> str:
        """String with TTL: the completion lease one collector holds on a session."""
        return f"{self.session_prefix(sid)}lock"

    def active(self, n: int) -> str:
        """Sorted set of shard ``n``: in-flight session -> last activity (Unix s), for the
        inactivity timeout.  A session is in the set of its own shard (``active_of``)."""
        return f"{self._s(n)}:active"

    def active_of(self, sid: str) -> str:
        return self.active(shard(sid))

    def finishing(self, n: int) -> str:
        """Sorted set of shard ``n``: finished session -> when it must be completed at the latest."""
        return f"{self._s(n)}:finishing"

    def finishing_of(self, sid: str) -> str:
        return self.finishing(shard(sid))

    def completed(self, sid: str) -> str:
        """String with TTL: marks a completed session so late events are recognised."""
        return f"{self._s(shard(sid))}:done:{sid}"

    def counter(self, name: str) -> str:
        """Integer counters shared by all replicas (dead letters, late events…)."""
        return f"{self.ns}:count:{name}"

    def dead_letters(self, service: str, code: str | None = None) -> str:
        """Counter: dead letters a service published (per cause when ``code`` is given)."""
        return self.counter(f"deadletter:{service}" + (f":{code}" if code else ""))

    def poison(self, stream: str, consumer: str) -> str:
        """Hash: stream seq -> why its last delivery failed; read by whichever replica gets the
        max-deliveries advisory (shared/bus.py)."""
        return f"{self.ns}:poison:{stream}:{consumer}"

    def recorder_flag(self, sid: str) -> str:
        """String "1"/"0" with TTL: whether the session asked to be recorded (BuildStarted.record)."""
        return f"{self.ns}:recorder:flag:{sid}"

    def analyzer(self, suffix: str) -> str:
        return f"{self.ns}:analyzer:{suffix}"

    def _a(self, n: int) -> str:
        """The prefix of analyzer shard ``n``: its hash tag is the shard's slot."""
        return self.analyzer(f"{{a{n:02d}}}")

    def analyzer_series(self, series: str) -> str:
        """Hash: one detector series' state ``s`` and its compare-and-set version ``v``."""
        return f"{self._a(shard(series))}:series:{series}"

    def analyzer_done(self, sid: str, n: int) -> str:
        """Hash with TTL: series of shard ``n`` -> 1 once this session was folded into it (and, in
        the session's own shard, ``#session`` once the session is counted)."""
        return f"{self._a(n)}:done:{sid}"

    def analyzer_outbox(self, n: int) -> str:
        """Hash of shard ``n``: alert id -> encoded alert committed but not yet published (the
        alert of a series is parked in that series' shard)."""
        return f"{self._a(n)}:outbox"

    @property
    def api_key_ids(self) -> str:
        """Set: ids of the web API's keys (shared/apikeys.py); none means the API may be open."""
        return f"{self.ns}:apikeys"

    def api_key(self, key_id: str) -> str:
        """Hash: one API key's SHA-256 digest (never the key), tenant, scope, name, created."""
        return f"{self.ns}:apikey:{key_id}"

    def api_key_rate(self, key_id: str, window: int) -> str:
        """Counter with TTL: an API key's requests in one rate-limit window."""
        return f"{self.ns}:apikey:{key_id}:rate:{window}"

    def alert_state(self, alert_id: str) -> str:
        """Hash: an alert's acknowledgement (by, at, note), set through the web API (shared/alertstate.py)."""
        return f"{self.ns}:alert:{alert_id}:state"

    @property
    def alert_mutes(self) -> str:
        """Hash: muted alert series (``kind|branch|target``) -> msgpack (until, by, note)."""
        return f"{self.ns}:alerts:mutes"

    # -- the notifier (services/notifier/) ------------------------------------------------------
    def notifier(self, suffix: str) -> str:
        return f"{self.ns}:notifier:{suffix}"

    def _queue(self, suffix: str) -> str:
        """The delivery queue's keys (due, jobs, digests), written together in MULTI and scripts:
        one hash tag per namespace.  A queue of alerts, not of events: one slot carries it."""
        return self.notifier(f"{{{self.ns}:q}}:{suffix}")

    @property
    def notifier_due(self) -> str:
        """Sorted set: delivery ``<subscription>|<item>`` -> when it is next due (Unix s)."""
        return self._queue("due")

    @property
    def notifier_jobs(self) -> str:
        """Hash: delivery ``<subscription>|<item>`` -> msgpack job (alerts, attempts, last error)."""
        return self._queue("jobs")

    def notifier_claim(self, delivery: str) -> str:
        """String: the lease one replica holds on a delivery (its owner, with a TTL), then its end
        (``done``/``dead``/``suppressed``, kept for days): the exactly-once marker."""
        return self.notifier(f"claim:{delivery}")

    @property
    def notifier_digests(self) -> str:
        """Sorted set: digest ``<subscription>|<period>`` -> when it is to be sent (Unix s)."""
        return self._queue("digests")

    def notifier_digest(self, subscription: str, period: str) -> str:
        """Hash with TTL: alert id -> msgpack alert, the alerts waiting for one daily digest."""
        return self._queue(f"digest:{subscription}:{period}")

    @property
    def notifier_subscriptions(self) -> str:
        """Hash: subscription id -> JSON of a subscription made over the web API (with its webhook
        secret, which the notifier signs with): configuration, kept until it is deleted."""
        return self.notifier("subscriptions")

    @property
    def notifier_subscriptions_version(self) -> str:
        """Integer: bumped on every change of :attr:`notifier_subscriptions`; notifiers reload on a new value."""
        return self.notifier("subscriptions:version")

    @property
    def notifier_counts(self) -> str:
        """Hash: ``<subscription>|<result>`` -> deliveries with that result, shared by every replica."""
        return self.notifier("counts")

    def analyzer_stats(self, n: int) -> str:
        """Hash of shard ``n``: the analyzer's shared counters (sessions, points, alerts, late,
        redelivered); the figures are the sums over every shard."""
        return f"{self._a(n)}:stats"
