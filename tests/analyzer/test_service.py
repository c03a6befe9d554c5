"""The analyzer service against real NATS and Redis: alerts once, redeliveries, replicas racing, outbox, API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from buildtel.services.analyzer.alerts import decode_state
from buildtel.services.analyzer.analytics import TelemetryAnalyzer
from buildtel.services.analyzer.api import (
    REPORT_S_PER_SESSION,
    AnalyzerClient,
    AnalyzerError,
    ReportRequest,
    read_alerts,
)
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.shared.bus import dead_letter_decoder, ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.analyzer.helpers import T0, session, step_history, target

_step_history = step_history


async def _publish(js, subjects: Subjects, sessions, prefix: str = "") -> None:
    for s in sessions:
        await js.publish(subjects.sessions_completed, encode(s), headers={"Nats-Msg-Id": prefix + s.id})


async def _until(cond, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
async def analyzer(settings: Settings, nc, redis_client) -> AsyncIterator[AnalyzerService]:
    svc = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()
    await svc.stop()  # idempotent


@pytest.fixture
async def storage(settings: Settings, nc, redis_client) -> AsyncIterator[StorageService]:
    svc = StorageService(settings.with_(fsync=False), settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


async def _stats(nc, settings):
    return await AnalyzerClient(nc, settings.namespace, timeout=5).stats()


async def _stored(nc, settings, n: int) -> None:
    async def check() -> bool:
        return (await StorageClient(nc, Subjects(settings.namespace)).stats()).sessions >= n
    await _until(check)


async def test_a_step_raises_one_alert_and_reports_match_offline_figures(settings, nc, analyzer, storage) -> None:
    js = nc.jetstream()
    sessions = _step_history()
    await _publish(js, Subjects(settings.namespace), sessions)

    async def all_folded() -> bool:
        return (await _stats(nc, settings)).sessions == len(sessions)

    await _until(all_folded)
    await _stored(nc, settings, len(sessions))
    alerts = await read_alerts(js, settings.namespace)
    builds = [a for a in alerts if a.kind == "build"]
    assert len(builds) == 1 and builds[0].direction == "regression"
    assert builds[0].first_session_id in (sessions[35].id, sessions[36].id)
    assert not [a for a in alerts if a.kind == "target"]  # the targets did not change
    e = builds[0].explanation  # the two builds, fetched from storage and compared
    assert e is not None and e.code_change is True and not e.notes and e.culprits == []
    assert e.critical_path is not None and not e.critical_path.moved
    assert e.added_s == pytest.approx(40, abs=8)
    stats = await _stats(nc, settings)
    assert stats.points == len(sessions) * 3 and stats.alerts == 1 and stats.outbox == 0
    client = AnalyzerClient(nc, settings.namespace, timeout=10)
    rep = await client.report(last=40, include_sessions=True)
    offline = TelemetryAnalyzer().report(sessions[-40:], include_sessions=True)
    assert rep.sessions == 40 and [r.id for r in rep.session_rows] == [s.id for s in sessions[-40:]]
    assert rep.duration.mean_s == pytest.approx(offline.duration.mean_s)
    assert rep.duration.p95_s == pytest.approx(offline.duration.p95_s)
    assert [t.median_s for t in rep.targets] == pytest.approx([t.median_s for t in offline.targets])
    assert rep.bottlenecks.targets[0].name == "//svc:build"
    assert not rep.partial
    ranged = await client.report(since=sessions[10].finish, until=sessions[20].finish)
    assert ranged.sessions == 10
    assert (await client.report(branch="nope")).sessions == 0


async def test_redelivered_sessions_are_not_counted_twice(settings, nc, analyzer) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sessions = _step_history(n=50, at=30, seed=2)
    await _publish(js, subjects, sessions)

    async def folded(n: int):
        async def check() -> bool:
            return (await _stats(nc, settings)).sessions >= n
        return check

    await _until(await folded(50))
    before = await _stats(nc, settings)
    # The same sessions again under new Msg-Ids: JetStream cannot drop them, the analyzer must.
    await _publish(js, subjects, sessions, prefix="again-")

    async def drained() -> bool:
        return analyzer.sessions_in == 100

    await _until(drained)
    after = await _stats(nc, settings)
    assert (after.points, after.alerts, after.sessions) == (before.points, before.alerts, before.sessions)
    assert len(await read_alerts(js, settings.namespace, kind="build")) == 1
    state = decode_state(await analyzer.redis.hget(Keys(settings.namespace).analyzer_series("build|main"), "s"))
    assert state.n == 50


async def test_two_replicas_folding_one_series_serialise(settings, nc, redis_client) -> None:
    """Consecutive sessions of one series folded concurrently by two replicas: none lost, none twice."""
    a = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    b = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    await a.start()
    await b.start()
    try:
        sessions = _step_history(n=80, at=40, seed=3)
        # Bypass the consumer: each pair of consecutive sessions is folded by the two replicas at once,
        # as when two replicas pull neighbouring messages of the stream.
        alerts = []
        for k in range(0, 80, 2):
            for r in await asyncio.gather(a.fold_session(sessions[k]), b.fold_session(sessions[k + 1])):
                alerts += r
        state = decode_state(await a.redis.hget(Keys(settings.namespace).analyzer_series("build|main"), "s"))
        assert state.n == 80
        assert sorted(e.sid for e in state.ring[-80:]) == sorted(s.id for s in sessions)
        assert len([x for x in alerts if x.kind == "build"]) == 1
        assert a.conflicts + b.conflicts > 0  # they really did collide
        again = await asyncio.gather(*(svc.fold_session(s) for s, svc in zip(sessions, [b, a] * 40, strict=True)))
        assert not any(again)
    finally:
        await a.stop()
        await b.stop()


async def test_outbox_alert_survives_a_crash_between_commit_and_publish(settings, nc, analyzer) -> None:
    js = nc.jetstream()
    sessions = _step_history(n=60, at=30, seed=4)
    # fold_session commits alerts to the outbox; not publishing them is what a SIGKILL would leave.
    committed = [a for s in sessions for a in await analyzer.fold_session(s)]
    assert len(committed) == 1
    assert await analyzer.outbox_size() == 1
    assert await read_alerts(js, settings.namespace) == []
    assert await analyzer.sweep_outbox_once(grace_s=0) == 1
    # A second replica's sweep racing the first publish: JetStream's duplicate window drops it.
    await analyzer._publish(committed[0])
    alerts = await read_alerts(js, settings.namespace)
    assert [x.id for x in alerts] == [committed[0].id]
    assert await analyzer.outbox_size() == 0
    # No storage service in this test: the alert went out anyway, saying why it is not explained.
    e = alerts[0].explanation
    assert e is not None and "the builds could not be compared: the storage service is not answering" in e.summary
    assert e.notes == [e.summary] and e.culprits == [] and e.code_change is None


async def test_bad_input_is_dead_lettered_and_bad_requests_refused(settings, nc, analyzer) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    await ensure_streams(js, subjects)
    dl = await js.subscribe(subjects.dead_letter_all, ordered_consumer=True)
    await js.publish(subjects.sessions_completed, b"\x93not a session", headers={"Nats-Msg-Id": "bad"})
    msg = await dl.next_msg(timeout=10)
    letter = dead_letter_decoder.decode(msg.data)
    assert letter.service == "analyzer" and "undecodable" in letter.reason
    await dl.unsubscribe()
    with pytest.raises(AnalyzerError) as exc:
        await AnalyzerClient(nc, settings.namespace, timeout=5)._request("report", b"\x81\xa4last\xa3one")
    assert exc.value.code == 400


async def test_a_report_over_more_history_than_redis_holds(settings, nc, redis_client) -> None:
    """Reports read storage, paged: a window of many pages, ``last`` above the old Redis cap and a
    ``since`` without ``last`` all come whole; Redis holds no sessions; without storage, a clear 503."""
    from buildtel.services.storage.service import StorageService

    small = settings.with_(max_sessions=40, fsync=False)  # the old cap of the analyzer's Redis copy was this
    svc = AnalyzerService(small, small.nats_url or "", small.redis_url or "", storage_timeout_s=3)
    # Replies of at most ~2 KB: a report of 40 sessions is many columns pages (and many requests).
    storage = StorageService(small, small.nats_url or "", small.redis_url or "", max_reply_bytes=6 * 1024)
    await svc.start()
    await storage.start()
    try:
        sessions = _step_history(n=40, seed=9)
        await _publish(nc.jetstream(), Subjects(small.namespace), sessions)

        async def folded() -> bool:
            return (await _stats(nc, small)).sessions == 40
        await _until(folded)
        await _stored(nc, small, 40)
        client = AnalyzerClient(nc, small.namespace, timeout=10)
        full = await client.report(last=1000, include_sessions=True)
        assert full.sessions == 40 and not full.partial and not full.notes
        assert [r.id for r in full.session_rows] == [s.id for s in sessions]
        assert full.bottlenecks is not None and full.bottlenecks.sessions_analysed == 10
        offline = TelemetryAnalyzer().report(sessions, filters=full.filters, include_sessions=True)
        full.generated_at = offline.generated_at = 0.0
        assert full == offline  # the rows storage sent give the report the sessions give
        # The wait grows with what the window may hold (here all 40 stored), not a fixed timeout.
        assert await client.report_timeout(ReportRequest()) == pytest.approx(10 + 40 * REPORT_S_PER_SESSION)
        assert await client.report_timeout(ReportRequest(last=5)) == pytest.approx(10 + 5 * REPORT_S_PER_SESSION)
        since = await client.report(since=sessions[5].finish)  # no `last`: paged the same way
        assert since.sessions == 35 and since.window_start == sessions[5].start
        # Redis holds hot state only: detector series, fold markers, the outbox, counters.
        keys = [k.decode() async for k in redis_client.scan_iter(f"{Keys(small.namespace).analyzer('')}*")]
        kinds = {k.split(":")[3] for k in keys}  # ns:analyzer:{shard}:kind:…
        assert kinds <= {"series", "done", "outbox", "stats"}, kinds
        await storage.stop()
        with pytest.raises(AnalyzerError) as err:
            await client.report(last=5)
        assert err.value.code == 503 and "storage service is not answering" in err.value.description
    finally:
        await storage.stop()
        await svc.stop()


async def test_a_session_that_keeps_failing_is_dead_lettered(settings, nc, redis_client, monkeypatch) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    import buildtel.services.analyzer.service as service_mod

    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    await ensure_streams(js, subjects)
    await js.add_consumer(subjects.sessions_stream, ConsumerConfig(
        durable_name="analyzer", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=0.3,
        max_deliver=-1, filter_subject=subjects.sessions_completed))
    bad, good = _step_history(n=2, seed=12)
    real_fold = service_mod.fold

    def fold(state, point, session, **kw):
        if session.id == bad.id:
            raise RuntimeError("boom")
        return real_fold(state, point, session, **kw)

    monkeypatch.setattr(service_mod, "fold", fold)
    svc = AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    try:
        dl = await js.subscribe(subjects.dead_letter_all, ordered_consumer=True)
        await _publish(js, subjects, [bad, good])
        letter = dead_letter_decoder.decode((await dl.next_msg(timeout=20)).data)
        assert "failed 5 times" in letter.reason and "boom" in letter.reason
        await dl.unsubscribe()

        async def good_folded() -> bool:
            return svc.sessions_in == 1

        await _until(good_folded)
    finally:
        await svc.stop()


async def test_a_build_with_more_series_than_one_commit_folds_whole_and_once(settings, nc, analyzer) -> None:
    # A huge build (here 5,000 targets: three COMMIT_CHUNKs) folds in bounded Redis round trips;
    # every series gets its point once, and a redelivery adds none.
    from buildtel.services.analyzer.alerts import series_points
    from buildtel.services.analyzer.service import COMMIT_CHUNK

    big = session(1, 900.0, targets=[target(f"//huge:t{i}", T0 + 3600 + i * 0.1, 1.0) for i in range(5000)])
    points = len(series_points(big))
    assert points > 2 * COMMIT_CHUNK
    before = await _stats(nc, settings)
    told: list[int] = []

    async def in_progress() -> None:  # what JetStream hears between chunks: no redelivery meanwhile
        told.append(1)

    assert await analyzer.fold_session(big, progress=in_progress) == []
    assert len(told) >= points // COMMIT_CHUNK
    assert await analyzer.fold_session(big) == []  # a redelivery: nothing new
    after = await _stats(nc, settings)
    assert after.points - before.points == points
