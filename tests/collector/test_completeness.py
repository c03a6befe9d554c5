"""Incomplete is never success: sessions that lost events are stored, listed and shown as incomplete.

Real NATS, Redis, collector and storage.  Time is driven through ``sweep_once(now=...)`` so no
test waits on the machine's speed for the gap wait or the inactivity timeout.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.services.collector.completeness import missing_ranges
from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.service import StorageService
from buildtel.shared.bus import dead_letter_decoder
from buildtel.shared.codec import encode
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildSession, EventBatch, SeqRange, TargetFinished, TargetStarted
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, stack_env, synthetic_build


@pytest.fixture
async def farm(settings: Settings, nc, redis_client) -> AsyncIterator[tuple[CollectorService, StorageService]]:
    urls = (settings.nats_url or "", settings.redis_url or "")
    # gap wait far beyond any test: a session that completes here did not wait for a gap.
    quiet = settings.with_(gap_wait_s=600.0)
    services = (CollectorService(quiet, *urls), StorageService(settings, *urls))
    for svc in services:
        await svc.start()
    try:
        yield services
    finally:
        for svc in reversed(services):
            await svc.stop()


async def stored(nc, settings: Settings, sid: str, timeout: float = 60.0) -> BuildSession:
    client = StorageClient(nc, Subjects(settings.namespace))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.get(sid)
        except StorageError:
            assert time.monotonic() < deadline, f"session {sid} never stored"
            await asyncio.sleep(0.1)


async def folded(redis_client, settings: Settings, sid: str, events: int, timeout: float = 60.0) -> None:
    """Wait until the collector has folded ``events`` events of ``sid`` (not a timing assumption:
    we wait for the state itself)."""
    key = Keys(settings.namespace).session_meta(sid)
    deadline = time.monotonic() + timeout
    while int(await redis_client.hget(key, "events") or 0) < events:
        assert time.monotonic() < deadline, f"{events} events of {sid} never folded"
        await asyncio.sleep(0.05)


async def cli(settings: Settings, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(stack_env(settings))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--cache-dir", str(settings.cache_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_one_bad_event_loses_only_itself_and_the_session_says_so(settings, nc, redis_client, farm) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    letters = await js.subscribe(subjects.dead_letter_all, ordered_consumer=True)
    sid, per_agent, expected = synthetic_build(targets=5, seed=11)
    events = per_agent["agent-a"]
    bad_i = next(i for i, e in enumerate(events) if isinstance(e, TargetFinished))
    bad = events[bad_i]
    events[bad_i] = TargetFinished(**{**{f: getattr(bad, f) for f in bad.__struct_fields__}, "duration_s": math.nan})
    await publish_events(js, subjects, sid, "agent-a", events, size=100)  # one batch: all 12 events

    session = await stored(nc, settings, sid)
    assert session.outcome == "success"
    assert len(session.targets) == expected["targets"] - 1
    assert bad.target not in {t.name for t in session.targets}
    c = session.completeness
    assert c is not None and not c.complete
    assert c.expected == {"agent-a": len(events)} and c.received == {"agent-a": len(events) - 1}
    assert c.missing == [] and c.missing_total == 0
    [lost] = c.lost
    assert (lost.agent_id, lost.events, lost.code, lost.first_seq) == ("agent-a", 1, "non_finite", bad.seq)
    assert "nan" in lost.reason and "duration_s" in lost.reason
    assert any("1 event(s) refused" in r and "non_finite" in r for r in c.reasons)

    letter = dead_letter_decoder.decode((await letters.next_msg(timeout=60)).data)
    assert letter.headers["Buildtel-Reason-Code"] == "non_finite"
    assert letter.headers["Buildtel-Events-Refused"] == "1" and letter.headers["Buildtel-Events-Kept"] == "11"
    assert "1 of 12 events refused, the other 11 kept" in letter.reason

    listed = await cli(settings, "sessions")
    [line] = [ln for ln in listed.splitlines() if ln.startswith(sid)]
    assert "INCOMPLETE: agent agent-a: 1 event(s) refused" in line
    shown = await cli(settings, "show", sid)
    assert "INCOMPLETE 11 of 12 events received" in shown
    assert "non_finite" in shown and "duration_s" in shown


async def test_a_batch_refused_whole_is_recorded_against_its_session(settings, nc, redis_client, farm) -> None:
    collector, _ = farm
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, expected = synthetic_build(targets=6, seed=12)
    events = per_agent["agent-a"]
    await publish_events(js, subjects, sid, "agent-a", events[:5], size=100)
    # The middle of the build arrives in a batch of an unknown protocol version.
    v2 = encode(EventBatch(session_id=sid, agent_id="agent-a", events=events[5:9], version=2))
    await js.publish(subjects.events(sid), v2, headers={"Nats-Msg-Id": "v2"})
    await publish_events(js, subjects, sid, "agent-a", events[9:], size=100)

    session = await stored(nc, settings, sid)
    c = session.completeness
    assert c is not None and not c.complete
    [lost] = c.lost
    assert (lost.events, lost.code, lost.first_seq, lost.last_seq) == (4, "unknown_version", 5, 8)
    assert "batch refused whole" in lost.reason and "version 2" in lost.reason
    assert len(session.targets) == expected["targets"] - 2
    assert collector.rejected.get("unknown_version") == 1


async def test_a_seq_gap_completes_at_the_gap_wait_marked_incomplete(settings, nc, redis_client, farm) -> None:
    collector, _ = farm
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, expected = synthetic_build(targets=5, seed=13)
    events = per_agent["agent-a"]
    kept = [e for e in events if e.seq not in (4, 5)]  # the agent skipped seq 4 and 5
    await publish_events(js, subjects, sid, "agent-a", kept, size=3)
    await folded(redis_client, settings, sid, len(kept))

    assert await collector.sweep_once(now=time.time()) == 0  # within the wait: events may still come
    wait = collector.settings.gap_wait_s
    assert Settings().gap_wait_s == 30.0 < Settings().session_timeout_s  # the documented, bounded default
    assert await collector.sweep_once(now=time.time() + wait + 1) == 1

    session = await stored(nc, settings, sid)
    assert session.outcome == "success"
    assert len(session.targets) == expected["targets"] - 1
    c = session.completeness
    assert c is not None and not c.complete
    assert c.missing == [SeqRange(agent_id="agent-a", first=4, last=5)] and c.missing_total == 2
    assert c.lost == []
    assert any("2 event(s) never arrived (seq 4-5)" in r for r in c.reasons)


async def test_a_gap_filled_within_the_wait_leaves_the_session_complete(settings, nc, redis_client, farm) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, expected = synthetic_build(targets=5, seed=14)
    events = per_agent["agent-a"]
    await publish_events(js, subjects, sid, "agent-a", [e for e in events if e.seq != 3], size=4)
    await folded(redis_client, settings, sid, len(events) - 1)
    await publish_events(js, subjects, sid, "agent-a", [events[3]])  # the redelivery, late but in time
    session = await stored(nc, settings, sid)
    assert session.completeness is not None and session.completeness.complete
    assert session.completeness.reasons == [] and len(session.targets) == expected["targets"]


async def test_an_agent_that_vanishes_leaves_an_incomplete_abandoned_session(settings, nc, redis_client,
                                                                             farm) -> None:
    collector, _ = farm
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, _ = synthetic_build(targets=4, seed=15, finish=False)
    events = per_agent["agent-a"]
    events.append(TargetStarted(session_id=sid, agent_id="agent-a", seq=len(events), ts=events[-1].ts,
                                target="//still:running"))
    await publish_events(js, subjects, sid, "agent-a", events)
    await folded(redis_client, settings, sid, len(events))
    assert await collector.sweep_once(now=time.time() + settings.session_timeout_s + 1) == 1

    session = await stored(nc, settings, sid)
    assert session.outcome == "abandoned"
    c = session.completeness
    assert c is not None and not c.complete
    assert c.reasons[0].startswith("abandoned: no build_finished")
    shown = await cli(settings, "show", sid)
    assert "INCOMPLETE" in shown and "abandoned: no build_finished" in shown


async def test_a_whole_session_is_stored_complete(settings, nc, redis_client, farm) -> None:
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, _ = synthetic_build(targets=8, seed=16)
    await publish_events(js, subjects, sid, "agent-a", per_agent["agent-a"])
    session = await stored(nc, settings, sid)
    c = session.completeness
    assert c is not None and c.complete and c.reasons == [] and c.lost == [] and c.missing == []
    assert c.expected == c.received == {"agent-a": len(per_agent["agent-a"])}


def _reference_ranges(bitmap: bytes, upto: int) -> list[tuple[int, int]]:
    bits = [(bitmap[i // 8] >> (7 - i % 8)) & 1 if i // 8 < len(bitmap) else 0 for i in range(upto)]
    out, start = [], None
    for i, v in enumerate([*bits, 1]):
        if not v and start is None:
            start = i
        elif v and start is not None:
            out.append((start, i - 1))
            start = None
    return out


@given(st.lists(st.sampled_from([0, 0xFF]) | st.integers(0, 255), max_size=8).map(bytes), st.integers(0, 80))
def test_missing_ranges_are_exactly_the_unset_bits(bitmap: bytes, upto: int) -> None:
    assert missing_ranges(bitmap, upto) == _reference_ranges(bitmap, upto)
