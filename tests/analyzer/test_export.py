"""Each export format read back with ordinary tools gives the report's numbers."""

from __future__ import annotations

import csv
import io
import json

import pytest

from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.export import (
    SESSION_COLUMNS,
    TARGET_COLUMNS,
    report_from_json,
    sessions_csv,
    summary,
    targets_csv,
    to_json,
)
from buildtel.services.analyzer.synthetic import Scenario, generate


@pytest.fixture(scope="module")
def report():
    sessions = generate(Scenario(sessions=60, targets=15, flaky=("//pkg2/lib2:t2",), fail_rate=0.1, seed=4,
                                 branches=("main", "dev")))
    return TelemetryAnalyzer().report(sessions, include_sessions=True)


def test_json_reads_back_with_the_same_numbers(report) -> None:
    doc = json.loads(to_json(report))
    assert doc["version"] == 1
    assert doc["sessions"] == report.sessions
    assert doc["success_rate"] == report.success_rate
    d = doc["duration"]
    assert (d["mean_s"], d["median_s"], d["p90_s"], d["p95_s"], d["stdev_s"]) == (
        report.duration.mean_s, report.duration.median_s, report.duration.p90_s, report.duration.p95_s,
        report.duration.stdev_s)
    assert d["slowest"]["session_id"] == report.duration.slowest.session_id
    assert doc["trend"]["per_build"]["p_value"] == report.trend.per_build.p_value
    assert [t["name"] for t in doc["targets"]] == [t.name for t in report.targets]
    assert [t["median_s"] for t in doc["targets"]] == [t.median_s for t in report.targets]
    assert [t["flaky"] for t in doc["targets"]] == [t.flaky for t in report.targets]
    assert len(doc["session_rows"]) == report.sessions
    assert doc["bottlenecks"]["targets"][0]["what_if"]["saved_s"] == report.bottlenecks.targets[0].what_if.saved_s
    assert report_from_json(to_json(report)) == report


def test_sessions_csv_one_row_per_session(report) -> None:
    rows = list(csv.DictReader(io.StringIO(sessions_csv(report), newline="")))
    assert list(rows[0]) == SESSION_COLUMNS
    assert len(rows) == report.sessions
    for row, s in zip(rows, report.session_rows, strict=True):
        assert row["id"] == s.id
        assert float(row["duration_s"]) == s.duration_s
        assert float(row["start"]) == s.start
        assert row["start_utc"].endswith("Z") and row["start_utc"][:4] == "2026"
        assert row["outcome"] == s.outcome and row["branch"] == s.branch and row["commit"] == s.commit
        assert int(row["targets"]) == s.targets and int(row["failed_targets"]) == s.failed_targets
        assert float(row["cache_hit_rate"]) == s.cache_hit_rate
    durs = [float(r["duration_s"]) for r in rows if r["outcome"] != "abandoned"]
    assert sum(durs) / len(durs) == pytest.approx(report.duration.mean_s)


def test_targets_csv_one_row_per_target(report) -> None:
    rows = list(csv.DictReader(io.StringIO(targets_csv(report), newline="")))
    assert list(rows[0]) == TARGET_COLUMNS
    assert [r["name"] for r in rows] == [t.name for t in report.targets]
    for row, t in zip(rows, report.targets, strict=True):
        assert int(row["runs"]) == t.runs and int(row["failures"]) == t.failures
        for col in ("total_s", "mean_s", "median_s", "p95_s", "stdev_s", "cache_hit_rate", "share_of_total"):
            assert float(row[col]) == getattr(t, col), col
        assert row["flaky"] == ("true" if t.flaky else "false")
        assert float(row["trend_s_per_build"]) == t.trend.per_build.slope
    crit = {b.name for b in report.bottlenecks.targets}
    assert {r["name"] for r in rows if r["critical_s"]} == crit


def test_summary_names_the_figures(report) -> None:
    text = summary(report)
    assert f"Builds: {report.sessions}" in text
    assert f"success rate {report.success_rate * 100:.1f}%" in text
    assert "//pkg2/lib2:t2" in text and "Flaky targets:" in text
    assert "Bottlenecks" in text and "saves" in text
    assert report.duration.slowest.session_id in text
    assert summary(TelemetryAnalyzer().report([])) == "No sessions match.\n"
