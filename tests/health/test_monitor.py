"""Health rules, checkpoint figures and cross-build trends: pure logic, no bus."""

from __future__ import annotations

import pytest

from buildtel.shared.health import HealthMonitor, HealthRules, evaluate, health_trends
from buildtel.shared.protocol import BuildSession, HealthCheckpoint


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_healthy_when_nothing_fires() -> None:
    assert evaluate({"completed_tasks": 10, "active_tasks": 2, "memory_percent": 50.0}, stalled_s=3.0) == (
        "healthy", [])


@pytest.mark.parametrize(("done", "failed", "status"), [
    (1, 1, "degraded"),  # one failure among few tasks: not yet a rate
    (3, 3, "degraded"),
    (4, 1, "critical"),  # 25 % of at least 4
    (100, 24, "degraded"),
    (100, 25, "critical"),
])
def test_failure_rate_rule(done: int, failed: int, status: str) -> None:
    got, reasons = evaluate({"completed_tasks": done, "failed_tasks": failed}, stalled_s=None)
    assert got == status
    assert reasons == [f"{failed} of {done} finished tasks failed ({failed / done:.0%})"]


def test_stall_rule_only_with_work_in_flight_and_task_tracking() -> None:
    busy = {"active_tasks": 1}
    assert evaluate(busy, stalled_s=119.0)[0] == "healthy"
    assert evaluate(busy, stalled_s=120.0) == ("degraded", ["no task finished for 120s while 1 run"])
    assert evaluate(busy, stalled_s=600.0)[0] == "critical"
    assert evaluate({"pending_tasks": 5}, stalled_s=700.0)[0] == "critical"
    assert evaluate({}, stalled_s=700.0)[0] == "healthy"  # idle: nothing to be stalled
    assert evaluate(busy, stalled_s=None)[0] == "healthy"  # a plain command: progress not measured


def test_memory_rule_and_the_worst_rule_wins() -> None:
    assert evaluate({"memory_percent": 90.0}, stalled_s=None) == ("degraded", ["host memory 90% in use"])
    assert evaluate({"memory_percent": 97.5}, stalled_s=None)[0] == "critical"
    status, reasons = evaluate({"memory_percent": 98.0, "completed_tasks": 10, "failed_tasks": 1,
                                "active_tasks": 1}, stalled_s=130.0)
    assert status == "critical" and len(reasons) == 3
    lenient = HealthRules(memory_degraded_percent=99.0, memory_critical_percent=99.5)
    assert evaluate({"memory_percent": 98.0}, stalled_s=None, rules=lenient)[0] == "healthy"


def test_checkpoint_figures_velocity_throughput_utilisation() -> None:
    clock = Clock()
    mon = HealthMonitor(interval_s=5.0, worker_count=4, clock=clock)
    for i in range(4):
        mon.task_started(i)
    clock.t += 2.0
    mon.task_finished(0)
    mon.task_finished(1, failed=True)
    clock.t += 3.0  # 5 s in: 2 done in the window
    cp = mon.checkpoint()
    assert (cp["completed_tasks"], cp["failed_tasks"], cp["active_tasks"], cp["active_workers"]) == (2, 1, 2, 2)
    assert cp["velocity"] == pytest.approx(0.4) and cp["throughput"] == pytest.approx(0.4)
    assert cp["utilisation"] == pytest.approx(0.5)
    assert (cp["pending_tasks"], cp["eta_s"]) == (0, None)  # total unknown
    assert cp["status"] == "degraded"
    clock.t += 5.0  # nothing finished in the last interval
    cp = mon.checkpoint()
    assert cp["velocity"] == 0.0 and cp["throughput"] == pytest.approx(0.2)
    assert mon.due() is False
    clock.t += 5.0
    assert mon.due() is True


def test_a_final_checkpoint_right_after_another_is_not_a_velocity_spike() -> None:
    clock = Clock()
    mon = HealthMonitor(interval_s=5.0, clock=clock)
    for i in range(10):
        clock.t += 0.5
        mon.task_started(i)
        mon.task_finished(i)
    mon.checkpoint()
    clock.t += 0.01
    mon.task_started("last")
    mon.task_finished("last")
    cp = mon.checkpoint()
    assert cp["velocity"] == pytest.approx(11 / 5.0, rel=0.15)


def test_eta_with_a_known_total_and_running_tasks_counted_elsewhere() -> None:
    clock = Clock()
    mon = HealthMonitor(interval_s=10.0, worker_count=8, total_tasks=100, clock=clock)
    mon.set_active(8)  # e.g. ninja's children
    for i in range(20):
        mon.task_finished(i)
    clock.t += 10.0
    cp = mon.checkpoint()
    assert (cp["active_tasks"], cp["pending_tasks"], cp["utilisation"]) == (8, 72, 1.0)
    assert cp["eta_s"] == pytest.approx((72 + 8) / 2.0)
    mon.set_active(0)
    for i in range(80):
        mon.task_finished(100 + i)
    assert mon.checkpoint()["eta_s"] == 0.0


def test_stall_is_measured_from_the_last_finished_task() -> None:
    clock = Clock()
    mon = HealthMonitor(clock=clock)
    mon.task_started("link")
    clock.t += 130.0
    cp = mon.checkpoint()
    assert cp["status"] == "degraded" and "no task finished for 130s" in cp["reasons"][0]
    mon.task_finished("link")
    assert mon.checkpoint()["status"] == "healthy"
    plain = HealthMonitor(clock=clock)  # a command without task capture never stalls
    clock.t += 1000.0
    assert plain.checkpoint()["status"] == "healthy"


def _session(i: int, status: str | None, util: float = 0.5, thr: float = 10.0,
             reasons: list[str] | None = None) -> BuildSession:
    h = None if status is None else HealthCheckpoint(
        session_id=f"{i:032x}", agent_id="a", seq=0, ts=float(i), status=status, utilisation=util,
        throughput=thr, memory_percent=40.0 + i, reasons=reasons or [])
    return BuildSession(id=f"{i:032x}", start=float(i), finish=float(i) + 1, health=h)


def test_health_trends_across_builds() -> None:
    sessions = [
        _session(3, "degraded", 0.4, 8.0, ["2 of 40 finished tasks failed (5%)"]),
        _session(1, "healthy", 0.8, 12.0),
        _session(2, None),  # imported: no checkpoint
        _session(4, "critical", 0.2, 4.0, ["12 of 40 finished tasks failed (30%)", "host memory 98% in use"]),
        _session(5, "degraded", 0.3, 6.0, ["no task finished for 130s while 1 run"]),
    ]
    t = health_trends(sessions, points=True)
    assert (t.sessions, t.with_health, t.healthy, t.degraded, t.critical) == (5, 4, 1, 2, 1)
    assert t.unhealthy_rate == pytest.approx(0.75)
    assert t.top_reasons[0] == ("N of N finished tasks failed (N%)", 2)
    assert t.mean_utilisation == pytest.approx(0.425) and t.max_memory_percent == 45.0
    assert t.throughput_slope < 0 and t.utilisation_slope < 0  # builds getting slower and less parallel
    assert t.recent_status == ["healthy", "degraded", "critical", "degraded"]
    assert [p.session_id for p in t.points] == [s.id for s in sorted(sessions, key=lambda s: s.start) if s.health]
    assert health_trends([]).with_health == 0
