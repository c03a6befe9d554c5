"""Property: whatever sessions are appended, in whatever batches (repeats included), with
reopens in between and any segment size, a reopened store holds exactly that set, each
session byte-for-byte equal to what was appended, and queries agree with a plain filter."""

from __future__ import annotations

import asyncio
import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.protocol import BuildSession, TargetMetrics, new_session_id

NOW = time.time()

session_params = st.fixed_dictionaries({
    "finish": st.floats(NOW - 80 * 86400, NOW, allow_nan=False),
    "outcome": st.sampled_from(["success", "failed", "abandoned"]),
    "branch": st.sampled_from([None, "main", "dev", "release/1.x"]),
    "targets": st.lists(st.sampled_from(["//a:x", "//a:y", "//b:z", "//c:ü", ":t"]), max_size=4, unique=True),
    "agents": st.lists(st.sampled_from(["a1", "a2", "a3"]), max_size=3, unique=True),
    "name": st.text(max_size=30),
    "labels": st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=3),
})


def make(p: dict) -> BuildSession:
    from buildtel.shared.protocol import BuildEnvironment, VcsInfo

    env = BuildEnvironment(vcs=VcsInfo(branch=p["branch"])) if p["branch"] else None
    return BuildSession(
        id=new_session_id(), name=p["name"], start=p["finish"] - 5, finish=p["finish"], outcome=p["outcome"],
        agents=p["agents"], labels=p["labels"], environment=env,
        targets=[TargetMetrics(name=t, start=0.0, end=1.0, duration_s=1.0) for t in p["targets"]],
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    params=st.lists(session_params, min_size=1, max_size=25),
    data=st.data(),
    segment_bytes=st.sampled_from([600, 2048, 1 << 20]),
)
def test_appended_sessions_survive_reopen(params: list[dict], data: st.DataObject, segment_bytes: int) -> None:
    pool = [make(p) for p in params]
    batches = data.draw(st.lists(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=8), max_size=8))
    reopen_before = data.draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches)))
    asyncio.run(_scenario(pool, batches, reopen_before, segment_bytes))


async def _scenario(pool: list[BuildSession], batches: list[list[int]], reopen_before: list[bool],
                    segment_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = TelemetryStorage(d, fsync=False, segment_bytes=segment_bytes)
        await store.open()
        appended: dict[str, BuildSession] = {}
        for batch, reopen in zip(batches, reopen_before, strict=True):
            if reopen:
                await store.close()
                store = TelemetryStorage(d, fsync=False, segment_bytes=segment_bytes)
                await store.open()
            sessions = [pool[i] for i in batch]
            flags = await store.append_many(sessions)
            expected = []
            for s in sessions:
                expected.append(s.id not in appended)
                appended.setdefault(s.id, s)
            assert flags == expected
        await store.close()

        store = TelemetryStorage(d, fsync=False, segment_bytes=segment_bytes)
        report = await store.open()
        try:
            assert report.ok and report.superseded == 0
            assert await store.count() == len(appended)
            for sid, s in appended.items():
                assert await store.get(sid) == s
            newest_first = sorted(appended.values(), key=lambda s: (s.finish, s.id), reverse=True)
            assert [s.id for s in await store.recent(100)] == [s.id for s in newest_first]
            for outcome in ("success", "failed"):
                got = [s.id for s in await store.query(outcome=outcome, limit=100)]
                assert got == [s.id for s in newest_first if s.outcome == outcome]
            got = [s.id for s in await store.query(target="//a:x", branch="main", limit=100)]
            assert got == [s.id for s in newest_first if any(t.name == "//a:x" for t in s.targets)
                           and s.environment is not None and s.environment.vcs.branch == "main"]
        finally:
            await store.close()
