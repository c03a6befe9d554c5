"""An upgrade from keys without hash tags: the collector, analyzer and notifier carry what the
previous version left in a single Redis (in-flight sessions, detector baselines, queued deliveries)
over to the tagged names (shared/keymigrate.py), so nothing in flight is stranded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.collector.service import CollectorService
from buildtel.services.notifier.queue import Job, Queue
from buildtel.shared import keymigrate
from buildtel.shared.bus import connect_redis
from buildtel.shared.engines import RedisEngine
from buildtel.shared.keys import Keys
from buildtel.shared.rediscluster import is_cluster_url
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.analyzer.test_service import _step_history
from tests.util import completed_sessions, publish_events, synthetic_build


@pytest.fixture(scope="module")
def single_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A single Redis (a previous version never ran on a cluster): the pass's, or one of our own."""
    if not is_cluster_url(redis_url):
        yield redis_url
        return
    with RedisEngine(tmp_path_factory.mktemp("redis-single")) as eng:
        yield eng.url


@pytest.fixture
async def single(settings: Settings, single_url: str) -> AsyncIterator[tuple[Settings, Any]]:
    s = settings.with_(redis_url=single_url)
    r = connect_redis(single_url)
    yield s, r
    async for key in r.scan_iter(match=f"{s.namespace}:*", count=1000):
        await r.delete(key)
    await r.aclose()


async def _untag(r: Any, k: Keys, sid: str) -> None:
    """Put a session's hot state back under the names the previous version used."""
    prefix = k.session_prefix(sid)
    async for key in r.scan_iter(match=f"{prefix}*"):
        await r.rename(key, f"{k.ns}:sess:{sid}:{key.decode()[len(prefix):]}")
    for new, old in ((k.active_of(sid), f"{k.ns}:active"), (k.finishing_of(sid), f"{k.ns}:finishing")):
        for member, score in await r.zrange(new, 0, -1, withscores=True):
            await r.zadd(old, {member: score})
        await r.delete(new)


async def test_an_in_flight_session_of_the_previous_layout_completes_whole(single: Any, nc: Any) -> None:
    s, r = single
    js, subjects, k = nc.jetstream(), Subjects(s.namespace), Keys(s.namespace)
    sid, per_agent, expected = synthetic_build(targets=20, seed=7, agents=("agent-a", "agent-b"))
    first = {a: ev[: len(ev) // 2] for a, ev in per_agent.items()}
    old = CollectorService(s, s.nats_url or "", s.redis_url or "")
    await old.start()
    try:
        for agent, events in first.items():
            await publish_events(js, subjects, sid, agent, events)
        want = sum(len(e) for e in first.values())
        deadline = time.monotonic() + 30
        while int(await r.hget(k.session_meta(sid), "events") or 0) < want:
            assert time.monotonic() < deadline, "the first half was never folded"
            await asyncio.sleep(0.05)
    finally:
        await old.stop()
    await _untag(r, k, sid)
    assert not await r.exists(k.session_meta(sid)) and await r.exists(f"{k.ns}:sess:{sid}:meta")
    new = CollectorService(s, s.nats_url or "", s.redis_url or "")
    await new.start()  # migrates on start
    try:
        assert not await r.exists(f"{k.ns}:sess:{sid}:meta") and await r.zscore(k.active_of(sid), sid) is not None
        for agent, events in per_agent.items():
            await publish_events(js, subjects, sid, agent, events[len(first[agent]):])
        [session] = await completed_sessions(js, subjects, 1, timeout=30)
        assert session.id == sid and session.totals.events == expected["events"]
        assert len(session.targets) == expected["targets"]
        assert session.completeness is not None and session.completeness.complete
    finally:
        await new.stop()


async def test_detector_baselines_and_the_notifier_queue_survive_the_upgrade(single: Any, nc: Any) -> None:
    s, r = single
    k = Keys(s.namespace)
    sessions = _step_history(n=60, at=30, seed=4)
    a = AnalyzerService(s, s.nats_url or "", s.redis_url or "")
    await a.start()
    try:
        assert [x for y in sessions[:30] for x in await a.fold_session(y)] == []
    finally:
        await a.stop()
    moved = 0
    async for key in r.scan_iter(match=f"{k.ns}:analyzer:{{a*}}:series:*"):
        await r.rename(key, f"{k.ns}:analyzer:series:{key.decode().split(':series:', 1)[1]}")
        moved += 1
    assert moved >= 2
    # A delivery the previous version queued, under its names.
    q = Queue(r, k, "old")
    await q.enqueue(Job(sub="hook", item="a1", alerts=[], created=time.time()), 0)
    await r.rename(k.notifier_jobs, f"{k.ns}:notifier:jobs")
    await r.rename(k.notifier_due, f"{k.ns}:notifier:due")
    b = AnalyzerService(s, s.nats_url or "", s.redis_url or "")
    await b.start()
    try:
        # The step at session 30 is found only against the baseline of sessions 0-29: it was kept.
        assert len([x for y in sessions[30:] for x in await b.fold_session(y)]) == 1
    finally:
        await b.stop()
    counts = await keymigrate.migrate_notifier(r, k)
    assert counts == {"moved": 2, "kept": 0}
    assert await q.due(time.time(), 10) == ["hook|a1"]
    assert await keymigrate.migrate_notifier(r, k) == {"moved": 0, "kept": 0}  # idempotent
