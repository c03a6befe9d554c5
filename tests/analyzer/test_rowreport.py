"""The report from storage's report rows equals the report from whole sessions, figure for figure.

Pure: the rows are built by the storage side's ``PageBuilder`` from the stored bytes, in pages
newest first as the ``columns`` endpoint sends them, and assembled by the analyzer's
``FrameBuilder``; the end-to-end path (services, NATS) is in ``test_report_storage.py``.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from buildtel.services.analyzer.analytics import AnalyticsReport, ReportFilter, TelemetryAnalyzer, select
from buildtel.services.analyzer.rowreport import FrameBuilder, report_from_frame
from buildtel.services.analyzer.synthetic import Scenario, generate
from buildtel.services.storage.columns import ColumnsRequest, reply_decoder
from buildtel.services.storage.pages import PageBuilder
from buildtel.shared.protocol import BuildSession, Completeness, HealthCheckpoint


def _history(n: int = 240, targets: int = 30, seed: int = 3) -> list[BuildSession]:
    """Synthetic sessions with everything a report reads: failures, a flaky target, skipped and
    cancelled targets (with and without totals that say so), incomplete, abandoned, cancelled and
    unknown sessions,
    health checkpoints, two branches and two build names."""
    ss = generate(Scenario(sessions=n, targets=targets, seed=seed, flaky=("//pkg5/lib5:t5",), fail_rate=0.1,
                           branches=("main", "dev")))
    rng = random.Random(seed)
    out = []
    for i, s in enumerate(ss):
        kw: dict[str, object] = {"name": "nightly" if i % 4 == 0 else "ci"}
        if i % 7 == 0:
            kw["health"] = HealthCheckpoint(session_id=s.id, agent_id="a", seq=1, ts=s.start,
                                            status=rng.choice(["healthy", "degraded", "critical"]),
                                            utilisation=rng.random(), throughput=3 * rng.random(),
                                            memory_percent=100 * rng.random(), reasons=[f"queue {i} deep"])
        if i % 11 == 0:
            kw["completeness"] = Completeness(complete=False, reasons=["lost events"])
        if i % 17 == 0:
            kw["outcome"] = "abandoned"
        elif i % 19 == 0:
            kw["outcome"], kw["exit_code"] = "cancelled", 130
        elif i % 23 == 0:
            kw["outcome"], kw["exit_code"] = "unknown", None
        if i % 13 == 0:
            ts = list(s.targets)
            ts[2] = msgspec.structs.replace(ts[2], status="skipped")
            ts[3] = msgspec.structs.replace(ts[3], status="cancelled")
            kw["targets"] = ts
            if i % 26 == 0:  # totals that say so; the others vouch "all succeeded" and are believed
                kw["totals"] = msgspec.structs.replace(s.totals, skipped=1, cancelled=1, succeeded=len(ts) - 2)
        out.append(msgspec.structs.replace(s, **kw))
    return out


def _via_rows(an: TelemetryAnalyzer, sessions: list[BuildSession], f: ReportFilter, page_rows: int,
              **kw: object) -> AnalyticsReport:
    """What the analyzer computes from storage's pages of rows (``page_rows`` sessions a page)."""
    raws = {s.id: msgspec.msgpack.encode(s) for s in sessions}
    newest_first = sorted(sessions, key=lambda s: (s.finish, s.id), reverse=True)
    req = ColumnsRequest(since=f.since, until=f.until, branch=f.branch, outcome=f.outcome, name=f.name,
                         target=f.target)
    frames = FrameBuilder()
    page = PageBuilder(req)
    taken = 0
    for s in newest_first if f.last != 0 else []:
        if f.outcome is not None and s.outcome != f.outcome:
            continue  # storage's index filter
        if page.add(raws[s.id]) is not None:
            taken += 1
        if len(page.rows) == page_rows:
            frames.add(reply_decoder.decode(page.encode(None)))
            page = PageBuilder(req)
        if f.last is not None and taken == f.last:
            break
    frames.add(reply_decoder.decode(page.encode(None)))
    fr = frames.frame()
    by_id = {s.id: s for s in sessions}
    return report_from_frame(an, fr, filters=f, recent=[by_id[i] for i in fr.recent_ids(an.critical_paths)],
                             **kw)  # type: ignore[arg-type]


FILTERS = [ReportFilter(), ReportFilter(last=50), ReportFilter(branch="dev"), ReportFilter(outcome="failed"),
           ReportFilter(name="nightly", last=30), ReportFilter(target="//pkg5/lib5:t5", last=100),
           ReportFilter(last=0), ReportFilter(branch="nope"), ReportFilter(outcome="unknown")]


@pytest.mark.parametrize("engine", ["numpy", "python"])
@pytest.mark.parametrize("f", FILTERS, ids=lambda f: repr(msgspec.to_builtins(f)))
def test_rows_give_the_same_report_as_sessions(engine: str, f: ReportFilter) -> None:
    sessions = _history()
    an = TelemetryAnalyzer(engine=engine)
    old = an.report(sessions, filters=f, include_sessions=True)
    new = _via_rows(an, sessions, f, page_rows=37, include_sessions=True)
    old.generated_at = new.generated_at = 0.0
    assert msgspec.to_builtins(new) == msgspec.to_builtins(old)
    if f == ReportFilter():  # the history exercises what it is meant to
        assert old.incomplete and old.abandoned and old.health and old.health.with_health
        assert old.cancelled and old.unknown
        assert any(t.flaky for t in old.targets) and old.bottlenecks is not None


def test_top_targets_and_no_critical_paths() -> None:
    sessions = _history(n=60)
    an = TelemetryAnalyzer(critical_paths=0)
    old = an.report(sessions, top_targets=5)
    new = _via_rows(an, sessions, ReportFilter(), page_rows=1000, top_targets=5)
    old.generated_at = new.generated_at = 0.0
    assert msgspec.to_builtins(new) == msgspec.to_builtins(old) and len(new.targets) == 5


def test_old_map_encoded_targets_are_read() -> None:
    """Records written before TargetMetrics was array_like hold targets as maps: their rows are the same."""
    s = select(_history(n=3, targets=5), ReportFilter())[0]
    as_map = msgspec.to_builtins(s)
    names = ("name", "start", "end", "duration_s", "status", "cache")
    as_map["targets"] = [dict(zip(names, t[:6], strict=True)) for t in as_map["targets"]]
    b_new, b_old = PageBuilder(ColumnsRequest()), PageBuilder(ColumnsRequest())
    b_new.add(msgspec.msgpack.encode(s))
    b_old.add(msgspec.msgpack.encode(as_map))
    assert b_old.encode(None) == b_new.encode(None)
