"""TelemetryStorage against real files: round trip, idempotency, reopen, retention, concurrency."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest

from buildtel.services.storage import format as fmt
from buildtel.services.storage.store import StorageClosed, StorageLocked, TelemetryStorage


async def opened(path: Path, **kw) -> TelemetryStorage:
    kw.setdefault("fsync", False)
    store = TelemetryStorage(path, **kw)
    await store.open()
    return store


async def test_round_trip_and_queries(tmp_path: Path, make_session) -> None:
    now = time.time()
    sessions = [
        make_session(0, finish=now - 50, outcome="success", branch="main", agents=["a1"], target_prefix="//app:"),
        make_session(1, finish=now - 40, outcome="failed", branch="main", agents=["a1", "a2"], target_prefix="//lib:"),
        make_session(2, finish=now - 30, outcome="failed", branch="dev", agents=["a2"], target_prefix="//app:"),
        make_session(3, finish=now - 20, outcome="abandoned", branch=None, agents=[], target_prefix="//lib:"),
        make_session(4, finish=now - 10, outcome="success", branch="dev", agents=["a3"], target_prefix="//app:"),
    ]
    store = await opened(tmp_path / "t")
    try:
        assert await store.append_many(sessions) == [True] * 5
        assert await store.count() == 5
        for s in sessions:
            assert await store.get(s.id) == s  # every field survives
        assert await store.get("0" * 32) is None
        assert [s.id for s in await store.recent(3)] == [sessions[4].id, sessions[3].id, sessions[2].id]
        assert [s.id for s in await store.range(now - 45, now - 15)] == [x.id for x in sessions[1:4]]

        async def ids(**filters) -> set[str]:
            return {s.id for s in await store.query(**filters)}

        by = {i: s.id for i, s in enumerate(sessions)}
        assert await ids(outcome="failed") == {by[1], by[2]}
        assert await ids(branch="dev") == {by[2], by[4]}
        assert await ids(agent="a2") == {by[1], by[2]}
        assert await ids(target="//lib:1") == {by[1], by[3]}
        assert await ids(target="//nope:1") == set()
        assert await ids(outcome="failed", branch="main") == {by[1]}
        assert await ids(since=now - 30, until=now - 10) == {by[2], by[3]}
        newest_two = await store.query(limit=2)
        assert [s.id for s in newest_two] == [by[4], by[3]]
    finally:
        await store.close()


async def test_idempotent_by_session_id(tmp_path: Path, make_session) -> None:
    store = await opened(tmp_path / "t")
    a, b, c = (make_session(i) for i in range(3))
    assert await store.append_many([a, b]) == [True, True]
    # A redelivered batch, a duplicate inside one batch, and one new session.
    assert await store.append_many([a, c, c, b]) == [False, True, False, False]
    assert await store.count() == 3
    size = store.stats().disk_bytes
    assert await store.append_many([a, b, c]) == [False, False, False]
    assert store.stats().disk_bytes == size  # nothing written for known ids
    await store.close()
    again = TelemetryStorage(tmp_path / "t", fsync=False)
    report = await again.open()
    assert report.records == 3 and report.superseded == 0  # stored once on disk too
    await again.close()


async def test_reopen_keeps_everything_across_segments(tmp_path: Path, make_session) -> None:
    sessions = [make_session(i, targets=20) for i in range(60)]
    store = await opened(tmp_path / "t", segment_bytes=16 * 1024, fsync=True)
    for i in range(0, 60, 7):
        await store.append_many(sessions[i : i + 7])
    segments = store.stats().segments
    assert segments > 3  # the small segment size rolled files over
    await store.close()
    store = await opened(tmp_path / "t", segment_bytes=16 * 1024)
    try:
        assert store.last_report.ok and store.last_report.sessions == 60
        assert [s.id for s in await store.recent(60)] == [s.id for s in reversed(sessions)]
        for s in sessions:
            assert await store.get(s.id) == s
        # Appends after a reopen continue and survive the next reopen.
        extra = make_session(100)
        assert await store.append_many([extra]) == [True]
    finally:
        await store.close()
    store = await opened(tmp_path / "t", segment_bytes=16 * 1024)
    assert await store.count() == 61 and await store.get(extra.id) == extra
    await store.close()


async def test_stored_bytes_are_kept_verbatim(tmp_path: Path, make_session) -> None:
    """A newer producer's extra fields survive an older storage: raw bytes are stored as received."""
    import msgspec

    s = make_session(0)
    newer = msgspec.msgpack.encode({**msgspec.to_builtins(s), "type": "session", "future_field": [1, 2, 3]})
    store = await opened(tmp_path / "t")
    await store.append_many([s], raw=[newer])
    assert await store.get_raw(s.id) == newer
    assert await store.get(s.id) == s
    await store.close()


async def test_retention_by_count_while_reading(tmp_path: Path, make_session) -> None:
    now = time.time()
    sessions = [make_session(i, targets=5, finish=now - 1000 + i) for i in range(120)]
    store = await opened(tmp_path / "t", max_sessions=25, segment_bytes=8 * 1024)
    stop = asyncio.Event()
    reads = 0
    errors: list[BaseException] = []

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                got = await store.recent(10)
                # What a reader sees is always whole, ordered sessions, never a torn view.
                assert [s.finish for s in got] == sorted((s.finish for s in got), reverse=True)
                for s in got:
                    assert s == sessions[int(s.labels["job"])]
                reads += 1
            except BaseException as exc:  # noqa: BLE001 - every failure of a reader is the test's finding
                errors.append(exc)
                return
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    for i in range(0, 120, 10):
        await store.append_many(sessions[i : i + 10])
        await store.enforce_retention()
        await asyncio.sleep(0.005)
    stop.set()
    await task
    assert not errors and reads > 5
    kept = await store.recent(100)
    assert [s.id for s in kept] == [s.id for s in reversed(sessions[-25:])]  # the newest 25 by finish
    assert await store.get(sessions[0].id) is None
    # Disk is reclaimed: dead segments deleted, not just hidden.
    live_bytes = sum(len(fmt.encode_record(b"")) + len(p) for p in [await store.get_raw(s.id) for s in kept])
    assert store.stats().disk_bytes < 4 * live_bytes + 64 * 1024
    await store.close()
    store = await opened(tmp_path / "t", max_sessions=25, segment_bytes=8 * 1024)
    assert {s.id for s in await store.recent(100)} == {s.id for s in kept}
    await store.close()


async def test_retention_by_age_and_compaction(tmp_path: Path, make_session) -> None:
    now = time.time()
    day = 86400.0
    # Old and recent sessions interleaved in the same segments: dropping the old ones leaves
    # every segment mostly dead, so retention must rewrite them rather than delete them.
    sessions = [make_session(i, targets=5, finish=(now - 100 * day - i) if i % 4 else now - i) for i in range(80)]
    store = await opened(tmp_path / "t", retention_s=90 * day, segment_bytes=12 * 1024)
    for i in range(0, 80, 8):
        await store.append_many(sessions[i : i + 8])
    survivors = [s for i, s in enumerate(sessions) if i % 4 == 0]
    before = store.stats().disk_bytes
    stop = asyncio.Event()
    seen_errors: list[BaseException] = []

    async def reader() -> None:
        while not stop.is_set():
            try:
                for s in survivors:
                    got = await store.get(s.id)
                    assert got is None or got == s
            except BaseException as exc:  # noqa: BLE001 - every failure of a reader is the test's finding
                seen_errors.append(exc)
                return

    task = asyncio.create_task(reader())
    report = await store.enforce_retention(now=now)
    stop.set()
    await task
    assert not seen_errors
    assert report.dropped == 60 and report.segments_compacted >= 1
    assert store.stats().disk_bytes < before / 2
    assert {s.id for s in await store.recent(100)} == {s.id for s in survivors}
    for s in survivors:
        assert await store.get(s.id) == s
    await store.close()
    store = await opened(tmp_path / "t", retention_s=90 * day, segment_bytes=12 * 1024)
    assert store.last_report.ok
    assert {s.id for s in await store.recent(100)} == {s.id for s in survivors}
    await store.close()


async def test_reads_do_not_wait_for_a_slow_write(tmp_path: Path, make_session) -> None:
    gate = threading.Event()

    class SlowDisk(TelemetryStorage):
        def _write_batch(self, *args):  # type: ignore[no-untyped-def]
            gate.wait(5)  # a disk that takes its time (fsync on a busy device)
            return super()._write_batch(*args)

    store = SlowDisk(tmp_path / "t", fsync=False)
    await store.open()
    first = make_session(0)
    gate.set()
    await store.append_many([first])
    gate.clear()
    write = asyncio.create_task(store.append_many([make_session(1)]))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    assert await store.get(first.id) == first
    assert len(await store.recent(5)) == 1  # the pending write is not visible before it is durable
    assert time.monotonic() - t0 < 1.0
    assert not write.done()
    gate.set()
    assert await write == [True]
    assert await store.count() == 2
    await store.close()


async def test_close_is_idempotent_and_final(tmp_path: Path, make_session) -> None:
    store = await opened(tmp_path / "t")
    await store.append_many([make_session(0)])
    await store.close()
    await store.close()
    with pytest.raises(StorageClosed):
        await store.append_many([make_session(1)])
    with pytest.raises(StorageClosed):
        await store.get("x")


async def test_random_batches_concurrent_appends(tmp_path: Path, make_session) -> None:
    """Concurrent writers with overlapping ids: each id stored once, every caller told the truth."""
    sessions = [make_session(i) for i in range(40)]
    store = await opened(tmp_path / "t")
    rng = random.Random(7)
    batches = [rng.sample(sessions, 8) for _ in range(20)]
    results = await asyncio.gather(*(store.append_many(b) for b in batches))
    new_ids = [s.id for b, flags in zip(batches, results, strict=True) for s, new in zip(b, flags, strict=True) if new]
    assert len(new_ids) == len(set(new_ids)) == await store.count()
    assert set(new_ids) == {s.id for b in batches for s in b}
    await store.close()


def test_index_reads_targets_encoded_as_arrays_or_maps() -> None:
    """Records written while TargetMetrics was a map and after it became array_like both index."""
    import msgspec

    from buildtel.services.storage.summary import view_decoder

    old = msgspec.msgpack.encode({"type": "session", "id": "a" * 32,
                                  "targets": [{"name": "//old:t", "start": 1.0, "end": 2.0, "duration_s": 1.0}]})
    new = msgspec.msgpack.encode({"type": "session", "id": "b" * 32, "targets": [["//new:t", 1.0, 2.0, 1.0]]})
    assert view_decoder.decode(old).target_names() == ["//old:t"]
    assert view_decoder.decode(new).target_names() == ["//new:t"]


async def test_failed_write_leaves_no_trace(tmp_path: Path, make_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full in the middle of a batch: the append fails, nothing half-written stays behind,
    the store keeps working, and the next open is clean."""
    import errno
    import os as _os

    store = await opened(tmp_path / "t", fsync=True)
    kept = make_session(0)
    await store.append_many([kept])
    real = fmt.write_chunks

    def disk_full(fd: int, chunks: list[bytes]) -> int:
        _os.write(fd, chunks[0] + chunks[1][:100])  # part of the first record reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt, "write_chunks", disk_full)
    lost = [make_session(1), make_session(2)]
    with pytest.raises(OSError, match="No space"):
        await store.append_many(lost)
    assert await store.count() == 1 and await store.get(lost[0].id) is None
    monkeypatch.setattr(fmt, "write_chunks", real)
    assert await store.append_many(lost) == [True, True]  # the retry (a redelivery) is stored
    await store.close()
    store = await opened(tmp_path / "t")
    assert store.last_report.ok and store.last_report.superseded == 0
    assert {s.id for s in await store.recent(10)} == {kept.id, lost[0].id, lost[1].id}
    await store.close()


async def test_one_process_per_directory(tmp_path: Path, make_session) -> None:
    """A second store on the same directory is refused instead of interleaving appends."""
    first = await opened(tmp_path / "t")
    second = TelemetryStorage(tmp_path / "t", fsync=False)
    with pytest.raises(StorageLocked, match="in use"):
        await second.open()
    await first.append_many([make_session(0)])
    await first.close()
    third = await opened(tmp_path / "t")  # released on close (and by the kernel on a crash)
    assert await third.count() == 1
    await third.close()


@pytest.mark.parametrize("reopen", ["close", "crash"])
async def test_a_session_published_again_after_retention_is_stored_again(tmp_path: Path, make_session,
                                                                          reopen: str) -> None:
    """A session retention dropped and then published again (a redelivery, a re-import) is stored
    again, as published the second time; a reopen, clean or after a crash, indexes that record and
    not the dropped one still on disk, even when the limits at that open would keep both."""
    import msgspec

    from buildtel.services.storage.index import Filters

    now = time.time()
    old = make_session(0, finish=now - 300)
    newer = [make_session(i, finish=now - 100 + i) for i in (1, 2)]
    store = await opened(tmp_path / "t", max_sessions=2)
    await store.append_many([old, *newer])
    await store.enforce_retention()
    assert await store.get(old.id) is None and await store.count() == 2  # its record stays on disk
    again = msgspec.structs.replace(old, name="re-imported", targets=old.targets[:1])  # the same id
    assert await store.append_many([again]) == [True]
    assert await store.get(old.id) == again and await store.count() == 3
    if reopen == "close":
        await store.close()
    else:  # what SIGKILL leaves: no index file for the active segment, the lock released
        for seg in list(store._all_segments):
            seg.close()
        store._closed = True
        store._unlock()
    store = await opened(tmp_path / "t", max_sessions=10)  # nothing due: a dropped record could come back
    try:
        assert store.last_report.ok and store.last_report.superseded == 1
        assert await store.count() == 3
        assert await store.get(old.id) == again
        assert [s.id for s in await store.recent(10)] == [newer[1].id, newer[0].id, old.id]
        assert [s.name for s in (await store.summaries(Filters(name="re-imported")))[0]] == ["re-imported"]
        assert {s.id for s in await store.query(target=old.targets[1].name)} == {n.id for n in newer}
    finally:
        await store.close()


def test_a_segment_descriptor_is_closed_once_when_two_closers_meet(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``Segment.__del__`` in a worker thread and the store's close() can close the same segment
    at once (close() reaches it through a weak reference while its finalizer runs): each
    descriptor must be closed once, or the second close hits whatever file reused the number."""
    import os as _os

    from buildtel.services.storage.segments import Segment

    path = tmp_path / "seg"
    path.write_bytes(b"x")
    seg = Segment(1, path, 1, 0, writable=True)
    real, closed = _os.close, []

    def close_meeting_another(fd: int) -> None:
        if not closed:  # the other closer arrives just as the first closes its first descriptor
            closed.append(fd)
            seg.close()
        else:
            closed.append(fd)
        real(fd)  # EBADF here if that descriptor was closed already

    monkeypatch.setattr(_os, "close", close_meeting_another)
    seg.close()
    seg.close()  # idempotent
    monkeypatch.undo()
    assert sorted(closed) == sorted(set(closed)) and len(closed) == 2 and seg.fd == seg.wfd == -1
