"""Health across builds, for reports: what the final checkpoints of stored sessions say.

Each stored session keeps its last :class:`~buildtel.shared.protocol.HealthCheckpoint`
(``BuildSession.health``).  :func:`health_trends` summarises a chronological run
of sessions: how many ended healthy, degraded or critical, the rules that fired
most, utilisation, throughput and memory pressure, and least-squares slopes of
throughput and utilisation per build (so "builds are getting less parallel" shows
as a negative utilisation slope).  Sessions without a checkpoint (imported ones,
old agents) are counted but not summarised.  Meant for the analyzer's report
(``AnalyticsReport.health = health_trends(sessions)``); everything here is pure.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Protocol

import msgspec

from buildtel.shared.protocol import HealthCheckpoint

_NUMBERS = re.compile(r"\d+(?:\.\d+)?")


class HealthPoint(msgspec.Struct, kw_only=True, array_like=True):
    session_id: str
    start: float
    status: str
    utilisation: float
    throughput: float
    memory_percent: float


class HealthTrends(msgspec.Struct, kw_only=True):
    sessions: int = 0  # sessions considered
    with_health: int = 0  # of which have a checkpoint
    healthy: int = 0
    degraded: int = 0
    critical: int = 0
    unhealthy_rate: float = 0.0  # (degraded + critical) / with_health
    top_reasons: list[tuple[str, int]] = []  # rule texts with their numbers blanked, most frequent first
    mean_utilisation: float = 0.0
    mean_throughput: float = 0.0  # tasks/s
    max_memory_percent: float = 0.0
    throughput_slope: float = 0.0  # tasks/s per build (least squares over builds with health)
    utilisation_slope: float = 0.0  # per build
    recent_status: list[str] = []  # the last statuses, oldest first (at most 20)
    points: list[HealthPoint] = []


def _slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sxx


class WithHealth(Protocol):
    """What is read of a session: a ``BuildSession``, or a report row that carries these fields."""

    @property
    def id(self) -> str: ...
    @property
    def start(self) -> float: ...
    @property
    def health(self) -> HealthCheckpoint | None: ...


def health_trends(sessions: Iterable[WithHealth], *, top: int = 5, points: bool = False) -> HealthTrends:
    """Summary of the checkpoints of ``sessions`` (taken in start order)."""
    ordered = sorted(sessions, key=lambda s: s.start)
    out = HealthTrends(sessions=len(ordered))
    reasons: Counter[str] = Counter()
    pts: list[HealthPoint] = []
    for s in ordered:
        h = s.health
        if h is None:
            continue
        pts.append(HealthPoint(session_id=s.id, start=s.start, status=h.status, utilisation=h.utilisation,
                               throughput=h.throughput, memory_percent=h.memory_percent))
        for r in h.reasons:
            reasons[_NUMBERS.sub("N", r)] += 1
    out.with_health = len(pts)
    if not pts:
        return out
    by_status = Counter(p.status for p in pts)
    out.healthy, out.degraded, out.critical = by_status["healthy"], by_status["degraded"], by_status["critical"]
    out.unhealthy_rate = (out.degraded + out.critical) / len(pts)
    out.top_reasons = reasons.most_common(top)
    out.mean_utilisation = sum(p.utilisation for p in pts) / len(pts)
    out.mean_throughput = sum(p.throughput for p in pts) / len(pts)
    out.max_memory_percent = max(p.memory_percent for p in pts)
    out.throughput_slope = _slope([p.throughput for p in pts])
    out.utilisation_slope = _slope([p.utilisation for p in pts])
    out.recent_status = [p.status for p in pts[-20:]]
    if points:
        out.points = pts
    return out
