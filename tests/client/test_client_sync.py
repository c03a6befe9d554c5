"""SyncTelemetryClient: emit from many threads into one contiguous sequence; bounded close."""

from __future__ import annotations

import threading
import time

from buildtel.shared.client import SyncTelemetryClient
from buildtel.shared.client_sync import ClientStats
from buildtel.shared.engines import free_port
from buildtel.shared.protocol import TargetFinished
from tests.client.helpers import read_stream, seqs_of


def test_emits_from_several_threads_form_one_contiguous_ordered_sequence(settings) -> None:
    threads, per_thread = 8, 2000
    s = settings.with_(batch_size=250)
    with SyncTelemetryClient(s, name="threads") as client:
        client.build_started(name="threads")
        barrier = threading.Barrier(threads)

        def work(k: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                client.target_finished(f"w{k}/t{i}", start=time.time(), duration_s=0.001, worker=f"w{k}")

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        client.build_finished()
    total = threads * per_thread + 2
    assert client.stats.sent == total and client.dropped == 0
    batches = read_stream(s, s.nats_url or "", events=total)
    assert seqs_of(batches) == list(range(total))
    assert all(len(b.events) <= 250 for _, b in batches)
    # Each thread's own events keep their order.
    last: dict[str, int] = {}
    for _, b in batches:
        for ev in b.events:
            if isinstance(ev, TargetFinished):
                k, i = ev.worker, int(ev.target.rsplit("t", 1)[1])
                assert i == last.get(k, -1) + 1
                last[k] = i
    assert len(last) == threads


def test_sync_client_without_a_bus_keeps_the_build_fast(settings) -> None:
    s = settings.with_(nats_url=f"nats://127.0.0.1:{free_port()}", buffer_limit=1000)
    t0 = time.monotonic()
    with SyncTelemetryClient(s) as client:
        for i in range(10_000):
            client.target_finished(f"t{i}", start=1.0, duration_s=0.1)
        time.sleep(0.1)
    assert time.monotonic() - t0 < 2.0
    assert client.stats.dropped == 10_000 and client.events_emitted == 1000
    assert not client.reached_bus


def test_sync_client_disabled_starts_no_thread(settings) -> None:
    before = threading.active_count()
    with SyncTelemetryClient(settings.with_(enabled=False)) as client:
        client.build_started()
        assert threading.active_count() == before
    assert client.close() == ClientStats() and client.events_emitted == 0


def test_sync_client_closed_without_start_counts_its_events_as_dropped(settings) -> None:
    client = SyncTelemetryClient(settings)
    client.build_started()
    stats = client.close(warn=False)
    assert stats.dropped == 1 and stats.sent == 0
    assert client.close() is stats  # idempotent


def test_a_forked_child_neither_buffers_nor_hangs_at_exit(settings) -> None:
    import os
    import warnings

    with SyncTelemetryClient(settings) as client:
        with warnings.catch_warnings():  # 3.12+ warns about fork() in a threaded process: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # child: emit, then exit through atexit like a normal interpreter would
            t0 = time.monotonic()
            client.target_finished("in-child", start=1.0, duration_s=1.0)
            ok = client.events_emitted == 0 and client.close().sent == 0 and time.monotonic() - t0 < 1
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.build_started()
    assert client.stats.sent == 1
