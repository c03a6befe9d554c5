"""The scale benchmark's history (benchmarks/scale_gen.py): deterministic, valid, varied, resumable."""

from __future__ import annotations

from pathlib import Path

from benchmarks import scale_gen as gen
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.codec import decode_session

SHAPE = gen.HistoryShape(sessions=2000, targets=20, seed=3, t_end=1_780_000_000.0)


def test_sessions_are_deterministic_valid_and_have_what_filters_select() -> None:
    f = gen.Factory(SHAPE)
    assert f.encoded(7) == gen.Factory(SHAPE).encoded(7)
    sessions = [decode_session(f.encoded(k)) for k in range(SHAPE.sessions)]
    assert len({s.id for s in sessions}) == SHAPE.sessions
    assert [s.finish for s in sessions] == sorted(s.finish for s in sessions)
    assert all(s.start <= t.start <= t.end <= s.finish for s in sessions for t in s.targets)
    rare = [s for s in sessions if s.environment and s.environment.vcs and s.environment.vcs.branch == gen.RARE_BRANCH]
    assert len(rare) == 2  # every 1000th build
    assert sum(any(t.name == gen.RARE_TARGET for t in s.targets) for s in sessions) == 2
    outcomes = {o: sum(s.outcome == o for s in sessions) for o in ("success", "failed", "abandoned")}
    assert outcomes["success"] > 1800 and 20 < outcomes["failed"] < 120 and outcomes["abandoned"] < 30
    assert len({a for s in sessions for a in s.agents}) == len(gen.AGENTS)


async def test_build_writes_through_the_store_and_resumes(tmp_path: Path) -> None:
    shape = gen.HistoryShape(sessions=300, targets=5, seed=4, t_end=1_780_000_000.0)
    f = gen.Factory(shape)
    store = TelemetryStorage(tmp_path / "telemetry", max_sessions=300, retention_s=gen.RETENTION_S, fsync=False)
    await store.open()
    await store.append_encoded([f.encoded(k) for k in range(120)])  # an interrupted first run
    await store.close()
    lines: list[str] = []
    fig = await gen.build(tmp_path, gen.BuildFigures(shape=shape), batch=50, progress=lines.append)
    assert fig.complete and fig.appended == 180 and "resuming a partial store: 120" in lines[0]
    gen.write_meta(tmp_path, fig)
    assert gen.read_meta(tmp_path) == fig
    store = TelemetryStorage(tmp_path / "telemetry", max_sessions=300, retention_s=gen.RETENTION_S, fsync=False)
    await store.open()
    try:
        assert await store.count() == 300
        assert [s.id for s in await store.recent(2)] == [f.session_id(299), f.session_id(298)]
    finally:
        await store.close()
