"""TelemetryClient against real NATS/JetStream: ordering, batching, Msg-Id, retries, no-ops."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from nats.js.errors import NotFoundError

from buildtel.shared.client import ClientStats, TelemetryClient
from buildtel.shared.engines import free_port
from buildtel.shared.protocol import (
    BuildFinished,
    BuildStarted,
    HealthCheckpoint,
    TargetFinished,
    TargetStarted,
)
from buildtel.shared.subjects import Subjects
from tests.client.helpers import seqs_of, stream_batches


async def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_events_arrive_in_order_in_bounded_batches_with_msg_ids(settings, nc) -> None:
    s = settings.with_(batch_size=100)
    n_targets = 1000
    async with TelemetryClient(s, name="unit") as client:
        client.build_started(name="unit", command=["make", "-j8"], labels={"ci": "yes"})
        for i in range(n_targets):
            client.target_started(f"//pkg:t{i}", worker="w1")
            client.target_finished(f"//pkg:t{i}", start=time.time(), duration_s=0.01 * i, cache="local_hit",
                                   worker="w1", exit_code=0, cpu_s=0.001)
            if i % 200 == 0:
                await asyncio.sleep(0)  # a real agent does other work between targets
        client.health(completed_tasks=n_targets, worker_count=8, status="healthy")
        client.build_finished(exit_code=0)
    total = 2 * n_targets + 3
    assert client.events_emitted == total

    batches = await stream_batches(nc.jetstream(), s, events=total)
    seqs = seqs_of(batches)
    assert seqs == list(range(total))  # in order, contiguous, each once
    for headers, batch in batches:
        assert 1 <= len(batch.events) <= 100
        assert batch.session_id == client.session_id and batch.agent_id == client.agent_id
        assert headers["Nats-Msg-Id"] == f"{client.session_id}:{client.agent_id}:{batch.events[0].seq}"
    events = [ev for _, b in batches for ev in b.events]
    assert isinstance(events[0], BuildStarted) and events[0].labels == {"ci": "yes"}
    assert isinstance(events[1], TargetStarted) and isinstance(events[2], TargetFinished)
    assert isinstance(events[-2], HealthCheckpoint) and isinstance(events[-1], BuildFinished)
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    assert client.stats == ClientStats(sent=total, dropped=0, buffered_max=client.stats.buffered_max, retries=0)


async def test_time_based_flush_publishes_a_partial_batch(settings, nc) -> None:
    client = await TelemetryClient(settings).start()  # flush_interval_s = 0.05 in the fixture
    try:
        for i in range(3):
            client.target_finished(f"t{i}", start=1.0, duration_s=1.0)
        batches = await stream_batches(nc.jetstream(), settings, events=3, timeout=5.0)
        assert seqs_of(batches) == [0, 1, 2]
    finally:
        await client.close()


async def test_an_agent_keeps_its_events_until_the_services_declare_the_stream(settings, nc) -> None:
    """Agents may not declare streams (their role cannot): what a client emits before the
    services are up stays buffered and is published once the stream exists."""
    import uuid

    from buildtel.shared.bus import ensure_streams

    s = settings.with_(namespace="t" + uuid.uuid4().hex[:12])  # no streams declared yet
    js = nc.jetstream()
    stream = Subjects(s.namespace).events_stream
    client = await TelemetryClient(s).start()
    try:
        client.build_started()
        await _wait(lambda: client.connected)
        await asyncio.sleep(0.3)  # several publish attempts find no stream
        with pytest.raises(NotFoundError):
            await js.stream_info(stream)
        await ensure_streams(js, Subjects(s.namespace))  # what a service does when it starts
        stats = await client.close(timeout=15)
        assert (stats.sent, stats.dropped) == (1, 0)
        assert (await js.stream_info(stream)).state.messages == 1
    finally:
        await client.close()
        await js.delete_stream(stream)


async def test_failed_publish_is_retried_with_the_same_bytes_and_msg_id(settings, nc) -> None:
    """The ack is lost after the server stored the batch: the retry must be a duplicate."""
    client = await TelemetryClient(settings.with_(batch_size=10)).start()
    await _wait(lambda: client.connected)
    js = client._js
    real_publish = js.publish
    attempts: list[tuple[bytes, str]] = []

    async def flaky_publish(subject, payload, timeout=None, headers=None, **kw):
        attempts.append((payload, headers["Nats-Msg-Id"]))
        ack = await real_publish(subject, payload, timeout=timeout, headers=headers, **kw)
        if len(attempts) <= 3:
            raise TimeoutError("ack lost")
        return ack

    js.publish = flaky_publish
    for i in range(10):
        client.target_finished(f"t{i}", start=1.0, duration_s=1.0)
    stats = await client.close(timeout=10)
    assert stats.sent == 10 and stats.retries == 3 and stats.dropped == 0
    assert len(attempts) == 4 and len(set(attempts)) == 1  # same bytes, same Msg-Id, every time
    batches = await stream_batches(nc.jetstream(), settings, events=10)
    assert len(batches) == 1 and seqs_of(batches) == list(range(10))


async def test_no_server_emitting_is_fast_and_close_is_bounded(settings) -> None:
    s = settings.with_(nats_url=f"nats://127.0.0.1:{free_port()}", buffer_limit=5000)
    client = await TelemetryClient(s).start()
    t0 = time.monotonic()
    for i in range(10_000):
        client.target_finished(f"//pkg:t{i}", start=1.0, duration_s=0.5)
    assert time.monotonic() - t0 < 1.0
    await asyncio.sleep(0.2)  # let the connection attempt fail
    t1 = time.monotonic()
    stats = await client.close(timeout=2.0)
    assert time.monotonic() - t1 < 2.5
    assert client.events_emitted == 5000  # the buffer limit; later events were refused
    assert stats.dropped == 10_000 and stats.sent == 0 and stats.buffered_max == 5000
    assert not client.reached_bus and "NoServersError" in (client.last_error or "")


async def test_close_waits_at_most_its_timeout_while_unreachable_after_losing_the_bus(settings) -> None:
    s = settings.with_(nats_url=f"nats://127.0.0.1:{free_port()}")
    client = await TelemetryClient(s).start()
    client._ever_connected = True  # as if the server had died mid-build
    client.build_started()
    t0 = time.monotonic()
    stats = await client.close(timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 1.0
    assert stats.dropped == 1


async def test_disabled_client_is_a_complete_no_op(settings, nc) -> None:
    client = TelemetryClient(settings.with_(enabled=False))
    async with client:
        client.build_started(name="x")
        client.target_finished("t", start=1.0, duration_s=1.0)
        client.build_finished()
        assert client._tasks == [] and client._nc is None
    assert client.events_emitted == 0
    assert await client.close() == ClientStats()
    info = await nc.jetstream().stream_info(Subjects(settings.namespace).events_stream)
    assert info.state.messages == 0  # nothing was published


async def test_emits_after_close_are_counted_as_dropped(settings) -> None:
    client = await TelemetryClient(settings.with_(nats_url=f"nats://127.0.0.1:{free_port()}")).start()
    await client.close(timeout=0.1, warn=False)
    client.target_finished("late", start=1.0, duration_s=1.0)
    assert client.dropped == 1 and client.events_emitted == 0


def test_invalid_session_id_is_refused_at_construction(settings) -> None:
    with pytest.raises(ValueError):
        TelemetryClient(settings, session_id="not-hex")
    c = TelemetryClient(settings, agent_id="host:1|x y")
    assert c.agent_id == "host_1_x_y"  # the collector keys on ':' and '|'


async def test_health_checkpoints_also_go_live_on_core_nats(settings, nc) -> None:
    from buildtel.shared.codec import event_decoder

    got: asyncio.Queue = asyncio.Queue()
    sub = await nc.subscribe(Subjects(settings.namespace).health("*"), cb=got.put)
    client = await TelemetryClient(settings).start()
    try:
        await _wait(lambda: client.connected)
        client.health(completed_tasks=3, status="degraded", reasons=["slow worker"])
        msg = await asyncio.wait_for(got.get(), 5)
        ev = event_decoder.decode(msg.data)
        assert isinstance(ev, HealthCheckpoint) and ev.completed_tasks == 3 and ev.status == "degraded"
        assert msg.subject == Subjects(settings.namespace).health(client.session_id)
    finally:
        await client.close()
        await sub.unsubscribe()
    batches = await stream_batches(nc.jetstream(), settings, events=1)
    assert isinstance(batches[0][1].events[0], HealthCheckpoint)  # and in the session's stream
