"""Load-robust detection and explained alerts on hand-built histories, folded as the service folds
them (states per series, the build judged from its targets' states first)."""

from __future__ import annotations

import random

import pytest

from buildtel.services.analyzer.alerts import Alert, fold, history, series_points
from buildtel.services.analyzer.explain import NO_CODE_CHANGE, explain, lines
from buildtel.services.analyzer.hostload import judge
from buildtel.shared.protocol import BuildEnvironment, BuildSession, VcsInfo
from tests.analyzer.helpers import T0, session, target

NAMES = [f"//app:t{i}" for i in range(6)]


def _build(k: int, durs: dict[str, float], *, host: str = "agent-1", cpu: dict[str, float] | None = None,
           commit: str | None = None, env: dict[str, str] | None = None, outside: float = 0.0) -> BuildSession:
    """A serial build of the targets (one worker) after ``outside`` seconds of start-up, so its
    wall time is their sum plus that."""
    start, ts = T0 + 3600 * k, []
    t = start + outside
    for name in NAMES:
        m = target(name, t, durs[name], worker="w1")
        if cpu is not None:
            m.cpu_s = cpu[name]
        ts.append(m)
        t += durs[name]
    s = session(k, t - start, targets=ts, commit=commit)
    s.environment = BuildEnvironment(hostname=host, cpus=2, env=env or {},
                                     vcs=VcsInfo(commit=commit or f"c{k:039x}", branch="main"))
    return s


def _run(sessions: list[BuildSession]) -> list[Alert]:
    states: dict[str, bytes] = {}
    out = []
    for s in sessions:
        pts = {p.series: p for p in series_points(s)}
        j = judge(s, history({n: states.get(n) for n in pts}, pts, s.id))
        for name, p in pts.items():
            states[name], a, _ = fold(states.get(name), p, s, now=1.0, judgement=j)
            if a is not None:
                out.append(a)
    return out


def _history(load: float, slow: dict[str, float] | None = None, *, seed: int = 1, n_before: int = 12,
             n_after: int = 8, cpu_grows: bool = False, outside: float = 0.0, outside_load: float = 1.0
             ) -> list[BuildSession]:
    rng = random.Random(seed)
    out = []
    for k in range(n_before + n_after):
        after = k >= n_before
        durs = {n: 1.0 * rng.gauss(1, 0.03) * (load if after else 1.0) + ((slow or {}).get(n, 0.0) if after else 0.0)
                for n in NAMES}
        # CPU time: the work done; unchanged by load unless the work itself grew.
        cpu = {n: 0.95 * (load if after and cpu_grows else 1.0) for n in NAMES}
        out.append(_build(k, durs, cpu=cpu, outside=outside * (outside_load if after else 1.0)))
    return out


def test_a_loaded_machine_is_one_host_event_not_target_alerts() -> None:
    alerts = _run(_history(load=1.8))
    assert [(a.kind, a.host) for a in alerts] == [("host", "agent-1")]
    [h] = alerts
    assert h.explanation is not None and h.explanation.host_slowdown is not None
    ev = h.explanation.host_slowdown
    assert ev.factor == pytest.approx(1.8, rel=0.1) and ev.slower_share == 1.0 and ev.judged == 6
    assert ev.cpu_ratio == pytest.approx(1.0) and ev.cpus == 2
    assert h.first_session_id == f"{12:032x}" and h.last_good_session_id == f"{11:032x}"


def test_without_judgement_the_same_load_raises_target_alerts() -> None:
    """The control: folding without the host judgement, the load alone alerts on every target."""
    states: dict[str, bytes] = {}
    kinds = []
    for s in _history(load=1.8):
        for p in series_points(s):
            states[p.series], a, _ = fold(states.get(p.series), p, s, now=1.0)
            if a is not None:
                kinds.append(a.kind)
    assert kinds.count("target") == len(NAMES)


def test_start_up_slowed_more_than_the_targets_is_still_the_machine() -> None:
    """The build's time outside its targets (tool start-up, probes) slowed 4x while the targets
    slowed 1.8x: while the machine is busy that part is taken at its usual value."""
    alerts = _run(_history(load=1.8, outside=1.0, outside_load=4.0))
    assert [a.kind for a in alerts] == ["host"]


def test_one_slower_target_under_load_is_one_target_alert_and_a_build_alert_naming_it() -> None:
    # A long slowdown: the target's new level must not become the baseline the load is taken off.
    alerts = _run(_history(load=1.8, slow={"//app:t3": 3.0}, n_after=25))
    targets = [a for a in alerts if a.kind == "target"]
    assert [a.target for a in targets] == ["//app:t3"]
    assert targets[0].direction == "regression"
    assert [a.kind for a in alerts].count("host") == 1
    [b] = [a for a in alerts if a.kind == "build"]
    assert b.direction == "regression"


def test_more_work_in_every_target_is_not_a_host_slowdown() -> None:
    """CPU time rose with wall time: the targets did more work (a compiler flag), so they alert."""
    alerts = _run(_history(load=1.8, cpu_grows=True))
    assert "host" not in [a.kind for a in alerts]
    assert sorted(a.target for a in alerts if a.kind == "target") == NAMES


def test_explanation_culprits_path_and_no_code_change() -> None:
    base = {n: 1.0 for n in NAMES}
    good = _build(1, base, commit="a" * 40, env={"CFLAGS": "-O2", "PATH": "/bin"})
    bad = _build(2, {**base, "//app:t3": 3.0, "//app:t5": 1.5}, commit="a" * 40,
                 env={"CFLAGS": "-O2", "PATH": "/bin", "EXTRA_SLEEP": "2"})
    bad.environment.tool_versions = {"gcc": "gcc 13.2"}  # type: ignore[union-attr]
    good.environment.tool_versions = {"gcc": "gcc 12.1"}  # type: ignore[union-attr]
    e = explain(good, bad)
    assert e.code_change is False and NO_CODE_CHANGE in e.summary
    assert [(c.target, round(c.share, 2)) for c in e.culprits] == [("//app:t3", 0.8), ("//app:t5", 0.2)]
    assert e.culprits[0].added_s == pytest.approx(2.0) and e.culprits[0].on_critical_path
    assert e.added_s == pytest.approx(2.5)
    assert {(d.what, d.key, d.before, d.after) for d in e.differences} == {
        ("env", "EXTRA_SLEEP", None, "2"), ("tool", "gcc", "gcc 12.1", "gcc 13.2")}
    text = "\n".join(lines(e))
    assert "culprit //app:t3: 1.00s -> 3.00s (+2.00s, 80% of the added time)" in text
    assert NO_CODE_CHANGE in text and "EXTRA_SLEEP: (unset) -> 2" in text


def test_explanation_names_the_critical_path_shift() -> None:
    # Two lanes: t0 -> t1 on w1 and t2 on w2; the path is the longer lane, and moves when t2 grows.
    def b(k: int, t2: float) -> BuildSession:
        ts = [target("//a:t0", T0, 1.0, worker="w1"), target("//a:t1", T0 + 1, 1.0, worker="w1"),
              target("//a:t2", T0, t2, worker="w2")]
        return session(k, max(2.0, t2), start=T0, targets=ts, commit=f"{k}" * 40)
    e = explain(b(1, 1.5), b(2, 4.0))
    assert e.code_change is True and NO_CODE_CHANGE not in e.summary
    assert e.critical_path is not None and e.critical_path.moved
    assert e.critical_path.entered == ["//a:t2"] and e.critical_path.left == ["//a:t0", "//a:t1"]
    assert [c.target for c in e.culprits] == ["//a:t2"] and e.culprits[0].share == 1.0


def test_explanation_without_the_builds_says_why() -> None:
    e = explain(None, None, notes=["build x is no longer in storage"])
    assert e.summary == "build x is no longer in storage" and e.code_change is None and not e.culprits


def test_a_lull_in_the_load_is_the_same_slowdown_and_three_normal_builds_end_it() -> None:
    """Loaded, one build in a lull, loaded again: one host event.  Then three normal builds end
    the episode, and the next load is a new one."""
    rng = random.Random(3)
    loads = [1.0] * 12 + [1.8, 1.8, 1.0, 1.8, 1.8] + [1.0, 1.0, 1.0] + [1.8, 1.8]
    builds = [_build(k, {n: rng.gauss(1, 0.03) * load for n in NAMES}, cpu=dict.fromkeys(NAMES, 0.95))
              for k, load in enumerate(loads)]
    hosts = [a for a in _run(builds) if a.kind == "host"]
    assert [a.first_session_id for a in hosts] == [f"{12:032x}", f"{20:032x}"]
    assert hosts[1].last_good_session_id == f"{19:032x}"
