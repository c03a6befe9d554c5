"""Bounded input on real NATS and Redis: bad batches are dead-lettered once, each with its reason,
while good sessions published around them are stored with exactly their targets."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.services.collector import service as collector_mod
from buildtel.services.collector.service import CollectorService
from buildtel.services.recorder.service import RecorderService
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.service import StorageService
from buildtel.shared.bus import MAX_DELIVER, dead_letter_decoder, ensure_streams, watch_max_deliveries
from buildtel.shared.codec import encode
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildStarted, EventBatch, TargetFinished, TargetStarted, new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from buildtel.shared.validate import MAX_BATCH_EVENTS, MAX_STRING_CHARS, Rejected, check_batch
from tests.util import publish_events, synthetic_build


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0, what: str = "") -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def farm(settings: Settings, nc, redis_client) -> AsyncIterator[tuple[CollectorService, StorageService,
                                                                          RecorderService]]:
    urls = (settings.nats_url or "", settings.redis_url or "")
    services = (CollectorService(settings, *urls), StorageService(settings, *urls), RecorderService(settings, *urls))
    for svc in services:
        await svc.start()
    try:
        yield services
    finally:
        for svc in reversed(services):
            await svc.stop()


def _finished(sid: str, agent: str, seq: int, **fields: object) -> TargetFinished:
    now = time.time()
    base: dict[str, object] = dict(session_id=sid, agent_id=agent, seq=seq, ts=now, target="//bad:t", start=now - 1,
                                   duration_s=1.0)
    base.update(fields)
    return TargetFinished(**base)  # type: ignore[arg-type]


def _bad_batches() -> dict[str, bytes]:
    """One batch per bound, keyed by the reason code it must be dead-lettered with."""
    def one(**fields: object) -> bytes:
        sid = new_session_id()
        return encode(EventBatch(session_id=sid, agent_id="bad", events=[_finished(sid, "bad", 0, **fields)]))

    big_sid = new_session_id()
    now = time.time()
    oversized = EventBatch(session_id=big_sid, agent_id="bad", events=[
        TargetStarted(session_id=big_sid, agent_id="bad", seq=i, ts=now, target="t")
        for i in range(MAX_BATCH_EVENTS + 1)])
    v2_sid = new_session_id()
    return {
        "too_many_events": encode(oversized),
        "non_finite": one(duration_s=math.nan),
        "negative": one(peak_rss_bytes=-5),
        "timestamp_out_of_window": one(ts=now * 1000),  # milliseconds where seconds are due
        "unknown_version": encode(EventBatch(session_id=v2_sid, agent_id="bad", version=2,
                                             events=[_finished(v2_sid, "bad", 0)])),
        "string_too_long": one(target="x" * (MAX_STRING_CHARS + 1)),
    }


async def test_bad_batches_are_dead_lettered_once_each_and_good_sessions_are_stored_exactly(
        settings: Settings, nc, redis_client, farm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(collector_mod, "NAK_DELAY_S", 0.1)  # the poison batch's retries come back quickly
    collector, _storage, recorder = farm
    js = nc.jetstream()
    subjects, keys = Subjects(settings.namespace), Keys(settings.namespace)
    letters = await js.subscribe(subjects.dead_letter_all, ordered_consumer=True)

    builds = [synthetic_build(targets=40, seed=s) for s in range(3)]
    bad = _bad_batches()
    # Poison: a valid batch whose fold fails every time (its Redis state has the wrong type).
    psid = new_session_id()
    await redis_client.rpush(keys.session_seen(psid, "agent-p"), b"not a bitmap")
    poison = encode(EventBatch(session_id=psid, agent_id="agent-p", events=[
        BuildStarted(session_id=psid, agent_id="agent-p", seq=0, ts=time.time())]))

    (sid0, ev0, _), (sid1, ev1, _), (sid2, ev2, _) = builds
    half = len(ev0["agent-a"]) // 2
    await publish_events(js, subjects, sid0, "agent-a", ev0["agent-a"][:half])
    for code, data in bad.items():
        await js.publish(subjects.events(new_session_id()), data, headers={"Nats-Msg-Id": code})
    await publish_events(js, subjects, sid1, "agent-a", ev1["agent-a"])
    await js.publish(subjects.events(psid), poison, headers={"Nats-Msg-Id": "poison"})
    await publish_events(js, subjects, sid0, "agent-a", ev0["agent-a"][half:])
    await publish_events(js, subjects, sid2, "agent-a", ev2["agent-a"])

    client = StorageClient(nc, subjects)

    async def all_stored() -> bool:
        try:
            for sid, _, _ in builds:
                await client.get(sid)
        except StorageError:
            return False
        return True

    await eventually(all_stored, what="the good sessions in storage")
    for sid, _, expected in builds:
        session = await client.get(sid)
        assert len(session.targets) == expected["targets"]
        assert session.totals.events == expected["events"]
        assert session.cache_hits == expected["hits"] and session.cache_misses == expected["misses"]
        assert session.totals.target_time_s == pytest.approx(expected["target_time_s"])

    received = []
    for _ in range(len(bad) + 1):
        received.append(dead_letter_decoder.decode((await letters.next_msg(timeout=60)).data))
    by_code = {d.headers.get("Buildtel-Reason-Code"): d for d in received}
    assert set(by_code) == set(bad) | {"poison"}
    assert all(d.service == "collector" for d in received)
    for code, data in bad.items():
        assert by_code[code].data == data[: 1024 * 1024]
    assert "10001 events exceeds the cap of 10000" in by_code["too_many_events"].reason
    assert "nan" in by_code["non_finite"].reason and "duration_s" in by_code["non_finite"].reason
    assert "milliseconds" in by_code["timestamp_out_of_window"].reason
    assert "version 2" in by_code["unknown_version"].reason
    assert "deliveries" in by_code["poison"].reason and "WRONGTYPE" in by_code["poison"].reason
    # The poison batch's session knows it lost a batch: it will be stored incomplete, never whole.
    meta = await redis_client.hgetall(keys.session_meta(psid))
    assert int(meta[b"ub"]) == 1 and b"poison" in meta[b"ubr"]

    # Once each: both consumers of the events stream have settled, and nothing else was parked.
    async def settled() -> bool:
        infos = [await js.consumer_info(subjects.events_stream, c) for c in ("collector", "recorder")]
        return all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos)

    await eventually(settled, what="the events consumers to settle")
    assert (await js.stream_info(subjects.dead_letter_stream)).state.messages == len(bad) + 1
    assert collector.dead_letters == len(bad) + 1 and recorder.dead_letters == 0
    assert recorder.batches_invalid == len(bad)
    assert int(await redis_client.get(keys.counter("deadletter:collector"))) == len(bad) + 1
    for code in bad:
        assert int(await redis_client.get(keys.counter(f"deadletter:collector:{code}"))) == 1


async def test_a_capped_batch_folds_well_inside_the_ack_wait(settings: Settings, nc, farm) -> None:
    """The largest legal batch, many times in one fetch, folds without a redelivery."""
    collector, _, _ = farm
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    sid, per_agent, expected = synthetic_build(targets=MAX_BATCH_EVENTS * 2, seed=4)
    events = per_agent["agent-a"]
    await publish_events(js, subjects, sid, "agent-a", events, size=MAX_BATCH_EVENTS)
    client = StorageClient(nc, subjects)

    async def stored() -> bool:
        try:
            await client.get(sid)
        except StorageError:
            return False
        return True

    await eventually(stored, what="the session in storage")
    session = await client.get(sid)
    assert len(session.targets) == expected["targets"] and session.totals.events == expected["events"]
    info = await js.consumer_info(subjects.events_stream, "collector")
    assert info.num_redelivered == 0 and collector.fold_failures == 0 and collector.dead_letters == 0


async def test_a_message_never_acknowledged_is_dead_lettered_from_the_advisory(settings: Settings, nc,
                                                                                 redis_client) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    js = nc.jetstream()
    subjects, keys = Subjects(settings.namespace), Keys(settings.namespace)
    await ensure_streams(js, subjects)
    letters = await nc.subscribe(subjects.dead_letter("probe"))
    parked: list[str] = []
    watch = await watch_max_deliveries(nc, redis_client, subjects, keys, service="probe",
                                       stream=subjects.events_stream, consumer="probe", counter=parked.append)
    sub = await js.pull_subscribe(subjects.events_all, durable="probe", stream=subjects.events_stream,
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=0.5,
                                                        max_deliver=MAX_DELIVER))
    sid = new_session_id()
    data = encode(EventBatch(session_id=sid, agent_id="a", events=[]))
    await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": "x"})
    delivered = 0
    letter = None
    while letter is None:  # a consumer that keeps taking the message and never acknowledges it
        try:
            msgs = await sub.fetch(1, timeout=1.0)
            delivered += len(msgs)
        except Exception:  # noqa: BLE001 - nothing redelivered yet
            pass
        try:
            letter = dead_letter_decoder.decode((await letters.next_msg(timeout=0.01)).data)
        except Exception:  # noqa: BLE001 - no dead letter yet: still within max_deliver
            assert delivered <= MAX_DELIVER
    assert delivered == MAX_DELIVER
    assert letter.data == data and letter.subject == subjects.events(sid)
    assert f"after {MAX_DELIVER} deliveries" in letter.reason and letter.headers["Nats-Consumer"] == "probe"
    assert len(parked) == 1
    await watch.unsubscribe()


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_every_number_in_a_batch_is_finite_and_not_negative(value: float) -> None:
    sid = new_session_id()
    batch = EventBatch(session_id=sid, agent_id="a", events=[_finished(sid, "a", 0, cpu_s=value)])
    try:
        check_batch(batch, time.time())
    except Rejected as exc:
        assert not math.isfinite(value) or value < 0
        assert exc.code in ("non_finite", "negative") and "cpu_s" in exc.reason
    else:
        assert math.isfinite(value) and value >= 0


def test_rejection_reasons_roundtrip_through_msgpack() -> None:
    """Every bad batch above is decodable wire data: it is the bounds, not msgspec, that refuse it."""
    from buildtel.shared.codec import decode_batch

    for code, data in _bad_batches().items():
        batch = decode_batch(data)
        with pytest.raises(Rejected) as err:
            check_batch(batch, time.time())
        assert err.value.code == code
        assert msgspec.msgpack.decode(data)["type"] == "batch"
