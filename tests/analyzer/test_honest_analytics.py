"""Numbers a farm can trust: rates only over spans that support them, critical paths say what they rest on.

The two reports from the issue: a "+11139 s per day" trend extrapolated from
ten minutes of builds, and a "critical path" through ``make -j2`` of
independent objects that is really the order of the two lanes.
"""

from __future__ import annotations

import csv
import io
import json

import msgspec
import pytest

from buildtel.services.analyzer.analytics import MIN_DAY_SPAN, TelemetryAnalyzer
from buildtel.services.analyzer.bottlenecks import critical_path
from buildtel.services.analyzer.export import report_from_json, summary, targets_csv, to_json
from tests.analyzer.helpers import T0, session, target

DAY = 86400.0


def _rising(starts: list[float]) -> list:
    # +2 s per build with a little alternating noise: a clear per-build trend.
    return [session(k, 60 + 2.0 * k + (0.5 if k % 2 else -0.5), start=t,
                    targets=[target("//a:cc", t, 1.0 + 0.1 * k)])
            for k, t in enumerate(starts)]


def test_ten_minutes_of_builds_give_a_per_build_rate_and_no_per_day_rate() -> None:
    sessions = _rising([T0 + 30.0 * k for k in range(20)])  # 20 builds, 30 s apart
    rep = TelemetryAnalyzer().report(sessions)
    t = rep.trend
    assert t.rate_basis == "build" and not t.per_day_supported
    assert t.span_days < 0.01
    assert t.per_build.ci_low < 2.0 < t.per_build.ci_high
    text = summary(rep)
    line = next(x for x in text.splitlines() if x.startswith("Trend:"))
    assert "per build (95% CI" in line and "p=" in line and "20 builds" in line
    assert "per day (" not in line  # the extrapolated figure is not shown at all
    assert "no per-day rate" in line and f"needs {MIN_DAY_SPAN:g} days" in line
    rows = list(csv.DictReader(io.StringIO(targets_csv(rep))))
    assert rows[0]["trend_s_per_day"] == "" and float(rows[0]["trend_s_per_build"]) == pytest.approx(0.1)
    assert rep.targets[0].trend.rate_basis == "build"


def test_builds_over_days_give_a_per_day_rate_with_its_interval() -> None:
    sessions = _rising([T0 + DAY * k for k in range(10)])  # one build a day for ten days
    t = TelemetryAnalyzer().report(sessions).trend
    assert t.per_day_supported and t.rate_basis == "day"
    assert t.span_days == pytest.approx(10 * (10 ** 2 - 1) ** 0.5 / 10, rel=1e-6)  # sqrt(12) x sd of 0..9
    assert t.per_day.slope == pytest.approx(2.0, abs=0.2)
    line = next(x for x in summary(TelemetryAnalyzer().report(sessions)).splitlines() if x.startswith("Trend:"))
    assert "s per day (95% CI" in line and "builds over" in line


@pytest.mark.parametrize(("days", "supported"), [(1, False), (2, False), (3, True)])
def test_per_day_needs_builds_on_several_working_days(days: int, supported: bool) -> None:
    # Builds every 30 minutes from 9 to 17 h on consecutive days.
    starts = [T0 + DAY * d + 9 * 3600 + 1800 * k for d in range(days) for k in range(17)]
    t = TelemetryAnalyzer().report(_rising(starts)).trend
    assert t.per_day_supported is supported
    assert t.rate_basis == ("day" if supported else "build")


def test_too_few_builds_quote_no_rate() -> None:
    rep = TelemetryAnalyzer().report(_rising([T0, T0 + DAY]))
    assert rep.trend.rate_basis == "none" and not rep.trend.per_day_supported
    assert "Trend:" not in summary(rep)


def _make_j2(deps: bool) -> list:
    # Four independent objects on two lanes (make -j2), then a link that needs all of them.
    objs = [target(f"o{i}", T0 + 10.0 * (i // 2), 10.0, worker=f"w{i % 2}") for i in range(4)]
    link = target("app", T0 + 20.0, 5.0, worker="w0", deps=[o.name for o in objs] if deps else None)
    return [session(0, 25.0, start=T0, targets=[*objs, link])]


def test_critical_path_without_dependency_data_is_labelled_lane_order() -> None:
    [s] = _make_j2(deps=False)
    cp = critical_path(s)
    assert cp.basis == "lane order" and cp.label == "lane order (no dependency data)"
    text = summary(TelemetryAnalyzer().report([s]))
    assert "Latest critical path, lane order (no dependency data)" in text
    assert "Bottlenecks (critical paths of the last 1 builds, lane order (no dependency data))" in text


def test_critical_path_from_recorded_dependencies_says_so() -> None:
    # make -j4: the four objects run side by side, the link waits for all of them.
    objs = [target(f"o{i}", T0, 10.0 + i, worker=f"w{i}") for i in range(4)]
    link = target("app", T0 + 13.0, 5.0, worker="w0", deps=[o.name for o in objs])
    s = session(0, 18.0, start=T0, targets=[*objs, link])
    cp = critical_path(s)
    assert cp.basis == "dependencies" and cp.label == "derived from dependencies"
    assert [(step.name, step.via) for step in cp.steps] == [("o3", "root"), ("app", "dep")]
    rep = TelemetryAnalyzer().report([s])
    assert rep.bottlenecks is not None and rep.bottlenecks.with_dependencies == 1
    assert "Latest critical path, derived from dependencies (" in summary(rep)


def test_make_j2_with_dependencies_counts_its_lane_links() -> None:
    # With two lanes the second pair of objects also waited for its worker: that link is lane order.
    cp = critical_path(_make_j2(deps=True)[0])
    assert cp.label == "derived from dependencies (1 of 2 links by lane order or timing)"


def test_a_path_partly_by_lane_order_counts_those_links() -> None:
    # "b" declares a dependency; "c" declares none and follows "b" on the same worker.
    ts = [target("a", T0, 5.0, worker="w0"), target("b", T0 + 5, 5.0, worker="w0", deps=["a"]),
          target("c", T0 + 10, 5.0, worker="w0")]
    cp = critical_path(session(0, 15.0, start=T0, targets=ts))
    assert cp.basis == "dependencies"
    assert cp.label == "derived from dependencies (1 of 2 links by lane order or timing)"


def test_mixed_sessions_are_counted_in_the_bottleneck_header() -> None:
    sessions = [*_make_j2(deps=True), session(1, 25.0, start=T0 + 100, targets=_make_j2(deps=False)[0].targets)]
    text = summary(TelemetryAnalyzer().report(sessions))
    assert "1 derived from dependencies, the others lane order" in text


def test_reports_written_before_these_fields_still_read() -> None:
    rep = TelemetryAnalyzer().report(_make_j2(deps=False) + _rising([T0 + 100 + 30.0 * k for k in range(5)]))
    doc = json.loads(to_json(rep))
    for trend in [doc["trend"], *(t["trend"] for t in doc["targets"])]:
        for key in ("span_days", "per_day_supported", "rate_basis"):
            del trend[key]
        del trend["per_day"]["x_sd"], trend["per_build"]["x_sd"]
    del doc["bottlenecks"]["with_dependencies"]
    del doc["bottlenecks"]["latest"]["basis"], doc["bottlenecks"]["latest"]["label"]
    old = report_from_json(json.dumps(doc))
    assert old.trend.rate_basis == "none" and not old.trend.per_day_supported
    assert old.bottlenecks is not None and old.bottlenecks.latest is not None
    assert old.bottlenecks.latest.basis == "" and old.bottlenecks.latest.label == ""
    assert msgspec.json.decode(to_json(old))["sessions"] == rep.sessions
    assert "Latest critical path (" in summary(old)  # no label claimed for an old report
