"""The sessions stream carries the collector's started announcements: an existing stream declared
by an older version (completed sessions only) converges, and durable consumers still see only
completed sessions."""

from __future__ import annotations

from typing import Any

from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from buildtel.services.collector.service import CollectorService
from buildtel.shared.bus import ensure_streams
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import completed_sessions, publish_events, synthetic_build


async def test_an_older_sessions_stream_converges_and_consumers_see_only_completed(settings: Settings, nc: Any,
                                                                                   redis_client: Any) -> None:
    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    # As an older version declared it: completed sessions only.
    await js.add_stream(StreamConfig(name=subjects.sessions_stream, subjects=[subjects.sessions_completed],
                                     retention=RetentionPolicy.LIMITS, storage=StorageType.FILE))
    await ensure_streams(js, subjects)
    info = await js.stream_info(subjects.sessions_stream)
    assert set(info.config.subjects or []) == {subjects.sessions_completed, subjects.sessions_started}
    collector = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await collector.start()
    try:
        sid, per_agent, _ = synthetic_build(targets=10, seed=4)
        await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"])
        [session] = await completed_sessions(js, subjects, 1)  # a consumer filtered on completed
        assert session.id == sid
        assert collector.sessions_started == 1 and collector.announce_failures == 0
        state = (await js.stream_info(subjects.sessions_stream, subjects_filter=subjects.sessions_started)).state
        assert state.subjects == {subjects.sessions_started: 1}
    finally:
        await collector.stop()


async def test_two_collectors_and_duplicate_batches_announce_each_session_once(settings: Settings, nc: Any,
                                                                              redis_client: Any) -> None:
    from tests.util import batches

    js, subjects = nc.jetstream(), Subjects(settings.namespace)
    collectors = [CollectorService(settings, settings.nats_url or "", settings.redis_url or "") for _ in range(2)]
    for c in collectors:
        await c.start()
    try:
        sids = []
        for seed in range(6):
            sid, per_agent, _ = synthetic_build(targets=4, seed=seed)
            events = per_agent["agent-a"]
            # The BuildStarted batch twice under other Msg-Ids: JetStream keeps both, either
            # collector may fold either copy.
            for tag in ("x", "y"):
                await js.publish(subjects.events(sid), batches(sid, "agent-a", events[:1])[0][1],
                                 headers={"Nats-Msg-Id": f"{sid}{tag}"})
            await publish_events(js, subjects, sid, "agent-a", events[1:])
            sids.append(sid)
        done = await completed_sessions(js, subjects, 6)
        assert sorted(s.id for s in done) == sorted(sids)
        state = (await js.stream_info(subjects.sessions_stream, subjects_filter=subjects.sessions_started)).state
        assert state.subjects == {subjects.sessions_started: 6}
        assert sum(c.announce_failures for c in collectors) == 0
    finally:
        for c in collectors:
            await c.stop()
