"""What the dashboard's pages show, computed from the API's data: pure functions, no I/O.

The page handlers (``pages.py``) ask the backend and hand the results here; the templates only
lay out what these return.  Numbers are formatted once here, so every page says "1 m 23 s" and
"1.2 GiB" the same way, and a missing value reads "—" (never 0: *not known* is not *zero*).

The timeline of a session is laid out on the server as SVG (one lane per worker, a bar per
target), so the page shows it without JavaScript and before any chart library has loaded.
Colours come from a palette that stays distinct for the common colour-vision deficiencies
(Okabe–Ito), and no state is told by colour alone: failed bars are hatched, the critical path is
outlined, and every bar has a text title.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from buildtel.shared.protocol import BuildSession, TargetMetrics

DASH = "—"
LANE_H = 18
LANE_GAP = 4
TIMELINE_W = 1000  # viewBox units; the SVG scales to the page width
LABEL_W = 140
MAX_LANES = 64  # more workers than this are folded into the last lane (said in its label)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return DASH
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} m {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} m"


def size(n: int | None) -> str:
    if n is None or n <= 0:
        return DASH
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return DASH  # pragma: no cover - the loop always returns


def percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{fraction * 100:.0f} %"


def when(ts: float | None) -> str:
    """UTC, to the second: what a teammate in another zone reads the same way."""
    if not ts:
        return DASH
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return DASH
    d = (time.time() if now is None else now) - ts
    if d < 90:
        return f"{max(0, int(d))} s ago"
    if d < 5400:
        return f"{int(d // 60)} min ago"
    if d < 2 * 86_400:
        return f"{int(d // 3600)} h ago"
    return f"{int(d // 86_400)} days ago"


def short(sid: str) -> str:
    return sid[:12]


_PARTITION = re.compile(r"partition (\d+) did not answer")


def partial_notice(notes: Iterable[str]) -> str | None:
    """What a page says when storage answered only in part (partitioned storage, a partition away:
    ``partial: partition k did not answer`` in the reply), naming the partitions; None when whole.
    A note of another form is said as it came: better its words than a silent gap."""
    notes = sorted(set(notes))
    if not notes:
        return None
    ks = sorted({int(m.group(1)) for n in notes if (m := _PARTITION.search(n))})
    others = [n.removeprefix("partial: ") for n in notes if not _PARTITION.search(n)]
    parts = []
    if ks:
        names = [str(k) for k in ks]
        said = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        parts.append(f"partition{'s' if len(ks) > 1 else ''} {said} did not answer")
    parts += others
    return f"Partial answer: {'; '.join(parts)} — builds stored there are missing from this page."


# -- one session ---------------------------------------------------------------------------------

@dataclass
class Bar:
    x: float
    y: float
    w: float
    css: str  # hit, miss, failed, other (+ " crit" on the critical path)
    title: str
    name: str


@dataclass
class Timeline:
    width: float
    height: float
    lanes: list[tuple[str, float]]  # label, y
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # x, label
    critical: int  # bars on the critical path
    folded: int = 0  # workers beyond MAX_LANES, drawn in the last lane


def target_class(t: TargetMetrics) -> str:
    if t.status == "failed":
        return "failed"
    if t.cache in ("local_hit", "remote_hit"):
        return "hit"
    if t.cache == "miss":
        return "miss"
    return "other"


def timeline(session: BuildSession, critical: Iterable[str] = ()) -> Timeline:
    """Lanes by (agent, worker) in order of first use; x from the build's start to its end."""
    crit = set(critical)
    targets = session.targets
    t0 = min([session.start, *(t.start for t in targets)]) if targets else session.start
    t1 = max([session.finish, *(t.end for t in targets)]) if targets else session.finish
    span = max(t1 - t0, 1e-6)
    lanes: dict[str, int] = {}
    for t in sorted(targets, key=lambda t: t.start):
        key = f"{t.agent_id}/{t.worker}" if len(session.agents) > 1 else (t.worker or t.agent_id or "?")
        if key not in lanes:
            lanes[key] = len(lanes)
    folded = max(0, len(lanes) - MAX_LANES)
    scale = (TIMELINE_W - LABEL_W) / span
    bars = []
    for t in targets:
        key = f"{t.agent_id}/{t.worker}" if len(session.agents) > 1 else (t.worker or t.agent_id or "?")
        lane = min(lanes[key], MAX_LANES - 1)
        css = target_class(t) + (" crit" if t.name in crit else "")
        title = (f"{t.name}: {duration(t.duration_s)}, {t.status}, cache {t.cache}"
                 + (", on the critical path" if t.name in crit else ""))
        bars.append(Bar(x=LABEL_W + (t.start - t0) * scale, y=lane * (LANE_H + LANE_GAP),
                        w=max(t.duration_s * scale, 0.8), css=css, title=title, name=t.name))
    names = list(lanes)[:MAX_LANES]
    if folded:
        names[-1] = f"{names[-1]} +{folded} more"
    height = max(1, len(names)) * (LANE_H + LANE_GAP) + 20
    return Timeline(width=TIMELINE_W, height=height,
                    lanes=[(n[-22:], i * (LANE_H + LANE_GAP)) for i, n in enumerate(names)],
                    bars=bars, ticks=_ticks(span, scale, height - 6),
                    critical=sum(1 for b in bars if b.css.endswith("crit")), folded=folded)


def _ticks(span: float, scale: float, _y: float) -> list[tuple[float, str]]:
    step = next((s for s in (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
                 if span / s <= 10), 3600 * math.ceil(span / 36_000))
    return [(LABEL_W + k * step * scale, duration(k * step)) for k in range(int(span / step) + 1)]


@dataclass
class TargetRow:
    name: str
    status: str
    cache: str
    css: str
    duration_s: float
    start_offset_s: float
    worker: str
    cpu_s: float | None
    peak_rss: int | None
    attempts: int
    critical: bool


def target_rows(session: BuildSession, critical: Iterable[str] = ()) -> list[TargetRow]:
    """Failed targets first, then the slowest."""
    crit = set(critical)
    rows = [TargetRow(name=t.name, status=t.status, cache=t.cache, css=target_class(t), duration_s=t.duration_s,
                      start_offset_s=t.start - session.start, worker=t.worker, cpu_s=t.cpu_s,
                      peak_rss=t.peak_rss_bytes, attempts=t.attempts, critical=t.name in crit)
            for t in session.targets]
    return sorted(rows, key=lambda r: (r.status != "failed", -r.duration_s))


def naming_alerts(alerts: Sequence[Any], session_id: str) -> list[Any]:
    """The alerts that name this build: as first bad, last good or the one that confirmed them."""
    return [a for a in alerts
            if session_id in (a.first_session_id, a.last_good_session_id, a.detected_session_id)]


# -- the overview ----------------------------------------------------------------------------------

@dataclass
class Series:
    """Columns for a uPlot chart: x (Unix s) and named y columns (None where nothing is known)."""

    x: list[float] = field(default_factory=list)
    ys: dict[str, list[float | None]] = field(default_factory=dict)


def trend_series(trend: Any) -> Series:
    # "other": abandoned, cancelled and unknown builds (neither succeeded nor failed)
    s = Series(ys={"succeeded": [], "failed": [], "other": [], "success_rate": [], "p50": [], "p95": [],
                   "cache_hit_rate": []})
    for b in trend.buckets:
        s.x.append(b.start)
        s.ys["succeeded"].append(b.succeeded)
        s.ys["failed"].append(b.failed)
        s.ys["other"].append(b.abandoned + b.cancelled + b.unknown)
        s.ys["success_rate"].append(None if b.success_rate is None else b.success_rate * 100)
        s.ys["p50"].append(b.duration_p50_s)
        s.ys["p95"].append(b.duration_p95_s)
        s.ys["cache_hit_rate"].append(None if b.cache_hit_rate is None else b.cache_hit_rate * 100)
    return s


def trend_totals(trend: Any) -> dict[str, str]:
    builds = sum(b.builds for b in trend.buckets)
    ok = sum(b.succeeded for b in trend.buckets)
    failed = sum(b.failed for b in trend.buckets)
    rated = ok + failed
    return {"builds": str(builds), "success_rate": percent(ok / rated) if rated else DASH,
            "failed": str(failed)}


# -- one target ------------------------------------------------------------------------------------

def target_series(runs: Sequence[Any]) -> dict[str, list[Any]]:
    """Oldest first: time, duration, cache hit (1/0/None) and status per run; the flips between
    success and failure (a flaky target's tell) counted."""
    ordered = sorted(runs, key=lambda r: r.t)
    return {"t": [r.t for r in ordered], "duration": [r.duration_s for r in ordered],
            "hit": [1 if r.cache == "hit" else 0 if r.cache == "miss" else None for r in ordered],
            "failed": [1 if r.status == "failed" else 0 for r in ordered],
            "session": [r.session_id for r in ordered]}


def flips(runs: Sequence[Any]) -> int:
    statuses = [r.status for r in sorted(runs, key=lambda r: r.t) if r.status in ("success", "failed")]
    return sum(1 for a, b in itertools.pairwise(statuses) if a != b)


def health_data(session: BuildSession) -> dict[str, list[Any]]:
    """The build's health over time for a chart: busy workers, slots, memory (MiB), status."""
    pts = session.health_series
    return {"t": [p.ts for p in pts], "active": [p.active_workers for p in pts],
            "workers": [p.worker_count or None for p in pts],
            "memory_mib": [round(p.memory_bytes / 2**20, 1) for p in pts],
            "status": [p.status for p in pts]}
