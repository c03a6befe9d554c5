"""Every Redis key the project writes, in one module (as arq keeps its prefixes).

Hot state of in-flight sessions lives here; nothing in Redis is the only copy of
completed history (that is the file store), so every key has a TTL or is removed
when its session completes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    ns: str = "buildtel"

    def session_meta(self, sid: str) -> str:
        """Hash: started/finished/health records, per-agent seen and max-seq counters."""
        return f"{self.ns}:sess:{sid}:meta"

    def session_fragments(self, sid: str) -> str:
        """Hash: ``agent:first_seq`` -> msgpack array of the target events one fold added."""
        return f"{self.ns}:sess:{sid}:frags"

    def session_seen(self, sid: str, agent: str) -> str:
        """Bitmap: bit ``seq`` set once that event is folded (idempotency by agent + seq)."""
        return f"{self.ns}:sess:{sid}:seen:{agent}"

    def session_prefix(self, sid: str) -> str:
        return f"{self.ns}:sess:{sid}:"

    def session_lock(self, sid: str) -> str:
        """String with TTL: the completion lease one collector holds on a session."""
        return f"{self.ns}:sess:{sid}:lock"

    @property
    def active(self) -> str:
        """Sorted set: in-flight session -> last activity (Unix s), for the inactivity timeout."""
        return f"{self.ns}:active"

    @property
    def finishing(self) -> str:
        """Sorted set: finished session -> when it must be completed at the latest."""
        return f"{self.ns}:finishing"

    def completed(self, sid: str) -> str:
        """String with TTL: marks a completed session so late events are recognised."""
        return f"{self.ns}:done:{sid}"

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

    def analyzer_series(self, series: str) -> str:
        """Hash: one detector series' state ``s`` and its compare-and-set version ``v``."""
        return self.analyzer(f"series:{series}")

    def analyzer_done(self, sid: str) -> str:
        """Hash with TTL: series -> 1 once this session was folded into it."""
        return self.analyzer(f"done:{sid}")

    @property
    def analyzer_outbox(self) -> str:
        """Hash: alert id -> encoded alert committed but not yet published."""
        return self.analyzer("outbox")

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

    @property
    def notifier_due(self) -> str:
        """Sorted set: delivery ``<subscription>|<item>`` -> when it is next due (Unix s)."""
        return self.notifier("due")

    @property
    def notifier_jobs(self) -> str:
        """Hash: delivery ``<subscription>|<item>`` -> msgpack job (alerts, attempts, last error)."""
        return self.notifier("jobs")

    def notifier_claim(self, delivery: str) -> str:
        """String: the lease one replica holds on a delivery (its owner, with a TTL), then its end
        (``done``/``dead``/``suppressed``, kept for days): the exactly-once marker."""
        return self.notifier(f"claim:{delivery}")

    @property
    def notifier_digests(self) -> str:
        """Sorted set: digest ``<subscription>|<period>`` -> when it is to be sent (Unix s)."""
        return self.notifier("digests")

    def notifier_digest(self, subscription: str, period: str) -> str:
        """Hash with TTL: alert id -> msgpack alert, the alerts waiting for one daily digest."""
        return self.notifier(f"digest:{subscription}:{period}")

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

    @property
    def analyzer_stats(self) -> str:
        """Hash: the analyzer's shared counters (sessions, points, alerts, late, redelivered)."""
        return self.analyzer("stats")
