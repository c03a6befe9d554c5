"""Critical paths and what-if estimates on hand-built DAGs, checked against values worked out by hand."""

from __future__ import annotations

import pytest

from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.bottlenecks import bottlenecks, critical_path, what_if
from tests.analyzer.helpers import T0, session, target


def _dag():
    """
    w1: a [0,2]  c [2,3]  ......  d [5,8]
    w2: b [0,5]
    w3:          e [2,3]
    deps: c<-a, e<-a, d<-b,c.  The build finishes at 8.5.
    """
    ts = [target("a", T0 + 0, 2, worker="w1"), target("b", T0 + 0, 5, worker="w2"),
          target("c", T0 + 2, 1, worker="w1", deps=["a"]), target("e", T0 + 2, 1, worker="w3", deps=["a"]),
          target("d", T0 + 5, 3, worker="w1", deps=["b", "c"])]
    return session(0, 8.5, start=T0, targets=ts)


def test_critical_path_follows_the_binding_dependency() -> None:
    cp = critical_path(_dag())
    assert [s.name for s in cp.steps] == ["b", "d"]
    assert [s.via for s in cp.steps] == ["root", "dep"]
    assert cp.path_s == pytest.approx(8.0)
    assert cp.wall_s == pytest.approx(8.5)
    assert cp.wait_s == pytest.approx(0.5)
    assert cp.steps[1].start_s == pytest.approx(5.0) and cp.steps[1].wait_s == pytest.approx(0.0)


@pytest.mark.parametrize(("name", "saved"), [
    ("b", 2.0),  # b ends at 2.5; d then waits for c (3) and ends at 6
    ("d", 1.5),  # d takes 1.5 instead of 3
    ("a", 0.0),  # a, c and e finish earlier, but d still waits for b
    ("c", 0.0),
])
def test_what_if_by_hand(name: str, saved: float) -> None:
    w = what_if([_dag()], name, 50.0)
    assert w.saved_s == pytest.approx(saved)
    assert w.wall_after_s == pytest.approx(8.5 - saved)
    assert w.sessions == 1


def test_lane_and_inferred_predecessors_without_declared_deps() -> None:
    ts = [target("x", T0, 4, worker="w1"), target("y", T0 + 4.2, 1.8, worker="w2"),
          target("z", T0 + 4, 1, worker="w1")]
    cp = critical_path(session(1, 6.0, start=T0, targets=ts))
    assert [s.name for s in cp.steps] == ["x", "y"]
    assert [s.via for s in cp.steps] == ["root", "inferred"]
    assert cp.steps[1].wait_s == pytest.approx(0.2)
    cp2 = critical_path(session(2, 5.0, start=T0, targets=ts[:1] + ts[2:]))
    assert [(s.name, s.via) for s in cp2.steps] == [("x", "root"), ("z", "lane")]
    # Without declared deps y's only constraint is x: 50 % off x saves 2 s of wall time.
    assert what_if([session(1, 6.0, start=T0, targets=ts)], "x", 50).saved_s == pytest.approx(2.0)


def test_bottlenecks_rank_by_critical_time_and_report_shares() -> None:
    sessions = [session(k, 8.5, start=T0 + 100 * k, targets=[
        target(t.name, t.start + 100 * k, t.duration_s, worker=t.worker, deps=t.deps) for t in _dag().targets])
        for k in range(3)]
    b = bottlenecks(sessions, speedup_pct=50, top=3, totals={"b": 15.0, "d": 9.0, "a": 6.0, "c": 3.0, "e": 3.0})
    assert b.sessions_analysed == 3
    assert [x.name for x in b.targets[:2]] == ["b", "d"]
    assert b.targets[0].critical_s == pytest.approx(15.0) and b.targets[0].on_critical_path == 3
    assert b.targets[0].critical_share == pytest.approx(15.0 / 24.0)
    assert b.targets[0].what_if.saved_s == pytest.approx(2.0)
    assert b.targets[0].share_of_total == pytest.approx(15.0 / 36.0)
    assert "a" in {x.name for x in b.targets}  # expensive off the path: listed, saves nothing
    assert b.latest.session_id == sessions[-1].id
    rep = TelemetryAnalyzer(critical_paths=2).report(sessions)
    assert rep.bottlenecks.sessions_analysed == 2 and rep.bottlenecks.targets[0].name == "b"


def test_empty_and_failed_targets() -> None:
    cp = critical_path(session(3, 4.0, start=T0, targets=[]))
    assert cp.steps == [] and cp.wait_s == 4.0
    ts = [target("a", T0, 1, worker="w"), target("s", T0 + 1, 0, worker="w", status="skipped")]
    assert [s.name for s in critical_path(session(4, 1.0, start=T0, targets=ts)).steps] == ["a"]
