"""Regression alerts on known series: a step is caught once, a spike is not, an improvement is labelled."""

from __future__ import annotations

import random

import pytest

from buildtel.services.analyzer.alerts import Alert, alert_id, decode_state, fold, series_points
from buildtel.services.analyzer.regression import find_changes
from buildtel.services.analyzer.subjects import AnalyzerSubjects, token
from tests.analyzer.helpers import T0, session, target


def _run(sessions) -> list[Alert]:
    states: dict[str, bytes] = {}
    out = []
    for s in sessions:
        for p in series_points(s):
            states[p.series], a, _ = fold(states.get(p.series), p, s, now=1.0)
            if a is not None:
                out.append(a)
    return out


def _builds(levels: list[float], seed: int = 1, noise: float = 0.01, branch: str = "main") -> list:
    rng = random.Random(seed)
    return [session(k, v * rng.gauss(1.0, noise), branch=branch) for k, v in enumerate(levels)]


def test_a_step_is_caught_once_and_names_its_sessions_and_commits() -> None:
    sessions = _builds([100.0] * 40 + [130.0] * 25)
    alerts = _run(sessions)
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.kind, a.direction, a.series, a.branch, a.target) == ("build", "regression", "build|main", "main", None)
    # The alert names the session at the detector's own change index (which the detector may put
    # a build late on a noisy step) and the one just before it.
    [cp] = find_changes([s.duration_s for s in sessions])
    k = cp.index
    assert k in (40, 41)
    assert a.first_session_id == sessions[k].id
    assert a.last_good_session_id == sessions[k - 1].id
    assert a.commit_range == f"{sessions[k - 1].environment.vcs.commit}..{sessions[k].environment.vcs.commit}"
    assert a.before_median_s == pytest.approx(100, rel=0.02)
    assert a.after_median_s == pytest.approx(130, rel=0.02)
    assert a.change_pct == pytest.approx(30, abs=3)
    assert 0.9 < a.confidence <= 1.0
    assert a.id == alert_id(a.detected_session_id, "build|main")
    assert sessions.index(next(s for s in sessions if s.id == a.detected_session_id)) >= 41


def test_a_spike_is_not_an_alert() -> None:
    levels = [100.0] * 60
    levels[30] = 300.0
    levels[45] = 20.0
    assert _run(_builds(levels)) == []


def test_an_improvement_is_labelled() -> None:
    [a] = _run(_builds([100.0] * 40 + [70.0] * 25, seed=3))
    assert a.direction == "improvement"
    assert a.change_pct == pytest.approx(-30, abs=3)
    assert a.first_session_id == f"{40:032x}"


def test_branches_are_separate_series() -> None:
    main = _builds([100.0] * 60, seed=4)
    dev = [session(100 + k, v, branch="dev") for k, v in
           enumerate(x.duration_s * (1.4 if k >= 30 else 1.0) for k, x in enumerate(_builds([100.0] * 60, seed=5)))]
    interleaved = [s for pair in zip(main, dev, strict=True) for s in pair]
    [a] = _run(interleaved)
    assert a.branch == "dev" and a.series == "build|dev"
    assert a.first_session_id == dev[30].id


def test_target_alert_compares_like_with_like() -> None:
    """A target whose executed (cache miss) runs got 2x slower while cache hits stayed put."""
    rng = random.Random(7)
    sessions = []
    for k in range(90):
        hit = rng.random() < 0.5
        base = 0.05 if hit else (2.0 if k < 50 else 4.0)
        sessions.append(session(k, 50.0 * rng.gauss(1, 0.005), targets=[
            target("//app:server", T0 + 3600 * k, base * rng.gauss(1, 0.02), cache="remote_hit" if hit else "miss")]))
    alerts = [a for a in _run(sessions) if a.kind == "target"]
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.target, a.cache, a.direction) == ("//app:server", "miss", "regression")
    assert a.after_median_s / a.before_median_s == pytest.approx(2.0, rel=0.05)
    first = next(i for i, s in enumerate(sessions) if s.id == a.first_session_id)
    assert first >= 50 and sessions[first].targets[0].cache == "miss"
    assert all(s.targets[0].cache != "miss" for s in sessions[50:first])


def test_series_points_skip_failed_builds_and_targets() -> None:
    s = session(1, 10, outcome="failed", targets=[target("//a", T0, 1, status="failed"),
                                                   target("//b", T0, 1, cache="local_hit"),
                                                   target("//c", T0, 0.0)])
    pts = series_points(s)
    assert [p.series for p in pts] == ["target|main|//b"]
    assert pts[0].cached is True
    assert series_points(session(2, 10, branch=None))[0].series == "build|_"


def test_state_round_trips_and_counts_points() -> None:
    states: dict[str, bytes] = {}
    for s in _builds([10.0] * 5):
        for p in series_points(s):
            states[p.series], _, _ = fold(states.get(p.series), p, s, now=0.0)
    st = decode_state(states["build|main"])
    assert st.n == 5 and st.last_sid == f"{4:032x}" and [e.i for e in st.ring] == [0, 1, 2, 3, 4]


def test_alert_subjects_and_tokens() -> None:
    subj = AnalyzerSubjects.of("bt")
    assert subj.alert("target", "feature/x.y", "//pkg:a b") == "bt.alerts.target.feature/x_y.//pkg:a_b"
    assert subj.alert("build", None, None) == "bt.alerts.build._._"
    assert subj.alerts_filter(branch="main") == "bt.alerts.*.main.*"
    assert subj.alerts_filter(kind="target", target="//a:b") == "bt.alerts.target.*.//a:b"
    assert subj.alerts_stream == "BT_ALERTS"
    assert token("a*b>c\td") == "a_b_c_d"


def test_unreadable_state_starts_the_series_afresh() -> None:
    s = session(1, 10.0)
    [p] = series_points(s)
    state, alert, late = fold(b"\xc1garbage", p, s, now=0.0)
    assert decode_state(state).n == 1 and alert is None and not late
