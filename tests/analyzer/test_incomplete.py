"""The analyzer and reports keep incomplete builds out of whole-build figures (real NATS/Redis)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import msgspec
import pytest

from buildtel.services.analyzer.alerts import decode_state, series_points
from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.export import summary
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.shared.protocol import BuildSession, Completeness, LostEvents
from buildtel.shared.settings import Settings
from tests.analyzer.helpers import T0, session, target

LOST = Completeness(complete=False, expected={"a": 40}, received={"a": 20},
                    lost=[LostEvents(agent_id="a", events=20, code="unknown_version", reason="batch refused whole")],
                    reasons=["agent a: 20 event(s) refused, unknown_version: batch refused whole"])


def _history(seed: int, incomplete_after: int | None) -> list[BuildSession]:
    """40 builds of ~100 s, then 20 of ~200 s; the slow ones incomplete when ``incomplete_after``."""
    rng = random.Random(seed)
    out = []
    for k in range(60):
        s = session(k, (100.0 if k < 40 else 200.0) * rng.gauss(1, 0.01),
                    targets=[target("//svc:build", T0 + 3600 * k, 2.0 * rng.gauss(1, 0.01))])
        if incomplete_after is not None and k >= incomplete_after:
            s = msgspec.structs.replace(s, completeness=LOST)
        out.append(s)
    return out


@pytest.fixture
async def analyzer(settings: Settings, nc, redis_client) -> AsyncIterator[AnalyzerService]:
    svc = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


async def test_incomplete_builds_raise_no_build_alert(analyzer, redis_client) -> None:
    alerts = [a for s in _history(1, incomplete_after=40) for a in await analyzer.fold_session(s)]
    assert [a for a in alerts if a.kind == "build"] == []
    state = decode_state(await redis_client.hget(analyzer._series_key("build|main"), "s"))
    assert state.n == 40  # the 20 incomplete builds never reached the series
    # Their targets that did arrive still feed the target series (whole measurements).
    target_state = decode_state(await redis_client.hget(analyzer._series_key("target|main|//svc:build"), "s"))
    assert target_state.n == 60


async def test_the_same_builds_complete_do_raise_the_alert(analyzer) -> None:
    # The control: without the completeness record the step is a regression.
    alerts = [a for s in _history(1, incomplete_after=None) for a in await analyzer.fold_session(s)]
    builds = [a for a in alerts if a.kind == "build"]
    assert len(builds) == 1 and builds[0].direction == "regression"


def test_reports_count_incomplete_sessions_separately() -> None:
    sessions = _history(2, incomplete_after=55)
    rep = TelemetryAnalyzer().report(sessions, include_sessions=True)
    assert rep.sessions == 60 and rep.succeeded == 60 and rep.incomplete == 5
    assert rep.duration.n == 55  # build-time figures use the complete ones only
    assert [r.complete for r in rep.session_rows] == [True] * 55 + [False] * 5
    assert "5 INCOMPLETE (lost events; left out of build times)" in summary(rep)
    # Old sessions (no record) read as complete.
    assert series_points(sessions[0])[0].kind == "build" and sessions[0].completeness is None
    assert not any(p.kind == "build" for p in series_points(sessions[-1]))
