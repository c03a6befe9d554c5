"""Index files (``seg-N.idx``): an open reads them instead of the segments, and whatever state a
crash or a foreign hand leaves them in — half written, stale after a compaction or an append,
damaged, orphaned, missing (a store of the previous format) — the reopened store holds exactly the
sessions, each once; damage they would hide is found by ``verify()``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from buildtel.services.storage import sidecar
from buildtel.services.storage.index import Filters
from buildtel.services.storage.store import TelemetryStorage


async def _store(d: Path, sessions: list, **kw: object) -> list[str]:
    store = TelemetryStorage(d, fsync=False, segment_bytes=4096, **kw)  # type: ignore[arg-type]
    await store.open()
    try:
        for i in range(0, len(sessions), 3):
            await store.append_many(sessions[i:i + 3])
    finally:
        await store.close()
    return [s.id for s in sessions]


async def _reopen(d: Path, **kw: object) -> tuple[TelemetryStorage, object]:
    store = TelemetryStorage(d, fsync=False, segment_bytes=4096, **kw)  # type: ignore[arg-type]
    return store, await store.open()


async def _ids(store: TelemetryStorage) -> list[str]:
    return [s.id for s in (await store.summaries(Filters(), desc=False, limit=10_000))[0]]


@pytest.fixture
async def history(tmp_path: Path, make_session) -> tuple[Path, list[str]]:
    sessions = [make_session(i, finish=time.time() - 1000 + i, targets=4) for i in range(40)]
    d = tmp_path / "store"
    return d, await _store(d, sessions)


async def test_a_clean_reopen_reads_index_files_not_segments(history) -> None:
    d, ids = history
    segments = sorted(d.glob("seg-*.btl"))
    assert len(segments) > 3 and all(sidecar.path_for(p).exists() for p in segments)
    store, report = await _reopen(d)
    try:
        assert await _ids(store) == ids
        assert report.indexed_from_sidecars == len(segments) and report.scanned_bytes == 0
        assert store.stats().unverified_segments == len(segments)
        checked = await store.verify()
        assert checked.ok and checked.records == len(ids) and store.stats().unverified_segments == 0
    finally:
        await store.close()


@pytest.mark.parametrize("state", ["tmp_left", "missing", "truncated", "bit_flip", "other_segment", "orphan",
                                   "segment_grew"])
async def test_every_state_an_index_file_can_be_left_in_reopens_whole(history, state: str, make_session) -> None:
    d, ids = history
    segments = sorted(d.glob("seg-*.btl"))
    victim = segments[1]
    idx = sidecar.path_for(victim)
    if state == "tmp_left":  # died after writing the temporary file, before the rename
        idx.with_name(idx.name + ".tmp").write_bytes(idx.read_bytes()[:50])
        idx.unlink()
    elif state == "missing":  # a store written before index files existed (or died before sealing)
        for p in segments:
            sidecar.path_for(p).unlink()
    elif state == "truncated":
        idx.write_bytes(idx.read_bytes()[:-10])
    elif state == "bit_flip":
        data = bytearray(idx.read_bytes())
        data[len(data) // 2] ^= 0x01
        idx.write_bytes(bytes(data))
    elif state == "other_segment":  # e.g. compaction rewrote the segment, then died before its index file
        idx.write_bytes(sidecar.path_for(segments[2]).read_bytes())
    elif state == "orphan":  # its segment was deleted by retention, the index file was not
        sidecar.path_for(d / "seg-9999999999.btl").write_bytes(idx.read_bytes())
    elif state == "segment_grew":  # appended to after its index file was written (a reopen, then a crash)
        extra = make_session(99, finish=time.time(), targets=4)
        store, _ = await _reopen(d, )
        store.segment_bytes = 1 << 30
        store._active = None
        await store.append_many([extra])  # a new segment; then make an old one look appended to
        await store.close()
        ids = [*ids, extra.id]
        os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    store, report = await _reopen(d)
    try:
        assert await _ids(store) == ids and report.superseded == 0
        scanned = report.indexed_from_sidecars < len(list(d.glob("seg-*.btl")))
        assert scanned == (state != "orphan")  # the damaged or stale one was scanned, nothing else
        assert not list(d.glob("*.tmp")) and not sidecar.path_for(d / "seg-9999999999.btl").exists()
    finally:
        await store.close()
    store, report = await _reopen(d)  # and the scan wrote a good index file for next time
    try:
        assert await _ids(store) == ids and report.scanned_bytes < 5000
    finally:
        await store.close()


async def test_rot_an_index_file_would_hide_is_found_by_verify(history) -> None:
    d, _ = history
    victim = sorted(d.glob("seg-*.btl"))[1]
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # silent corruption: same size, and the mtime put back below
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    store, report = await _reopen(d)
    try:
        assert report.ok  # the index file matched: nothing was read at open
        found = await store.verify()
        assert [(x.file, x.reason) for x in found.damages] == [(str(victim), "checksum_mismatch")]
        assert len(store.last_report.damages) == 1
    finally:
        await store.close()


async def test_compaction_rewrites_the_index_file(tmp_path: Path, make_session) -> None:
    d = tmp_path / "store"
    sessions = [make_session(i, finish=time.time() - 1000 + i, targets=4) for i in range(40)]
    await _store(d, sessions)
    store, _ = await _reopen(d, max_sessions=12)  # drops 28: most segments die or are compacted
    try:
        assert await _ids(store) == [s.id for s in sessions[-12:]]
    finally:
        await store.close()
    store, report = await _reopen(d, max_sessions=12)
    try:
        assert await _ids(store) == [s.id for s in sessions[-12:]] and report.superseded == 0
        assert report.indexed_from_sidecars == report.segments  # every segment, rewritten or not
    finally:
        await store.close()
