"""The collector against real NATS and Redis: exact totals, several agents, crashes, bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.services.collector.service import CollectorService
from buildtel.shared.bus import dead_letter_decoder, ensure_streams
from buildtel.shared.codec import encode
from buildtel.shared.protocol import EventBatch, TargetFinished, TargetStarted, new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import batches, completed_sessions, publish_events, stack_env, synthetic_build


@pytest.fixture
async def collector(settings: Settings, redis_client: object) -> AsyncIterator[CollectorService]:
    svc = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()
    yield svc
    await svc.stop()


def _assert_matches(session, expected, sid):
    assert session.id == sid
    assert len(session.targets) == expected["targets"]
    assert session.cache_hits == expected["hits"]
    assert session.cache_misses == expected["misses"]
    assert session.totals.failed == expected["failed"]
    assert session.totals.events == expected["events"]
    assert session.totals.target_time_s == pytest.approx(expected["target_time_s"])
    assert session.cache_hit_rate == pytest.approx(expected["hits"] / (expected["hits"] + expected["misses"]))


async def test_single_agent_build_becomes_one_exact_session(settings, nc, collector) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, expected = synthetic_build(targets=120)
    await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"])
    [session] = await completed_sessions(js, subjects, 1)
    _assert_matches(session, expected, sid)
    assert session.outcome == "success"
    assert session.command == ["make", "-j8"]
    for t in session.targets:
        assert t.end - t.start == pytest.approx(t.duration_s)


async def test_redelivered_and_duplicated_batches_are_counted_once(settings, nc, collector) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, expected = synthetic_build(targets=40, seed=3)
    events = per_agent["agent-a"]
    # Every batch twice under different Msg-Ids, so JetStream's own de-duplication cannot help.
    for first, data in batches(sid, "agent-a", events, 7):
        await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"x{first}"})
        await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"y{first}"})
    sessions = await completed_sessions(js, subjects, 2, timeout=4)
    assert len(sessions) == 1
    _assert_matches(sessions[0], expected, sid)


async def test_three_agents_feed_one_session(settings, nc, collector) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    agents = ("coord", "worker-1", "worker-2")
    sid, per_agent, expected = synthetic_build(agents=agents, targets=150, seed=5)
    # Workers publish concurrently; the coordinator's BuildFinished goes last.
    await asyncio.gather(*(publish_events(js, subjects, sid, a, per_agent[a], 9) for a in agents[1:]),
                         publish_events(js, subjects, sid, "coord", per_agent["coord"][:-1], 9))
    await publish_events(js, subjects, sid, "coord", per_agent["coord"][-1:])
    [session] = await completed_sessions(js, subjects, 1)
    _assert_matches(session, expected, sid)
    assert session.agents == sorted(agents)


async def test_two_collectors_share_the_work_without_double_counting(settings, nc, collector) -> None:
    second = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await second.start()
    try:
        js = nc.jetstream()
        subjects = Subjects(settings.namespace)
        builds = [synthetic_build(targets=60, seed=s) for s in range(6)]
        await asyncio.gather(*(publish_events(js, subjects, sid, "agent-a", ev["agent-a"], 5)
                               for sid, ev, _ in builds))
        sessions = await completed_sessions(js, subjects, 7, timeout=5)
        assert sorted(s.id for s in sessions) == sorted(b[0] for b in builds)
        by_id = {s.id: s for s in sessions}
        for sid, _, expected in builds:
            _assert_matches(by_id[sid], expected, sid)
        # Which collector folds what is up to JetStream; together they fold every event once.
        assert collector.events_in + second.events_in == sum(e["events"] for _, _, e in builds)
    finally:
        await second.stop()


async def test_inactive_session_completes_as_abandoned_with_its_partial_data(settings, nc, redis_client) -> None:
    quick = settings.with_(session_timeout_s=0.5)
    svc = CollectorService(quick, quick.nats_url or "", quick.redis_url or "")
    await svc.start()
    try:
        js = nc.jetstream()
        subjects = Subjects(settings.namespace)
        sid, per_agent, _expected = synthetic_build(targets=10, finish=False)
        events = per_agent["agent-a"]
        dangling = TargetStarted(session_id=sid, agent_id="agent-a", seq=len(events), ts=events[-1].ts,
                                 target="//still:running", worker="w9")
        await publish_events(js, subjects, sid, "agent-a", [*events, dangling])
        [session] = await completed_sessions(js, subjects, 1)
        assert session.outcome == "abandoned"
        assert session.exit_code is None
        names = {t.name: t for t in session.targets}
        assert len(names) == 11
        assert names["//still:running"].status == "cancelled"
    finally:
        await svc.stop()


async def test_malformed_messages_go_to_dead_letters_and_good_data_survives(
        settings, nc, collector, redis_client) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    dl = await nc.subscribe(subjects.dead_letter("collector"))
    sid, per_agent, expected = synthetic_build(targets=30, seed=9)
    events = per_agent["agent-a"]
    bad = [
        b"\x00\xff garbage",
        encode({"type": "batch", "session_id": sid, "agent_id": "a", "events": "not a list"}),
        encode(EventBatch(session_id="not-hex", agent_id="a", events=[])),
        encode(EventBatch(session_id=sid, agent_id="agent-a", events=[TargetFinished(
            session_id=sid, agent_id="agent-a", seq=10**9, ts=0.0, target="x", start=0.0, duration_s=1.0)])),
    ]
    half = len(events) // 2
    await publish_events(js, subjects, sid, "agent-a", events[:half])
    for i, data in enumerate(bad):
        await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"bad{i}"})
    await publish_events(js, subjects, sid, "agent-a", events[half:])
    [session] = await completed_sessions(js, subjects, 1)
    _assert_matches(session, expected, sid)
    reasons = []
    for _ in bad:
        msg = await dl.next_msg(timeout=5)
        reasons.append(dead_letter_decoder.decode(msg.data).reason)
    assert any("seq" in r and "out of range" in r for r in reasons)
    assert any("not 32 lowercase hex" in r for r in reasons)
    assert collector.dead_letters == len(bad)
    assert int(await redis_client.get(collector.keys.counter("deadletter:collector"))) == len(bad)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=512))
async def test_random_bytes_never_stop_the_collector(settings, nc, collector, payload) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid = new_session_id()
    before = collector.dead_letters
    await js.publish(subjects.events(sid), payload)
    for _ in range(100):
        if collector.dead_letters > before or collector.events_in:
            break
        await asyncio.sleep(0.02)
    assert collector._tasks and not any(t.done() for t in collector._tasks)


def _spawn_collector(settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **stack_env(settings))
    env.update(BUILDER_TELEMETRY_NATS_URL=settings.nats_url or "", BUILDER_TELEMETRY_REDIS_URL=settings.redis_url or "",
               BUILDER_TELEMETRY_NAMESPACE=settings.namespace, BUILDER_TELEMETRY_FINISH_GRACE_S="0.5",
               BUILDER_TELEMETRY_LOG_FORMAT="json")
    return subprocess.Popen([sys.executable, "-m", "buildtel.services.collector"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_collector_sigkilled_mid_session_and_restarted_gives_exact_totals(settings, nc, redis_client) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    await ensure_streams(js, subjects)
    sid, per_agent, expected = synthetic_build(agents=("a1", "a2"), targets=2000, seed=11)
    proc = _spawn_collector(settings)
    try:
        first = {a: evs[: len(evs) * 2 // 3] for a, evs in per_agent.items()}
        await asyncio.gather(*(publish_events(js, subjects, sid, a, evs, 10) for a, evs in first.items()))
        await asyncio.sleep(0.3)  # let it fold part of the stream, then kill it mid-flight
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rest = {a: evs[len(evs) * 2 // 3:] for a, evs in per_agent.items()}
        await asyncio.gather(*(publish_events(js, subjects, sid, a, evs, 10) for a, evs in rest.items()))
        proc = _spawn_collector(settings)
        # Batches the killed collector held unacknowledged come back after the ack wait (5 s).
        await completed_sessions(js, subjects, 1, timeout=20)
        sessions = await completed_sessions(js, subjects, 2, timeout=2)  # and never a second copy
        assert len(sessions) == 1
        _assert_matches(sessions[0], expected, sid)
    finally:
        proc.kill()
        proc.wait()


def test_oversized_sessions_are_trimmed_to_fit_not_lost() -> None:
    from buildtel.services.collector import fold
    from buildtel.shared.codec import decode_session
    from buildtel.shared.protocol import Phase

    sid, per_agent, expected = synthetic_build(targets=3000, seed=2)
    events = per_agent["agent-a"]
    for ev in events:
        if isinstance(ev, TargetFinished):
            ev.deps = [f"//dep/{i}:x" * 3 for i in range(20)]
            ev.phases = [Phase(f"phase{i}", 0.1) for i in range(10)]
    raw = [encode(e) for e in events if isinstance(e, (TargetFinished, TargetStarted))]
    frag = b"\xdd" + len(raw).to_bytes(4, "big") + b"".join(raw)
    meta = {b"started": encode(events[0]), b"finished": encode(events[-1]), b"events": str(len(events)).encode()}
    session = fold.build_session(sid, meta, [frag], now=0.0)
    slim = fold.without_detail(session)
    assert len(encode(slim)) < len(encode(session)) / 3
    assert len(slim.targets) == expected["targets"] and all(not t.deps and not t.phases for t in slim.targets)
    top = fold.longest_targets(slim, 100)
    assert [t.duration_s for t in top.targets] and min(t.duration_s for t in top.targets) >= sorted(
        (t.duration_s for t in slim.targets), reverse=True)[99]
    assert decode_session(encode(top)).totals.targets == expected["targets"]


def test_a_finished_session_missing_counted_events_waits_for_them() -> None:
    from buildtel.services.collector import fold
    from buildtel.shared.protocol import BuildFinished

    fin = BuildFinished(session_id="ab" * 16, agent_id="a", seq=9, ts=1.0, expected_events={"a": 10, "b": 5})
    meta = {b"finished": encode(fin), b"n:a": b"10", b"max:a": b"9", b"n:b": b"3", b"max:b": b"4"}
    assert fold.missing_events(meta) and not fold.is_ready(meta)
    meta[b"n:b"] = b"5"
    assert not fold.missing_events(meta) and fold.is_ready(meta)
    alone = BuildFinished(session_id="ab" * 16, agent_id="a", seq=9, ts=1.0)
    gap = {b"finished": encode(alone), b"n:a": b"8", b"max:a": b"9"}
    assert fold.missing_events(gap) and not fold.is_ready(gap)


async def test_builds_fetched_together_complete_in_the_order_they_finished(settings, nc, redis_client) -> None:
    """A busy collector takes many builds' last batches in one fetch: they are completed (and so
    reach the analyzer, which folds sessions in that order) in the order they finished, not
    shuffled by session id (a regression's series was once folded out of order next to a CPU hog)."""
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    await ensure_streams(js, subjects)
    # Ids in descending order: completing ties by id would reverse the builds.
    ids = sorted((new_session_id() for _ in range(12)), reverse=True)
    for n, sid in enumerate(ids):
        _, per_agent, _ = synthetic_build(sid=sid, targets=5, seed=n)
        await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"], size=100)  # one batch a build
    svc = CollectorService(settings, settings.nats_url or "", settings.redis_url or "")
    await svc.start()  # after the builds: its first fetch holds all twelve
    try:
        got = await completed_sessions(js, subjects, len(ids))
        assert [s.id for s in got] == ids
    finally:
        await svc.stop()
