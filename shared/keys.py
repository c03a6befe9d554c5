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

    def recorder_flag(self, sid: str) -> str:
        """String "1"/"0" with TTL: whether the session asked to be recorded (BuildStarted.record)."""
        return f"{self.ns}:recorder:flag:{sid}"

    def analyzer(self, suffix: str) -> str:
        return f"{self.ns}:analyzer:{suffix}"
