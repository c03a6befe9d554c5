"""Cancelled and unknown builds in a report: counted on their own, in neither the success rate nor
the build-time figures (docs/analytics.md), and named in ``buildtel report``'s summary."""

from __future__ import annotations

import msgspec

from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.export import summary
from buildtel.services.analyzer.synthetic import Scenario, generate


def test_cancelled_and_unknown_are_neither_successes_nor_build_times() -> None:
    base = generate(Scenario(sessions=40, targets=5, seed=1, fail_rate=0.0))
    assert all(s.outcome == "success" for s in base)
    # The 10 cancelled/unknown builds are the shortest: counted as successes they would move the figures.
    ss = [msgspec.structs.replace(s, outcome="cancelled" if i % 8 == 0 else "unknown", duration_s=0.5,
                                  finish=s.start + 0.5) if i % 4 == 0 else s for i, s in enumerate(base)]
    for i in (1, 2, 3):
        ss[i] = msgspec.structs.replace(ss[i], outcome="failed", exit_code=1)
    rep = TelemetryAnalyzer().report(ss)
    assert (rep.sessions, rep.succeeded, rep.failed, rep.abandoned, rep.cancelled, rep.unknown) == (40, 27, 3, 0, 5, 5)
    assert rep.success_rate == 27 / 30
    assert rep.duration.n == 30 and rep.duration.min_s > 0.5
    assert sum(p.succeeded for p in rep.daily) == 27
    assert sum(p.sessions for p in rep.daily) == 40
    text = summary(rep)
    assert "27 succeeded, 3 failed, 0 abandoned (success rate 90.0%); 5 cancelled, 5 unknown" in text

