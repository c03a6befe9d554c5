"""The bus comes late or goes away mid-build: buffered events still arrive, once each."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from buildtel.shared.auth import StackAuth
from buildtel.shared.bus import connect_nats
from buildtel.shared.client import TelemetryClient
from buildtel.shared.engines import NatsEngine, free_port
from tests.client.helpers import seqs_of, stream_batches


async def _wait(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def _own(settings, **changes):
    """Settings for an engine this test starts itself: the session's credentials when the test
    servers are embedded, fresh ones when they were joined by URL."""
    changes.setdefault("stack_auth", settings.stack_auth or StackAuth.generate())
    return settings.with_(**changes)


async def _declare(settings, url: str) -> None:
    """Declare the streams on an engine this test started, as the services would."""
    from buildtel.shared.bus import ensure_streams
    from buildtel.shared.subjects import Subjects

    nc = await connect_nats(settings, url, name="test-operator", role="operator")
    try:
        await ensure_streams(nc.jetstream(), Subjects(settings.namespace))
    finally:
        await nc.close()


async def _stored(settings, url: str, events: int) -> list[int]:
    nc = await connect_nats(settings, url, name="test-reader", role="operator")
    try:
        return seqs_of(await stream_batches(nc.jetstream(), settings, events=events))
    finally:
        await nc.close()


async def test_server_started_after_the_client_receives_everything_buffered(settings, tmp_path: Path) -> None:
    port = free_port()
    s = _own(settings, nats_url=f"nats://127.0.0.1:{port}", batch_size=50)
    client = await TelemetryClient(s).start()
    client.build_started(name="early")
    for i in range(2000):
        client.target_finished(f"t{i}", start=1.0, duration_s=0.1)
    await asyncio.sleep(0.5)  # several failed connection attempts, batches cut and waiting
    assert not client.connected and client.stats.sent == 0
    with NatsEngine(tmp_path / "nats", port=port, auth=s.stack_auth, namespace="*") as eng:
        await _declare(s, eng.url)
        await _wait(lambda: client.connected)
        client.build_finished()
        stats = await client.close(timeout=10)
        assert stats.sent == 2002 and stats.dropped == 0
        # Every event once; order may differ where a batch found no stream yet (the engine is
        # up a moment before the test declares the streams) and was retried after later ones.
        seqs = await _stored(s, eng.url, 2002)
        assert sorted(seqs) == list(range(2002))


async def test_server_killed_and_restarted_mid_build_loses_nothing(settings, tmp_path: Path) -> None:
    data = tmp_path / "nats"
    auth = _own(settings).stack_auth
    eng = NatsEngine(data, auth=auth, namespace="*").start()
    s = _own(settings, nats_url=eng.url, batch_size=100, stack_auth=auth)
    await _declare(s, eng.url)
    client = await TelemetryClient(s).start()
    try:
        await _wait(lambda: client.connected)
        n = 0

        async def emit(count: int) -> None:
            nonlocal n
            for _ in range(count):
                client.target_finished(f"t{n}", start=1.0, duration_s=0.1)
                n += 1
                if n % 50 == 0:
                    await asyncio.sleep(0.005)  # a build emitting over time, some batches in flight

        await emit(1000)
        eng.kill()  # SIGKILL: in-flight publishes may or may not have been stored
        await emit(1500)  # while the bus is away: buffered
        await asyncio.sleep(0.5)
        assert not client.connected
        eng = NatsEngine(data, port=eng.port, auth=auth, namespace="*").start()  # same port, same store
        await _wait(lambda: client.connected)
        await emit(500)
        stats = await client.close(timeout=15)
        assert stats.dropped == 0 and stats.sent == n == 3000
        seqs = await _stored(s, eng.url, n)
        # Every event is stored; a batch whose ack was lost in the kill was re-sent with its
        # Msg-Id, so the stream (which rebuilds its duplicate window on restart) kept it once.
        assert sorted(set(seqs)) == list(range(n))
        assert len(seqs) == n
    finally:
        eng.stop()


async def test_events_over_the_buffer_limit_are_dropped_and_counted(settings, tmp_path: Path) -> None:
    port = free_port()
    s = _own(settings, nats_url=f"nats://127.0.0.1:{port}", buffer_limit=300, batch_size=100)
    client = await TelemetryClient(s).start()
    for i in range(500):
        client.target_finished(f"t{i}", start=1.0, duration_s=0.1)
    assert client.events_emitted == 300 and client.dropped == 200
    with NatsEngine(tmp_path / "nats", port=port, auth=s.stack_auth, namespace="*") as eng:
        await _declare(s, eng.url)
        await _wait(lambda: client.connected)
        stats = await client.close(timeout=10)
        assert (stats.sent, stats.dropped, stats.buffered_max) == (300, 200, 300)
        # Every event once; order may differ where a batch found no stream yet (the engine is
        # up a moment before the test declares the streams) and was retried after later ones.
        seqs = await _stored(s, eng.url, 300)
        assert sorted(seqs) == list(range(300))
