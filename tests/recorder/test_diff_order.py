"""``buildtel diff``: timing changes come largest first, whichever direction they moved."""

from __future__ import annotations

from buildtel.shared.protocol import BuildSession, TargetMetrics
from buildtel.shared.recording.diff import diff, render, side_from_session


def _session(sid: str, durations: dict[str, float]) -> BuildSession:
    return BuildSession(id=sid, targets=[TargetMetrics(name=n, start=0.0, end=d, duration_s=d)
                                         for n, d in durations.items()])


def test_timing_changes_are_sorted_by_size_of_change() -> None:
    a = _session("a" * 32, {"//a:small": 1.0, "//b:faster": 9.0, "//c:big": 2.0, "//d:same": 4.0, "//e:tie": 1.0})
    b = _session("b" * 32, {"//a:small": 1.5, "//b:faster": 4.0, "//c:big": 10.0, "//d:same": 4.0, "//e:tie": 1.5})
    d = diff(side_from_session(a), side_from_session(b))
    assert [(t["target"], t["delta_s"]) for t in d["targets"]["timing"]] == [
        ("//c:big", 8.0), ("//b:faster", -5.0), ("//a:small", 0.5), ("//e:tie", 0.5)]
    text = render(d)
    assert text.index("//c:big") < text.index("//b:faster") < text.index("//a:small")
