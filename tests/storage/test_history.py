"""Trends per day and one target's runs, answered by the storage service from summaries and
report rows: the figures a dashboard charts, checked against the sessions stored."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest

from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.history import (
    DAY,
    TargetHistoryRequest,
    TrendRequest,
    target_history,
    trend,
)
from buildtel.services.storage.service import StorageService
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildSession, TargetMetrics
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.storage.conftest import build_session
from tests.storage.test_storage_service import eventually, publish

DAY0 = (time.time() // 86_400 - 4) * 86_400.0  # the UTC midnight 4 days ago: inside the 90-day retention


def _session(i: int) -> BuildSession:
    """Build i: day i % 3 (day 1 has none: every third build goes to day 2), outcome, branch,
    duration and the run of //pkg:hot vary with i."""
    day = 0 if i % 3 == 0 else 2
    finish = DAY0 + day * DAY + 600 * i
    outcome = "failed" if i % 4 == 0 else ("abandoned" if i == 7 else "success")
    s = build_session(i, targets=3, finish=finish, outcome=outcome, branch="dev" if i % 2 else "main")
    hot = TargetMetrics(name="//pkg:hot", start=finish - 20, end=finish - 20 + i, duration_s=float(i),
                        status="failed" if i % 5 == 0 else "success", cache="remote_hit" if i % 3 == 1 else "miss",
                        worker=f"w{i % 4}")
    return msgspec.structs.replace(s, duration_s=10.0 + i, targets=[*s.targets, hot],
                                   cache_hits=i % 3, cache_misses=2)


@pytest.fixture
async def stored(settings: Settings, nc) -> AsyncIterator[list[BuildSession]]:
    svc = StorageService(settings.with_(fsync=False), settings.nats_url or "", settings.redis_url or "",
                         segment_bytes=8 * 1024)  # several sealed segments: rows come from row files too
    await svc.start()
    sessions = [_session(i) for i in range(24)]
    try:
        for s in sessions:
            await publish(nc, settings, encode(s), s.id)
        client = StorageClient(nc, Subjects(settings.namespace))

        async def all_stored() -> bool:
            return (await client.stats()).sessions == len(sessions)

        await eventually(all_stored, timeout=60)
        yield sessions
    finally:
        await svc.stop()


async def test_a_daily_trend_counts_every_build_in_its_utc_day(stored, settings, nc) -> None:
    subjects = Subjects(settings.namespace)
    got = await trend(nc, subjects, TrendRequest(since=DAY0, until=DAY0 + 3 * DAY))
    assert got.builds == len(stored) and got.bucket_s == DAY
    assert [b.start for b in got.buckets] == [DAY0, DAY0 + DAY, DAY0 + 2 * DAY]
    empty = got.buckets[1]  # no builds that day: listed, zeros, no rates
    assert (empty.builds, empty.success_rate, empty.duration_p50_s, empty.cache_hit_rate) == (0, None, None, None)
    for b in (got.buckets[0], got.buckets[2]):
        mine = [s for s in stored if b.start <= s.finish < b.start + DAY]
        assert b.builds == len(mine) > 0
        assert (b.succeeded, b.failed, b.abandoned) == tuple(sum(s.outcome == o for s in mine)
                                                             for o in ("success", "failed", "abandoned"))
        assert b.success_rate == pytest.approx(b.succeeded / b.builds)
        p50, p95 = np.percentile([s.duration_s for s in mine], [50, 95])
        assert (b.duration_p50_s, b.duration_p95_s) == (pytest.approx(p50), pytest.approx(p95))
        hits, misses = sum(s.cache_hits for s in mine), sum(s.cache_misses for s in mine)
        assert (b.cache_hits, b.cache_misses, b.cache_hit_rate) == (hits, misses, pytest.approx(hits / (hits + misses)))
    dev = await trend(nc, subjects, TrendRequest(since=DAY0, until=DAY0 + 3 * DAY, branch="dev"))
    assert dev.builds == sum(1 for s in stored if s.environment.vcs.branch == "dev")
    hourly = await trend(nc, subjects, TrendRequest(since=DAY0, until=DAY0 + DAY, bucket_s=3600))
    assert len(hourly.buckets) == 24 and sum(b.builds for b in hourly.buckets) == got.buckets[0].builds


async def test_bad_trend_requests_say_why(stored, settings, nc) -> None:
    subjects = Subjects(settings.namespace)
    with pytest.raises(StorageError) as err:
        await trend(nc, subjects, TrendRequest(since=DAY0, until=DAY0 + 4000 * DAY))
    assert err.value.code == 400 and "larger buckets" in err.value.description
    with pytest.raises(StorageError) as err:
        await trend(nc, subjects, TrendRequest(since=DAY0 + DAY, until=DAY0))
    assert err.value.code == 400 and "before since" in err.value.description


async def test_one_targets_runs_newest_first_across_pages(stored, settings, nc) -> None:
    subjects = Subjects(settings.namespace)
    newest_first = sorted(stored, key=lambda s: (s.finish, s.id), reverse=True)
    got = await target_history(nc, subjects, TargetHistoryRequest(target="//pkg:hot", limit=5), limit=24)
    assert [r.session_id for r in got.runs] == [s.id for s in newest_first] and got.cursor is None
    for run, s in zip(got.runs, newest_first, strict=True):
        hot = s.targets[-1]
        assert (run.t, run.branch, run.commit, run.outcome) == (s.finish, s.environment.vcs.branch,
                                                              s.environment.vcs.commit, s.outcome)
        assert (run.duration_s, run.status, run.worker) == (hot.duration_s, hot.status, hot.worker)
        assert run.cache == ("hit" if hot.cache == "remote_hit" else "miss")
    failed_only = await target_history(nc, subjects, TargetHistoryRequest(target="//pkg:hot", outcome="failed"))
    assert [r.session_id for r in failed_only.runs] == [s.id for s in newest_first if s.outcome == "failed"]
    first = await target_history(nc, subjects, TargetHistoryRequest(target="//pkg:hot", limit=3))
    assert len(first.runs) == 3 and first.cursor is not None  # more to page through
    none = await target_history(nc, subjects, TargetHistoryRequest(target="//nobody:ran"))
    assert none.runs == [] and none.cursor is None
    assert not math.isnan(sum(r.duration_s for r in got.runs))
