"""Session totals and cache figures from a session's targets: one definition for every producer
(the collector folding live events, the importers folding tool output)."""

from __future__ import annotations

from collections.abc import Iterable

from buildtel.shared.protocol import CACHE_HITS, SessionTotals, TargetMetrics


def summarize_targets(targets: Iterable[TargetMetrics], *, events: int = 0) -> tuple[SessionTotals, int, int]:
    """(totals, cache hits, cache misses): hits are local + remote hits; uncacheable counts in neither."""
    totals = SessionTotals(events=events)
    hits = misses = 0
    for t in targets:
        totals.targets += 1
        totals.target_time_s += t.duration_s
        totals.cpu_s += t.cpu_s or 0.0
        if t.status == "success":
            totals.succeeded += 1
        elif t.status == "failed":
            totals.failed += 1
        elif t.status == "skipped":
            totals.skipped += 1
        else:
            totals.cancelled += 1
        if t.cache in CACHE_HITS:
            hits += 1
        elif t.cache == "miss":
            misses += 1
    return totals, hits, misses
