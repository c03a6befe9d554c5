"""Report-row files (``seg-N.rows``): written for sealed segments as sessions arrive, read by
reports instead of the records, ignored when they no longer match their segment."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.services.storage import format as fmt
from buildtel.services.storage import rowfile, rowwork
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.columns import (
    STATUSES,
    ColumnsReply,
    ColumnsRequest,
    column_pages,
    decode_durations,
    decode_ids,
)
from buildtel.services.storage.index import Filters
from buildtel.services.storage.rowcache import RowCache
from buildtel.services.storage.service import StorageService
from buildtel.services.storage.store import TelemetryStorage
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildSession, TargetMetrics
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.storage.conftest import build_session
from tests.storage.test_storage_service import eventually, publish

SEGMENT_BYTES = 16 * 1024  # a few 40-target sessions a segment: most segments are sealed


def _check_pages(pages: list[ColumnsReply], sessions: list[BuildSession]) -> None:
    """The pages hold exactly ``sessions``, newest first, each target as stored."""
    newest_first = sorted(sessions, key=lambda s: (s.finish, s.id), reverse=True)
    assert [r.id for p in pages for r in p.sessions] == [s.id for s in newest_first]
    by_id = {s.id: s for s in sessions}
    for p in pages:
        ids, durs = decode_ids(p.name_ids), decode_durations(p.durations)
        k = 0
        for r in p.sessions:
            s = by_id[r.id]
            assert (r.start, r.finish, r.outcome, r.branch, r.totals, r.targets) == (
                s.start, s.finish, s.outcome, s.environment.vcs.branch, s.totals, len(s.targets))
            for t in s.targets:
                assert (p.names[ids[k]], durs[k], STATUSES[p.codes[k] >> 2]) == (t.name, t.duration_s, t.status)
                k += 1
        assert k == len(ids)


async def _true(value: bool) -> bool:
    return value


def _row_files_current(directory: Path) -> bool:
    segments = sorted(directory.glob("seg-*.btl"))
    return len(segments) > 2 and all(rowfile.path_for(p).exists() for p in segments[:-1])


async def _report(nc, settings: Settings) -> list[ColumnsReply]:
    return [p async for p in column_pages(nc, Subjects(settings.namespace), ColumnsRequest())]


def _service(cfg: Settings) -> StorageService:
    return StorageService(cfg, cfg.nats_url or "", cfg.redis_url or "", segment_bytes=SEGMENT_BYTES)


async def _store(cfg: Settings, nc, sessions: list[BuildSession]) -> Path:
    """Store ``sessions`` through a storage service (small segments) and wait until every sealed
    segment has its row file; the store's directory, the service stopped, a report checked."""
    svc = _service(cfg)
    await svc.start()
    try:
        for s in sessions:
            await publish(nc, cfg, encode(s), s.id)
        client = StorageClient(nc, Subjects(cfg.namespace))

        async def all_stored() -> bool:
            return (await client.stats()).sessions == len(sessions)

        await eventually(all_stored, timeout=60)
        directory = Path(svc.store.directory)
        await eventually(lambda: _true(_row_files_current(directory)), timeout=60)
        _check_pages(await _report(nc, cfg), sessions)
        return directory
    finally:
        await svc.stop()


async def test_sealed_segments_get_row_files_and_reports_read_them_after_a_restart(settings, nc) -> None:
    cfg = settings.with_(fsync=False)
    now = time.time()
    sessions = [build_session(i, targets=40, finish=now - 500 + i, outcome="failed" if i % 4 == 0 else "success")
                for i in range(24)]

    await _store(cfg, nc, sessions)

    # A new process: a report of the whole history reads the row files, decoding only the
    # records of the segment that was still taking appends.
    svc = _service(cfg)
    await svc.start()
    try:
        sealed = svc.store.sealed_segments()
        _check_pages(await _report(nc, cfg), sessions)
        assert svc.row_cache.rows_loaded == len(sealed) and not svc.row_cache.no_rows
        in_sealed = sum(1 for s in (await svc.store.summaries(Filters(), limit=100))[0] if s.segment in sealed)
        assert svc.row_cache.misses == len(sessions) - in_sealed < len(sessions) // 2
    finally:
        await svc.stop()


async def test_a_damaged_or_stale_row_file_is_ignored_and_rewritten(settings, nc) -> None:
    cfg = settings.with_(fsync=False)
    now = time.time()
    sessions = [build_session(i, targets=40, finish=now - 500 + i) for i in range(16)]
    directory = await _store(cfg, nc, sessions)
    segments = sorted(directory.glob("seg-*.btl"))
    flipped, swapped = rowfile.path_for(segments[0]), rowfile.path_for(segments[1])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(data)
    swapped.write_bytes(rowfile.path_for(segments[2]).read_bytes())  # another segment's rows

    svc = _service(cfg)
    await svc.start()
    try:
        _check_pages(await _report(nc, cfg), sessions)  # from the records where the rows do not match

        def rewritten() -> bool:  # whole files checked, CRC included
            return all(isinstance(_read(s.path), rowfile.Body) for s in svc.store.sealed_segments())

        await eventually(lambda: _true(rewritten()), timeout=60)
    finally:
        await svc.stop()
    for seg_path in (segments[0], segments[1]):
        body = _read(seg_path)
        assert isinstance(body, rowfile.Body) and len(body.rows) >= 1


def _read(seg_path: Path) -> rowfile.Body | str:
    header, _ = fmt.parse_header(seg_path.read_bytes())
    assert header is not None
    st_ = os.stat(seg_path)
    return rowfile.read(seg_path, int(seg_path.stem[4:]), header.created, st_.st_size, st_.st_mtime_ns)


async def test_retention_removes_the_row_files_of_deleted_segments(tmp_path) -> None:
    store = TelemetryStorage(tmp_path / "store", max_sessions=6, fsync=False, segment_bytes=SEGMENT_BYTES)
    await store.open()
    try:
        now = time.time()
        await store.append_many([build_session(i, targets=40, finish=now - 500 + i) for i in range(20)])
        cache = RowCache()
        for seg in store.sealed_segments():
            rowwork.build(store, cache, seg)
        before = set(store.directory.glob("seg-*.rows"))
        report = await store.enforce_retention()
        assert report.segments_deleted > 0
        after = set(store.directory.glob("seg-*.rows"))
        assert after < before
        assert all(p.with_suffix(".btl").exists() for p in after)
    finally:
        await store.close()


_names = st.text(min_size=1, max_size=12)
_target = st.builds(
    lambda name, d, status, cache, worker: TargetMetrics(name=name, start=1.0, end=1.0 + d, duration_s=d,
                                                         status=status, cache=cache, worker=worker),
    _names, st.floats(min_value=0, max_value=1e6, allow_nan=False), st.sampled_from(STATUSES),
    st.sampled_from(["local_hit", "remote_hit", "miss", "uncacheable"]), st.text(max_size=6))


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(targets=st.lists(st.lists(_target, max_size=8), min_size=1, max_size=6))
def test_a_row_file_gives_back_what_reduction_gives(tmp_path_factory, targets) -> None:
    """Entries written to a row file and read into another cache (other name ids) are the same."""
    seg = tmp_path_factory.mktemp("rows") / "seg-0000000001.btl"
    seg.write_bytes(b"x" * 100)
    payloads = [encode(msgspec.structs.replace(build_session(i, targets=0), targets=ts))
                for i, ts in enumerate(targets)]
    writer = RowCache()
    writer.names["an early name"]
    entries = [(len(p), writer.entry(p)) for p in payloads]
    st_ = os.stat(seg)
    rowfile.write(seg, 1, 123.5, st_.st_size, st_.st_mtime_ns, writer.body_for(entries), fsync=False)
    body = rowfile.read(seg, 1, 123.5, st_.st_size, st_.st_mtime_ns)
    assert isinstance(body, rowfile.Body)
    reader = RowCache()
    got = reader.from_body(body)
    assert [k for k, _ in got] == [(e.row.id, n) for n, e in entries]
    for (_, a), (_, b) in zip(entries, got, strict=True):
        assert a.row == b.row and list(a.durations) == list(b.durations) and a.codes == b.codes
        assert [writer.names.order[i] for i in a.ids] == [reader.names.order[i] for i in b.ids]
        assert [writer.names.order[i] for i in a.workers] == [reader.names.order[i] for i in b.workers]
    # Written for another state of the segment: not used, and says why.
    assert rowfile.read(seg, 1, 123.5, st_.st_size + 1, st_.st_mtime_ns) == "the segment changed since"
    assert rowfile.read(seg, 2, 123.5, st_.st_size, st_.st_mtime_ns) == "written for another file"


async def test_a_session_stored_again_with_the_same_length_gets_its_own_row(tmp_path) -> None:
    """Retention dropped a session and it was published again under its id, with other times but
    exactly as many bytes: reports give the stored version's figures, not the cached ones of the
    version dropped (the cache is keyed by id and length)."""
    store = TelemetryStorage(tmp_path / "store", max_sessions=1, fsync=False, segment_bytes=SEGMENT_BYTES)
    await store.open()
    try:
        now = time.time()
        first = build_session(1, targets=40, finish=now - 900)
        again = msgspec.structs.replace(first, start=first.start + 100.0, finish=first.finish + 100.0,
                                        duration_s=31.5)
        assert len(encode(again)) == len(encode(first))
        cache = RowCache()
        await store.append_many([first])
        [s] = (await store.summaries(Filters()))[0]
        assert cache.entry_of(s, store.read_summary, [0]).row.finish == first.finish  # cached now
        await store.append_many([build_session(2, targets=40, finish=now - 800)])
        await store.enforce_retention()  # max_sessions=1: the first is dropped
        await store.append_many([again])
        [s] = [x for x in (await store.summaries(Filters(), limit=10))[0] if x.id == first.id]
        row = cache.entry_of(s, store.read_summary, [0]).row
        assert (row.start, row.finish, row.duration_s) == (again.start, again.finish, 31.5)
    finally:
        await store.close()
