"""Build analytics over a list of sessions: pure logic, no bus (``TelemetryAnalyzer``).

The report answers "how are our builds doing?" for a window of sessions:
outcomes, build-time distribution with the sessions at the extremes, cache hit
rate, least-squares trends with their confidence, a daily series, per-target
analytics (including flakiness: the same target failing and passing at the
same commit) and bottlenecks (``bottlenecks.py``).  Every figure is defined in
``docs/analytics.md``; results are msgspec Structs so the service ships them as
MessagePack and the exporters turn them into JSON/CSV unchanged.

Conventions: build-time statistics use sessions that finished (success or
failed) and are complete, not abandoned ones, whose "duration" is only how long
we heard from them, nor cancelled or unknown ones (stopped early, or not known to have run to
the end), nor ones that lost events (counted as ``incomplete``); success rates count success
out of the builds whose outcome says whether they succeeded (``RATED_OUTCOMES``: not cancelled
or unknown ones, which are counted on their own); target statistics use
targets that ran (success or failed), not skipped or cancelled ones.  Sessions are ordered by start time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Literal

import msgspec

from buildtel.services.analyzer import columns
from buildtel.services.analyzer.bottlenecks import Bottlenecks, bottlenecks
from buildtel.services.analyzer.stats import Fit, linear_fit, mean_std, percentile_sorted
from buildtel.shared.health.trends import HealthTrends, health_trends
from buildtel.shared.protocol import RATED_OUTCOMES, TIMED_OUTCOMES, BuildSession, is_complete

REPORT_VERSION = 1
_NAME = attrgetter("name")
DAY_S = 86400.0
SIGNIFICANCE = 0.05
MIN_TREND_BUILDS = 3  # a slope with its confidence interval needs n - 2 >= 1 degrees of freedom
# A per-day rate is quoted only when builds spread over at least this many
# days; two working days (Mon, Tue 9-17 h) measure 1.8, three measure 2.9.
MIN_DAY_SPAN = 2.0
_UNIFORM_SPAN = math.sqrt(12.0)  # span of an even spread = sqrt(12) x its standard deviation


class ReportFilter(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Which sessions a report covers; every field is optional and they combine with AND."""

    last: int | None = None  # the N most recently finished sessions (after the other filters)
    since: float | None = None  # finish time, Unix s, inclusive
    until: float | None = None  # finish time, Unix s, exclusive
    branch: str | None = None
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    name: str | None = None  # build name (BuildStarted.name)
    target: str | None = None  # sessions that ran this target


class Extreme(msgspec.Struct, kw_only=True):
    session_id: str
    duration_s: float
    start: float
    name: str = ""
    commit: str | None = None


class DurationStats(msgspec.Struct, kw_only=True):
    n: int = 0
    mean_s: float = 0.0
    median_s: float = 0.0
    p90_s: float = 0.0
    p95_s: float = 0.0
    stdev_s: float = 0.0
    min_s: float = 0.0
    max_s: float = 0.0
    fastest: Extreme | None = None
    slowest: Extreme | None = None


class Trend(msgspec.Struct, kw_only=True):
    """Least-squares trends of a duration: seconds per build and seconds per day.

    ``per_day`` is always fitted (for JSON readers of older reports), but it is
    a rate a farm can use only when ``per_day_supported``: the builds are
    spread over at least :data:`MIN_DAY_SPAN` days.  A slope fitted to ten
    minutes of builds and multiplied out to a day is an extrapolation, not a
    measurement; summaries and CSV leave it out and say why.
    """

    per_day: Fit = msgspec.field(default_factory=Fit)
    per_build: Fit = msgspec.field(default_factory=Fit)
    direction: Literal["rising", "falling", "flat"] = "flat"
    significant: bool = False  # per-build slope's p-value below 0.05
    # Days the builds cover: sqrt(12) x their standard deviation in days, i.e.
    # the length of an even spread of builds with the same spread.
    span_days: float = 0.0
    per_day_supported: bool = False
    # Which rate a reader should quote: "none" (under 3 builds), "build", or "day".
    rate_basis: Literal["none", "build", "day"] = "none"


class DailyPoint(msgspec.Struct, kw_only=True):
    date: str  # UTC, YYYY-MM-DD, by session start
    sessions: int
    succeeded: int
    success_rate: float
    mean_s: float
    median_s: float
    p95_s: float
    cache_hit_rate: float


class TargetAnalytics(msgspec.Struct, kw_only=True):
    name: str
    runs: int
    failures: int
    failure_rate: float
    total_s: float
    share_of_total: float  # of the run time of all targets in the window
    mean_s: float
    median_s: float
    p95_s: float
    stdev_s: float
    min_s: float
    max_s: float
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float  # hits / (hits + misses); uncacheable runs count in neither
    flaky: bool = False
    flaky_commits: int = 0  # commits at which it both failed and passed
    trend: Trend = msgspec.field(default_factory=Trend)


class SessionRow(msgspec.Struct, kw_only=True):
    """One session, flattened for tables (CSV export)."""

    id: str
    name: str
    start: float
    finish: float
    duration_s: float
    outcome: str
    branch: str | None
    commit: str | None
    targets: int
    failed_targets: int
    cache_hits: int
    cache_misses: int
    cache_hit_rate: float
    target_time_s: float
    complete: bool = True  # False: the session lost events (see BuildSession.completeness)


class AnalyticsReport(msgspec.Struct, kw_only=True):
    version: int = REPORT_VERSION
    generated_at: float = 0.0
    engine: str = columns.ENGINE
    filters: ReportFilter = msgspec.field(default_factory=ReportFilter)
    window_start: float | None = None  # earliest session start
    window_end: float | None = None  # latest session finish
    sessions: int = 0
    succeeded: int = 0
    failed: int = 0
    abandoned: int = 0
    cancelled: int = 0  # stopped by a user or a signal: in no build-time figure, not in the success rate
    unknown: int = 0  # nothing said how they ended (imports without evidence): likewise
    # Sessions that lost events (BuildSession.completeness), whatever their outcome: counted here,
    # left out of the build-time figures (duration, trend, daily times) like abandoned ones.
    incomplete: int = 0
    success_rate: float = 0.0
    duration: DurationStats = msgspec.field(default_factory=DurationStats)
    cache_hits: int = 0
    cache_misses: int = 0
    cache_hit_rate: float = 0.0
    target_time_s: float = 0.0
    trend: Trend = msgspec.field(default_factory=Trend)
    daily: list[DailyPoint] = []
    targets: list[TargetAnalytics] = []
    bottlenecks: Bottlenecks | None = None
    session_rows: list[SessionRow] = []
    health: HealthTrends | None = None  # live-health checkpoints across the builds (docs/health.md)
    partial: bool = False  # the source could not supply every session asked for
    notes: list[str] = []
    # Storage partitions that did not answer ("partial: partition k did not answer", also in notes):
    # apart, so a client (the dashboard) names them without parsing free-text notes.
    partial_notes: list[str] = []


def branch_of(s: BuildSession) -> str | None:
    env = s.environment
    return env.vcs.branch if env is not None and env.vcs is not None else None


def commit_of(s: BuildSession) -> str | None:
    env = s.environment
    return env.vcs.commit if env is not None and env.vcs is not None else None


def select(sessions: Iterable[BuildSession], f: ReportFilter) -> list[BuildSession]:
    """Apply ``f``; result in chronological (start) order."""
    out = []
    for s in sessions:
        if f.since is not None and s.finish < f.since:
            continue
        if f.until is not None and s.finish >= f.until:
            continue
        if f.outcome is not None and s.outcome != f.outcome:
            continue
        if f.name is not None and s.name != f.name:
            continue
        if f.branch is not None and branch_of(s) != f.branch:
            continue
        if f.target is not None and not any(t.name == f.target for t in s.targets):
            continue
        out.append(s)
    if f.last is not None:
        out.sort(key=lambda s: (s.finish, s.id))
        out = out[-f.last:] if f.last > 0 else []
    out.sort(key=lambda s: (s.start, s.id))
    return out


def trend_of(per_day: Fit, per_build: Fit) -> Trend:
    significant = per_build.n >= MIN_TREND_BUILDS and per_build.p_value < SIGNIFICANCE and per_build.slope != 0
    direction: Literal["rising", "falling", "flat"] = "flat"
    if significant:
        direction = "rising" if per_build.slope > 0 else "falling"
    span_days = per_day.x_sd * _UNIFORM_SPAN
    per_day_supported = per_day.n >= MIN_TREND_BUILDS and span_days >= MIN_DAY_SPAN
    basis: Literal["none", "build", "day"] = "none"
    if per_build.n >= MIN_TREND_BUILDS:
        basis = "day" if per_day_supported else "build"
    return Trend(per_day=per_day, per_build=per_build, direction=direction, significant=significant,
                 span_days=span_days, per_day_supported=per_day_supported, rate_basis=basis)


def duration_stats(sessions: Sequence[BuildSession]) -> DurationStats:
    if not sessions:
        return DurationStats()
    vals = [s.duration_s for s in sessions]
    srt = sorted(vals)
    mean, std = mean_std(vals)
    lo = min(range(len(vals)), key=vals.__getitem__)
    hi = max(range(len(vals)), key=vals.__getitem__)

    def ext(i: int) -> Extreme:
        s = sessions[i]
        return Extreme(session_id=s.id, duration_s=s.duration_s, start=s.start, name=s.name, commit=commit_of(s))

    return DurationStats(n=len(vals), mean_s=mean, median_s=percentile_sorted(srt, 0.5),
                         p90_s=percentile_sorted(srt, 0.9), p95_s=percentile_sorted(srt, 0.95), stdev_s=std,
                         min_s=srt[0], max_s=srt[-1], fastest=ext(lo), slowest=ext(hi))


def _rate(a: int, b: int) -> float:
    return a / (a + b) if a + b else 0.0


class TelemetryAnalyzer:
    """Computes :class:`AnalyticsReport`\\ s; stateless apart from its options, safe to share."""

    def __init__(self, *, critical_paths: int = 10, speedup_pct: float = 50.0, top_bottlenecks: int = 5,
                 engine: str = "auto") -> None:
        self.critical_paths = critical_paths  # most recent sessions whose critical paths are analysed
        self.speedup_pct = speedup_pct
        self.top_bottlenecks = top_bottlenecks
        self.engine = engine

    def report(self, sessions: Iterable[BuildSession], *, filters: ReportFilter | None = None,
               include_sessions: bool = False, top_targets: int | None = None) -> AnalyticsReport:
        with columns.gc_paused():
            return self._report(sessions, filters, include_sessions, top_targets)

    def _report(self, sessions: Iterable[BuildSession], filters: ReportFilter | None, include_sessions: bool,
                top_targets: int | None) -> AnalyticsReport:
        f = filters or ReportFilter()
        ss = select(sessions, f)
        rep = AnalyticsReport(generated_at=time.time(), filters=f,
                              engine=columns.ENGINE if self.engine == "auto" else self.engine)
        if not ss:
            return rep
        rep.window_start = ss[0].start
        rep.window_end = max(s.finish for s in ss)
        rep.sessions = len(ss)
        rep.succeeded = sum(1 for s in ss if s.outcome == "success")
        rep.abandoned = sum(1 for s in ss if s.outcome == "abandoned")
        rep.cancelled = sum(1 for s in ss if s.outcome == "cancelled")
        rep.unknown = sum(1 for s in ss if s.outcome == "unknown")
        rep.failed = sum(1 for s in ss if s.outcome == "failed")
        rep.incomplete = sum(1 for s in ss if not is_complete(s))
        rated = rep.succeeded + rep.failed + rep.abandoned
        rep.success_rate = rep.succeeded / rated if rated else 0.0
        finished = [s for s in ss if s.outcome in TIMED_OUTCOMES and is_complete(s)]
        rep.duration = duration_stats(finished)
        rep.cache_hits = sum(s.cache_hits for s in ss)
        rep.cache_misses = sum(s.cache_misses for s in ss)
        rep.cache_hit_rate = _rate(rep.cache_hits, rep.cache_misses)
        t0 = ss[0].start
        if finished:
            ys = [s.duration_s for s in finished]
            rep.trend = trend_of(linear_fit([(s.start - t0) / DAY_S for s in finished], ys),
                                 linear_fit(list(range(len(ys))), ys))
        rep.daily = daily_series(ss)
        rep.targets = self.targets(ss, t0=t0)
        rep.target_time_s = sum(t.total_s for t in rep.targets)
        if self.critical_paths > 0:
            recent = [s for s in ss if s.targets][-self.critical_paths:]
            if recent:
                rep.bottlenecks = bottlenecks(recent, speedup_pct=self.speedup_pct, top=self.top_bottlenecks,
                                              totals={t.name: t.total_s for t in rep.targets})
        if top_targets is not None:
            rep.targets = rep.targets[:top_targets]
        if include_sessions:
            rep.session_rows = [session_row(s) for s in ss]
        rep.health = health_trends(ss)
        return rep

    def targets(self, sessions: Sequence[BuildSession], *, t0: float | None = None) -> list[TargetAnalytics]:
        """Per-target analytics of chronologically ordered sessions, most total time first."""
        if not sessions:
            return []
        cols = columns.target_columns(sessions, sessions[0].start if t0 is None else t0, self.engine)
        flaky = flaky_commits(sessions, cols.failed_keys, cols.not_success)
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


def flaky_commits(sessions: Sequence[BuildSession], failed: dict[str, set[int]],
                  not_success: dict[int, dict[str, str]] | None = None) -> dict[str, int]:
    """target -> number of commits at which it failed in one session and passed in another.

    Only sessions with a known commit count: without one we cannot tell a flake from a fix.
    ``not_success`` (session index -> {target: status} of its targets that did not succeed)
    spares reading statuses again; without it they are read here.
    """
    by_commit: dict[str, list[int]] = {}
    for i, s in enumerate(sessions):
        c = commit_of(s)
        if c:
            by_commit.setdefault(c, []).append(i)
    if not_success is None:
        not_success = {i: {t.name: t.status for t in s.targets if t.status != "success"}
                       for i, s in enumerate(sessions)}
    names: dict[int, frozenset[str]] = {}

    def passed(j: int, name: str) -> bool:
        got = names.get(j)
        if got is None:
            got = names[j] = frozenset(map(_NAME, sessions[j].targets))
        return name in got and name not in not_success.get(j, {})

    out: dict[str, int] = {}
    for name, where in failed.items():
        commits = {c for i in where if (c := commit_of(sessions[i])) is not None}
        n = sum(1 for c in commits if any(passed(j, name) for j in by_commit.get(c, ()) if j not in where))
        if n:
            out[name] = n
    return out


def daily_series(sessions: Sequence[BuildSession]) -> list[DailyPoint]:
    days: dict[int, list[BuildSession]] = {}
    for s in sessions:
        days.setdefault(int(s.start // DAY_S), []).append(s)
    out = []
    for day in sorted(days):
        group = days[day]
        durs = sorted(s.duration_s for s in group if s.outcome in TIMED_OUTCOMES and is_complete(s))
        ok = sum(1 for s in group if s.outcome == "success")
        rated = sum(1 for s in group if s.outcome in RATED_OUTCOMES)
        hits = sum(s.cache_hits for s in group)
        misses = sum(s.cache_misses for s in group)
        out.append(DailyPoint(
            date=datetime.fromtimestamp(day * DAY_S, UTC).strftime("%Y-%m-%d"), sessions=len(group),
            succeeded=ok, success_rate=ok / rated if rated else 0.0,
            mean_s=math.fsum(durs) / len(durs) if durs else 0.0,
            median_s=percentile_sorted(durs, 0.5), p95_s=percentile_sorted(durs, 0.95),
            cache_hit_rate=_rate(hits, misses)))
    return out


def session_row(s: BuildSession) -> SessionRow:
    failed = s.totals.failed if s.totals.targets == len(s.targets) else sum(t.status == "failed" for t in s.targets)
    return SessionRow(id=s.id, name=s.name, start=s.start, finish=s.finish, duration_s=s.duration_s,
                      outcome=s.outcome, branch=branch_of(s), commit=commit_of(s), targets=len(s.targets),
                      failed_targets=failed, cache_hits=s.cache_hits, cache_misses=s.cache_misses,
                      cache_hit_rate=s.cache_hit_rate, target_time_s=s.totals.target_time_s
                      or sum(t.duration_s for t in s.targets), complete=is_complete(s))

