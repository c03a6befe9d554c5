"""The analytics report from report rows (storage's ``columns`` endpoint), not from whole sessions.

:class:`FrameBuilder` gathers the pages storage sends (newest first, each with its own name
table) into one :class:`Frame`: the sessions' :class:`~buildtel.services.storage.columns.ReportRow`\\ s
in chronological (start, id) order and their targets as flat numpy columns in the same order.
:func:`report_from_frame` then computes the same :class:`AnalyticsReport` that
``TelemetryAnalyzer.report`` computes from the same sessions (tests compare the two field by
field): the figures are the ones of ``analytics.py``, read from rows instead of sessions; only
the critical-path analysis needs whole sessions, the few most recent ones, which the caller
fetches (:meth:`Frame.recent_ids`) and passes in.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from buildtel.services.analyzer import columns
from buildtel.services.analyzer.analytics import (
    DAY_S,
    AnalyticsReport,
    DailyPoint,
    DurationStats,
    Extreme,
    ReportFilter,
    SessionRow,
    TargetAnalytics,
    TelemetryAnalyzer,
    trend_of,
)
from buildtel.services.analyzer.bottlenecks import bottlenecks
from buildtel.services.analyzer.stats import linear_fit, mean_std, percentile_sorted
from buildtel.services.storage.columns import STATUSES, ColumnsReply, ReportRow
from buildtel.shared.health.trends import health_trends
from buildtel.shared.protocol import RATED_OUTCOMES, TIMED_OUTCOMES, BuildSession

_FAILED, _SKIPPED, _CANCELLED = 1, 2, 3


class Frame:
    """Rows in (start, id) order; ``ids``/``dur``/``codes`` one entry per target run, in the same
    session order and each session's stored target order; ``offsets[i]`` where row i's begin."""

    def __init__(self, rows: list[ReportRow], names: list[str], ids: Any, dur: Any, codes: Any) -> None:
        self.rows = rows
        self.names = names
        self.ids = ids  # int64
        self.dur = dur  # float64
        self.codes = codes  # uint8: cache | status << 2
        counts = np.fromiter((r.targets for r in rows), dtype=np.int64, count=len(rows))
        self.offsets = np.concatenate(([0], np.cumsum(counts))).tolist()
        # Storage partitions that did not answer ("partial: partition k did not answer"): the rows
        # lack their sessions, and the report must say so (docs/scaling.md, Partitions).
        self.partial: list[str] = []

    def recent_ids(self, n: int) -> list[str]:
        """The ``n`` most recent sessions with targets, chronologically (those a critical-path
        analysis reads, as ``TelemetryAnalyzer.report`` picks them)."""
        return [r.id for r in [r for r in self.rows if r.targets][-n:]] if n > 0 else []

    def target_names(self, i: int) -> list[str]:
        names = self.names
        return [names[k] for k in self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()]


class FrameBuilder:
    """Collects storage's pages; :meth:`frame` puts them in chronological order."""

    def __init__(self) -> None:
        self.rows: list[ReportRow] = []
        self.names: dict[str, int] = {}
        self.ids: list[Any] = []
        self.dur: list[Any] = []
        self.codes: list[Any] = []
        self.partial: set[str] = set()

    def add(self, page: ColumnsReply) -> None:
        self.partial.update(page.partial)
        n = len(page.names)
        remap = np.fromiter((self.names.setdefault(name, len(self.names)) for name in page.names), dtype=np.int64,
                            count=n)
        local = np.frombuffer(page.name_ids, dtype="<u4")
        total = sum(r.targets for r in page.sessions)
        if not (len(local) == len(page.durations) // 8 == len(page.codes) == total) or (n and local.max() >= n):
            raise ValueError("storage sent a columns page whose columns do not match its rows")
        self.rows.extend(page.sessions)
        self.ids.append(remap[local] if n else np.zeros(0, dtype=np.int64))
        self.dur.append(np.frombuffer(page.durations, dtype="<f8").astype(np.float64))
        self.codes.append(np.frombuffer(page.codes, dtype=np.uint8))

    def frame(self) -> Frame:
        rows = self.rows
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        dur = np.concatenate(self.dur) if self.dur else np.zeros(0)
        codes = np.concatenate(self.codes) if self.codes else np.zeros(0, dtype=np.uint8)
        order = sorted(range(len(rows)), key=lambda i: (rows[i].start, rows[i].id))
        counts = np.fromiter((r.targets for r in rows), dtype=np.int64, count=len(rows))
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(rows) else counts
        o = np.asarray(order, dtype=np.int64)
        c = counts[o]
        # Position k of the new order's targets comes from starts[o] + (k - its session's new start).
        new_starts = np.concatenate(([0], np.cumsum(c)[:-1])) if len(rows) else c
        gather = np.repeat(starts[o] - new_starts, c) + np.arange(int(c.sum()))
        ids = ids[gather]
        # Number the names by first appearance in chronological order, as the session path does:
        # sums over targets then add in the same order, to the last bit.
        by_first = _first_appearance(ids, np.concatenate(([0], np.cumsum(c))).tolist(), len(self.names))
        renumber = np.zeros(len(self.names), dtype=np.int64)
        renumber[by_first] = np.arange(len(by_first))
        names = list(self.names)
        frame = Frame([rows[i] for i in order], [names[k] for k in by_first.tolist()], renumber[ids],
                      dur[gather], codes[gather])
        frame.partial = sorted(self.partial)
        return frame


def _first_appearance(ids: Any, offsets: list[int], n_names: int) -> Any:
    """The name ids in the order they first appear, session by session (most sessions add none:
    the loop stops once every name was seen)."""
    seen = np.zeros(n_names, dtype=bool)
    order: list[int] = []
    for a, b in itertools.pairwise(offsets):
        seg = ids[a:b]
        new = seg[~seen[seg]]
        if len(new):
            for k in new.tolist():
                if not seen[k]:
                    seen[k] = True
                    order.append(k)
            if len(order) == n_names:
                break
    return np.asarray(order, dtype=np.int64)


def _statuses(fr: Frame) -> tuple[list[int], dict[str, set[int]], dict[int, dict[str, str]]]:
    """As ``columns._scan_statuses``: positions that did not run, failures by name, and every
    session's non-success targets (name -> status)."""
    status = fr.codes >> 2
    pos = np.flatnonzero(status).tolist()
    if not pos:
        return [], {}, {}
    sess = (np.searchsorted(np.asarray(fr.offsets), np.asarray(pos), side="right") - 1).tolist()
    sts = status[pos].tolist()
    names = fr.ids[pos].tolist()
    by_session: dict[int, list[tuple[int, int, int]]] = {}
    for p, si, st, nid in zip(pos, sess, sts, names, strict=True):
        by_session.setdefault(si, []).append((st, p, nid))
    not_run: list[int] = []
    failed: dict[str, set[int]] = {}
    bad: dict[int, dict[str, str]] = {}
    for si, entries in by_session.items():
        t, r = fr.rows[si].totals, fr.rows[si]
        if t.targets == r.targets and not (t.failed or t.skipped or t.cancelled):
            continue  # the collector's totals vouch that every target succeeded (as the session path reads it)
        here = bad[si] = {}
        for st, p, nid in sorted(entries):  # failed, then skipped, then cancelled, each in target order
            name = fr.names[nid]
            here[name] = STATUSES[st]
            if st == _FAILED:
                failed.setdefault(name, set()).add(si)
            else:
                not_run.append(p)
    not_run.sort()
    return not_run, failed, bad


def _rate(a: int, b: int) -> float:
    return a / (a + b) if a + b else 0.0


def duration_stats(rows: Sequence[ReportRow]) -> DurationStats:
    if not rows:
        return DurationStats()
    vals = [r.duration_s for r in rows]
    srt = sorted(vals)
    mean, std = mean_std(vals)
    lo = min(range(len(vals)), key=vals.__getitem__)
    hi = max(range(len(vals)), key=vals.__getitem__)

    def ext(i: int) -> Extreme:
        r = rows[i]
        return Extreme(session_id=r.id, duration_s=r.duration_s, start=r.start, name=r.name, commit=r.commit)

    return DurationStats(n=len(vals), mean_s=mean, median_s=percentile_sorted(srt, 0.5),
                         p90_s=percentile_sorted(srt, 0.9), p95_s=percentile_sorted(srt, 0.95), stdev_s=std,
                         min_s=srt[0], max_s=srt[-1], fastest=ext(lo), slowest=ext(hi))


def daily_series(rows: Sequence[ReportRow]) -> list[DailyPoint]:
    days: dict[int, list[ReportRow]] = {}
    for r in rows:
        days.setdefault(int(r.start // DAY_S), []).append(r)
    out = []
    for day in sorted(days):
        group = days[day]
        durs = sorted(r.duration_s for r in group if r.outcome in TIMED_OUTCOMES and r.complete)
        ok = sum(1 for r in group if r.outcome == "success")
        rated = sum(1 for r in group if r.outcome in RATED_OUTCOMES)
        hits = sum(r.cache_hits for r in group)
        misses = sum(r.cache_misses for r in group)
        out.append(DailyPoint(
            date=datetime.fromtimestamp(day * DAY_S, UTC).strftime("%Y-%m-%d"), sessions=len(group),
            succeeded=ok, success_rate=ok / rated if rated else 0.0,
            mean_s=math.fsum(durs) / len(durs) if durs else 0.0,
            median_s=percentile_sorted(durs, 0.5), p95_s=percentile_sorted(durs, 0.95),
            cache_hit_rate=_rate(hits, misses)))
    return out


def flaky_commits(fr: Frame, failed: dict[str, set[int]], not_success: dict[int, dict[str, str]]) -> dict[str, int]:
    """As ``analytics.flaky_commits``: commits at which a target failed in one session and passed in another."""
    by_commit: dict[str, list[int]] = {}
    for i, r in enumerate(fr.rows):
        if r.commit:
            by_commit.setdefault(r.commit, []).append(i)
    names: dict[int, frozenset[str]] = {}

    def passed(j: int, name: str) -> bool:
        got = names.get(j)
        if got is None:
            got = names[j] = frozenset(fr.target_names(j))
        return name in got and name not in not_success.get(j, {})

    out: dict[str, int] = {}
    for name, where in failed.items():
        commits = {c for i in where if (c := fr.rows[i].commit) is not None}
        n = sum(1 for c in commits if any(passed(j, name) for j in by_commit.get(c, ()) if j not in where))
        if n:
            out[name] = n
    return out


def targets(an: TelemetryAnalyzer, fr: Frame, t0: float) -> list[TargetAnalytics]:
    """As ``TelemetryAnalyzer.targets``, from the frame's columns."""
    use_numpy = columns._use_numpy(an.engine)
    not_run, failed, bad = _statuses(fr)
    counts = [r.targets for r in fr.rows]
    days = [(r.start - t0) / DAY_S for r in fr.rows]
    cc = (fr.codes & 3).astype(np.int8)
    if use_numpy:
        cols = columns.columns_from_arrays(fr.ids, fr.dur, cc, counts, fr.names, days, not_run, failed, bad, True)
    else:
        cols = columns.columns_from_arrays(fr.ids.tolist(), fr.dur.tolist(), cc.tolist(), counts, fr.names, days,
                                           not_run, failed, bad, False)
    flaky = flaky_commits(fr, cols.failed_keys, cols.not_success)
    grand = sum(cols.total) or 1.0
    out = []
    for g, name in enumerate(cols.names):
        runs = cols.runs[g]
        if runs == 0:
            continue
        out.append(TargetAnalytics(
            name=name, runs=runs, failures=cols.failures[g], failure_rate=cols.failures[g] / runs,
            total_s=cols.total[g], share_of_total=cols.total[g] / grand, mean_s=cols.mean[g],
            median_s=cols.median[g], p95_s=cols.p95[g], stdev_s=cols.stdev[g], min_s=cols.minimum[g],
            max_s=cols.maximum[g], cache_hits=cols.hits[g], cache_misses=cols.misses[g],
            cache_hit_rate=_rate(cols.hits[g], cols.misses[g]), flaky=flaky.get(name, 0) > 0,
            flaky_commits=flaky.get(name, 0), trend=trend_of(cols.per_day[g], cols.per_build[g])))
    out.sort(key=lambda t: (-t.total_s, t.name))
    return out


def session_row(fr: Frame, i: int) -> SessionRow:
    r = fr.rows[i]
    a, b = fr.offsets[i], fr.offsets[i + 1]
    t = r.totals
    failed = t.failed if t.targets == r.targets else int(np.count_nonzero((fr.codes[a:b] >> 2) == _FAILED))
    return SessionRow(id=r.id, name=r.name, start=r.start, finish=r.finish, duration_s=r.duration_s,
                      outcome=r.outcome, branch=r.branch, commit=r.commit, targets=r.targets,
                      failed_targets=failed, cache_hits=r.cache_hits, cache_misses=r.cache_misses,
                      cache_hit_rate=r.cache_hit_rate, target_time_s=t.target_time_s
                      or sum(fr.dur[a:b].tolist()), complete=r.complete)


def report_from_frame(an: TelemetryAnalyzer, fr: Frame, *, filters: ReportFilter | None = None,
                      recent: Sequence[BuildSession] = (), include_sessions: bool = False,
                      top_targets: int | None = None) -> AnalyticsReport:
    """``an.report(sessions, ...)`` for the sessions ``fr`` holds (already filtered); ``recent`` are
    the whole sessions of ``fr.recent_ids(an.critical_paths)`` (those that could be fetched)."""
    with columns.gc_paused():
        return _report(an, fr, filters or ReportFilter(), recent, include_sessions, top_targets)


def _report(an: TelemetryAnalyzer, fr: Frame, f: ReportFilter, recent: Sequence[BuildSession],
            include_sessions: bool, top_targets: int | None) -> AnalyticsReport:
    rows = fr.rows
    rep = AnalyticsReport(generated_at=time.time(), filters=f,
                          engine=columns.ENGINE if an.engine == "auto" else an.engine)
    if not rows:
        return rep
    rep.window_start = rows[0].start
    rep.window_end = max(r.finish for r in rows)
    rep.sessions = len(rows)
    rep.succeeded = sum(1 for r in rows if r.outcome == "success")
    rep.abandoned = sum(1 for r in rows if r.outcome == "abandoned")
    rep.cancelled = sum(1 for r in rows if r.outcome == "cancelled")
    rep.unknown = sum(1 for r in rows if r.outcome == "unknown")
    rep.failed = sum(1 for r in rows if r.outcome == "failed")
    rep.incomplete = sum(1 for r in rows if not r.complete)
    rated = rep.succeeded + rep.failed + rep.abandoned
    rep.success_rate = rep.succeeded / rated if rated else 0.0
    finished = [r for r in rows if r.outcome in TIMED_OUTCOMES and r.complete]
    rep.duration = duration_stats(finished)
    rep.cache_hits = sum(r.cache_hits for r in rows)
    rep.cache_misses = sum(r.cache_misses for r in rows)
    rep.cache_hit_rate = _rate(rep.cache_hits, rep.cache_misses)
    t0 = rows[0].start
    if finished:
        ys = [r.duration_s for r in finished]
        rep.trend = trend_of(linear_fit([(r.start - t0) / DAY_S for r in finished], ys),
                             linear_fit(list(range(len(ys))), ys))
    rep.daily = daily_series(rows)
    rep.targets = targets(an, fr, t0) if len(fr.ids) else []
    rep.target_time_s = sum(t.total_s for t in rep.targets)
    if an.critical_paths > 0 and recent:
        rep.bottlenecks = bottlenecks(list(recent), speedup_pct=an.speedup_pct, top=an.top_bottlenecks,
                                      totals={t.name: t.total_s for t in rep.targets})
    if top_targets is not None:
        rep.targets = rep.targets[:top_targets]
    if include_sessions:
        rep.session_rows = [session_row(fr, i) for i in range(len(rows))]
    rep.health = health_trends(rows)
    return rep
