"""What an import does to retention, said before it happens: ``buildtel import`` (with or without
``--dry-run``) asks the storage service how many sessions it holds and keeps
(``BUILDER_TELEMETRY_MAX_SESSIONS``, ``BUILDER_TELEMETRY_RETENTION_DAYS``) and prints how many
sessions storing the import will evict, and which of the imported ones are evicted at once
(older than the store's oldest when it is full, or older than the retention window).

Storage drops sessions oldest first by their finish time (``services/storage/index.py``), so the
count is exact for the store as it is when asked: sessions arriving meanwhile from live builds
are not foreseen (the line says "now").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from buildtel.shared.protocol import BuildSession

ASK_TIMEOUT_S = 5.0


@dataclass
class Eviction:
    stored: int  # sessions stored now
    max_sessions: int
    new: int  # imported sessions not stored yet
    evicted: int  # sessions dropped by the count once the import is stored (imported ones included)
    own_evicted: int  # of those, imported ones (older than everything kept)
    expired: int  # imported sessions already past the retention window (dropped at once)
    retention_days: float

    def lines(self) -> list[str]:
        head = (f"retention: the store holds {self.stored} of at most {self.max_sessions} sessions "
                f"(BUILDER_TELEMETRY_MAX_SESSIONS); {self.new} of the imported session(s) are new")
        out = [head]
        if self.evicted:
            which = f"{self.evicted - self.own_evicted} of the stored sessions"
            if self.own_evicted:
                which += f" and {self.own_evicted} of the imported ones (older than every session kept)"
            out.append(f"retention: storing them will evict {self.evicted} session(s), oldest first: {which}")
        else:
            out.append("retention: storing them evicts no session")
        if self.expired:
            out.append(f"retention: {self.expired} imported session(s) finished more than {self.retention_days:g} "
                       "day(s) ago (BUILDER_TELEMETRY_RETENTION_DAYS) and are dropped as soon as they are stored")
        return out

    def as_json(self) -> dict[str, Any]:
        return {"stored": self.stored, "max_sessions": self.max_sessions, "new": self.new,
                "evicts": self.evicted, "evicts_imported": self.own_evicted, "expired_imported": self.expired,
                "retention_days": self.retention_days}


async def eviction(client: Any, sessions: list[BuildSession]) -> Eviction:
    """How storing ``sessions`` changes the store ``client`` (a StorageClient) asks; raises StorageError."""
    st = await client.stats()
    new = [s for s in {s.id: s for s in sessions}.values() if not await client.exists(s.id)]
    over = st.sessions + len(new) - st.max_sessions
    own = 0
    if over > 0:
        # Which go: the `over` oldest of the stored and the new ones by (finish, id), as storage orders them.
        oldest = await client.summaries(order="oldest", limit=over)
        keys = sorted([(s.finish or s.start, s.id, False) for s in oldest]
                      + [(s.finish or s.start, s.id, True) for s in new])
        own = sum(1 for _, _, imported in keys[:over] if imported)
    cutoff = time.time() - st.retention_s
    expired = sum(1 for s in new if s.finish < cutoff)
    return Eviction(stored=st.sessions, max_sessions=st.max_sessions, new=len(new), evicted=max(0, over),
                    own_evicted=own, expired=expired, retention_days=st.retention_s / 86400.0)
