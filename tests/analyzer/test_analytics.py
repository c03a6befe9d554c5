"""TelemetryAnalyzer against figures computed independently (statistics module, by hand)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from buildtel.services.analyzer import columns
from buildtel.services.analyzer.analytics import ReportFilter, TelemetryAnalyzer, select
from buildtel.services.analyzer.stats import linear_fit, t_quantile, t_two_sided_p
from buildtel.services.analyzer.synthetic import Scenario, generate
from tests.analyzer.helpers import T0, session, target

ENGINES = ["python"] + (["numpy"] if columns.np is not None else [])


def _history(n: int = 40, seed: int = 5) -> list:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        outcome = "failed" if k % 7 == 3 else ("abandoned" if k == 11 else "success")
        ts = [target("//a:compile", T0 + 3600 * k, rng.uniform(1, 3), cache=rng.choice(["miss", "remote_hit"])),
              target("//a:test", T0 + 3600 * k + 3, rng.uniform(2, 4),
                     status="failed" if outcome == "failed" else "success", cache="uncacheable"),
              target("//b:lint", T0 + 3600 * k, rng.uniform(0.1, 0.5), cache=rng.choice(["local_hit", "miss"]),
                     status="skipped" if k % 5 == 0 else "success")]
        out.append(session(k, 60 + 0.5 * k + rng.gauss(0, 2), targets=ts, outcome=outcome))
    return out


def test_build_time_statistics_match_the_statistics_module() -> None:
    sessions = _history()
    rep = TelemetryAnalyzer().report(sessions)
    finished = [s for s in sessions if s.outcome != "abandoned"]
    durs = [s.duration_s for s in finished]
    d = rep.duration
    assert rep.sessions == 40 and d.n == 39
    assert rep.succeeded == sum(s.outcome == "success" for s in sessions)
    assert rep.abandoned == 1
    assert rep.failed == 40 - rep.succeeded - 1
    assert rep.success_rate == pytest.approx(rep.succeeded / 40)
    assert d.mean_s == pytest.approx(statistics.fmean(durs))
    assert d.median_s == pytest.approx(statistics.median(durs))
    q = statistics.quantiles(durs, n=100, method="inclusive")
    assert d.p90_s == pytest.approx(q[89])
    assert d.p95_s == pytest.approx(q[94])
    assert d.stdev_s == pytest.approx(statistics.stdev(durs))
    assert d.min_s == min(durs) and d.max_s == max(durs)
    assert d.fastest.session_id == min(finished, key=lambda s: s.duration_s).id
    assert d.slowest.session_id == max(finished, key=lambda s: s.duration_s).id
    hits = sum(s.cache_hits for s in sessions)
    misses = sum(s.cache_misses for s in sessions)
    assert rep.cache_hit_rate == pytest.approx(hits / (hits + misses))


def test_trend_matches_statistics_linear_regression_and_is_significant() -> None:
    sessions = _history()
    rep = TelemetryAnalyzer().report(sessions)
    finished = [s for s in sessions if s.outcome != "abandoned"]
    ys = [s.duration_s for s in finished]
    xs = list(range(len(ys)))
    slope, intercept = statistics.linear_regression(xs, ys)
    assert rep.trend.per_build.slope == pytest.approx(slope)
    assert rep.trend.per_build.intercept == pytest.approx(intercept)
    assert rep.trend.per_build.r2 == pytest.approx(statistics.correlation(xs, ys) ** 2)
    days = [(s.start - sessions[0].start) / 86400 for s in finished]
    assert rep.trend.per_day.slope == pytest.approx(statistics.linear_regression(days, ys).slope)
    # 0.5 s per build against 2 s of noise over 39 builds: clearly rising.
    assert rep.trend.direction == "rising" and rep.trend.significant
    assert rep.trend.per_build.ci_low < slope < rep.trend.per_build.ci_high
    assert rep.trend.per_build.p_value < 1e-6


def test_p_value_and_interval_by_hand() -> None:
    # t distribution landmarks: t(0.975; 10) = 2.228, t(0.975; 3) = 3.182.
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.975, 3) == pytest.approx(3.1824, abs=1e-4)
    assert t_two_sided_p(2.2281389, 10) == pytest.approx(0.05, abs=1e-6)
    # y = 2x + e on 5 points: slope 1.99, se computed by hand.
    xs, ys = [1, 2, 3, 4, 5], [2.0, 4.1, 5.9, 8.2, 9.9]
    fit = linear_fit(xs, ys)
    mx, my = 3.0, sum(ys) / 5
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys, strict=True)]
    se = math.sqrt(sum(r * r for r in resid) / 3 / sxx)
    assert fit.slope == pytest.approx(slope)
    assert fit.ci_high - fit.slope == pytest.approx(3.18245 * se, rel=1e-4)
    assert fit.p_value == pytest.approx(t_two_sided_p(slope / se, 3))
    flat = linear_fit([1, 2, 3, 4], [5.0, 5.0, 5.0, 5.0])
    assert flat.slope == 0 and flat.p_value == 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_target_statistics_match_the_statistics_module(engine: str) -> None:
    sessions = _history()
    rep = TelemetryAnalyzer(engine=engine).report(sessions)
    by = {t.name: t for t in rep.targets}
    grand = sum(t.duration_s for s in sessions for t in s.targets if t.status in ("success", "failed"))
    for name in ("//a:compile", "//a:test", "//b:lint"):
        runs = [t for s in sessions for t in s.targets if t.name == name and t.status in ("success", "failed")]
        durs = [t.duration_s for t in runs]
        t = by[name]
        assert t.runs == len(runs)
        assert t.failures == sum(r.status == "failed" for r in runs)
        assert t.failure_rate == pytest.approx(t.failures / len(runs))
        assert t.total_s == pytest.approx(sum(durs))
        assert t.share_of_total == pytest.approx(sum(durs) / grand)
        assert t.mean_s == pytest.approx(statistics.fmean(durs))
        assert t.median_s == pytest.approx(statistics.median(durs))
        assert t.p95_s == pytest.approx(statistics.quantiles(durs, n=100, method="inclusive")[94])
        assert t.stdev_s == pytest.approx(statistics.stdev(durs))
        assert (t.min_s, t.max_s) == (min(durs), max(durs))
        hits = sum(r.cache in ("local_hit", "remote_hit") for r in runs)
        misses = sum(r.cache == "miss" for r in runs)
        assert (t.cache_hits, t.cache_misses) == (hits, misses)
        assert t.cache_hit_rate == pytest.approx(hits / (hits + misses) if hits + misses else 0.0)
        # per-build trend: x is the session's position in the window
        xs = [i for i, s in enumerate(sessions) for r in s.targets if r.name == name and r in runs]
        assert t.trend.per_build.slope == pytest.approx(statistics.linear_regression(xs, durs).slope, abs=1e-12)
    assert by["//b:lint"].runs == 40 - 8  # skipped runs are not runs
    assert sum(t.share_of_total for t in rep.targets) == pytest.approx(1.0)
    assert rep.targets == sorted(rep.targets, key=lambda t: -t.total_s)


def test_engines_agree_on_a_realistic_history() -> None:
    assert columns.np is not None, "numpy is a dependency: the columnar engine must be available"
    sessions = generate(Scenario(sessions=150, targets=40, flaky=("//pkg3/lib3:t3",), fail_rate=0.1, seed=9))
    a = TelemetryAnalyzer(engine="numpy").report(sessions)
    b = TelemetryAnalyzer(engine="python").report(sessions)
    a.engine = b.engine
    a.generated_at = b.generated_at
    for x, y in zip(a.targets, b.targets, strict=True):
        for f in ("runs", "failures", "total_s", "mean_s", "median_s", "p95_s", "stdev_s", "cache_hits"):
            assert getattr(x, f) == pytest.approx(getattr(y, f), rel=1e-9), f
        assert x.trend.per_day.slope == pytest.approx(y.trend.per_day.slope, rel=1e-6, abs=1e-12)


def test_flaky_means_failing_and_passing_at_the_same_commit() -> None:
    def t(k, name, status):
        return target(name, T0 + 3600 * k, 1.0, status=status)
    sessions = [
        session(0, 10, targets=[t(0, "//flaky", "failed"), t(0, "//fixed", "failed")], commit="aaa", outcome="failed"),
        session(1, 10, targets=[t(1, "//flaky", "success"), t(1, "//fixed", "failed")], commit="aaa",
                outcome="failed"),
        # //fixed passes only once the commit changed: a fix, not a flake.
        session(2, 10, targets=[t(2, "//flaky", "success"), t(2, "//fixed", "success")], commit="bbb"),
        session(3, 10, targets=[t(3, "//flaky", "failed"), t(3, "//fixed", "success")], commit="ccc",
                outcome="failed"),
        session(4, 10, targets=[t(4, "//flaky", "success"), t(4, "//fixed", "success")], commit="ccc"),
    ]
    by = {x.name: x for x in TelemetryAnalyzer().report(sessions).targets}
    assert by["//flaky"].flaky and by["//flaky"].flaky_commits == 2
    assert not by["//fixed"].flaky and by["//fixed"].failures == 2


def test_statuses_are_read_when_totals_are_missing() -> None:
    ts = [target("//x", T0, 1.0, status="failed"), target("//y", T0, 1.0, status="skipped")]
    rep = TelemetryAnalyzer().report([session(0, 5, targets=ts, totals=False)])
    by = {x.name: x for x in rep.targets}
    assert by["//x"].failures == 1 and "//y" not in by


def test_daily_series_and_filters() -> None:
    sessions = [session(k, 10 + k, start=T0 + k * 6 * 3600, branch="main" if k % 2 else "dev") for k in range(12)]
    rep = TelemetryAnalyzer().report(sessions)
    assert [p.date for p in rep.daily] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert [p.sessions for p in rep.daily] == [4, 4, 4]
    assert rep.daily[1].median_s == pytest.approx(statistics.median([14, 15, 16, 17]))
    last = select(sessions, ReportFilter(last=3))
    assert [s.id for s in last] == [s.id for s in sessions[-3:]]
    since = select(sessions, ReportFilter(since=sessions[5].finish, until=sessions[8].finish))
    assert [s.id for s in since] == [s.id for s in sessions[5:8]]
    assert {s.environment.vcs.branch for s in select(sessions, ReportFilter(branch="dev"))} == {"dev"}
    rep = TelemetryAnalyzer().report(sessions, filters=ReportFilter(branch="main", last=2))
    assert rep.sessions == 2 and rep.duration.max_s == 21
    assert TelemetryAnalyzer().report([]).sessions == 0


def test_10k_scale_smoke_is_linear_enough() -> None:
    # Not the benchmark (benchmarks/bench_analyzer.py): a guard against accidental quadratic work.
    sessions = generate(Scenario(sessions=400, targets=60, seed=2))
    rep = TelemetryAnalyzer().report(sessions, include_sessions=True)
    assert rep.sessions == 400 and len(rep.targets) == 60 and len(rep.session_rows) == 400
    assert rep.bottlenecks is not None and rep.bottlenecks.sessions_analysed == 10
