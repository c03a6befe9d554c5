"""Opening (index rebuild + damage handling) and retention (drop, delete, compact) of the store.

Split from ``store.py`` only to keep modules small; these functions work on a
:class:`~buildtel.services.storage.store.TelemetryStorage` and respect its locks:
``_retention_lock`` makes retention runs sequential, ``_write_lock`` is held
only for the moments a snapshot or the segment list is swapped, never during
file I/O, so appends keep flowing while a segment is rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from buildtel.services.storage import format as fmt
from buildtel.services.storage.index import Snapshot, Summary, summarize, view_decoder
from buildtel.services.storage.segments import DamageReport, RetentionReport, Segment
from buildtel.shared.codec import DecodeError

if TYPE_CHECKING:  # annotations only: store.py imports this module, never the other way round
    from buildtel.services.storage.store import TelemetryStorage


def load(store: TelemetryStorage) -> DamageReport:
    """Scan every segment into the store's index (runs in a worker thread, before open returns)."""
    fmt.remove_leftovers(store.directory)
    found = fmt.list_segments(store.directory)
    report = DamageReport(segments=len(found))
    summaries: dict[str, Summary] = {}
    segments: list[Segment] = []
    for i, (number, path) in enumerate(found):
        store._next_number = max(store._next_number, number + 1)
        with _mapped(path) as data:
            _load_segment(store, report, summaries, segments, number, path, data, last=i == len(found) - 1)
    store._segments = segments
    store._snap = Snapshot.build(summaries.values())
    report.sessions = len(summaries)
    return report


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes without copying them onto the heap: a 16 MiB read at start-up would
    otherwise stay in the allocator's high-water mark (RSS) for the life of the process."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            yield m


def _load_segment(store: TelemetryStorage, report: DamageReport, summaries: dict[str, Summary],
                  segments: list[Segment], number: int, path: Path, data: bytes | mmap.mmap, *, last: bool) -> None:
    res = fmt.scan(data, str(path))
    if res.header is not None and res.header.version != fmt.FORMAT_VERSION:
        # A newer writer's file: not ours to read, index, append to, compact or delete.
        report.damages.extend(res.damages)
        return
    size = len(data)
    if res.tail_damaged and last and res.header is not None:
        # The tail of the segment we were appending to when we died: cut it off so new
        # records follow the last intact one (and the next open is clean).
        _truncate(path, res.data_end)
        res.damages[-1].action = "truncated"
        size = res.data_end
    report.damages.extend(res.damages)
    clean = res.header is not None and all(d.action == "truncated" for d in res.damages)
    writable = last and clean and size < store.segment_bytes
    seg = Segment(number, path, size, res.header.header_len if res.header else 0, writable=writable)
    store._all_segments.add(seg)
    segments.append(seg)
    if writable:
        store._active = seg
    for ref in res.records:
        report.records += 1
        try:
            view = view_decoder.decode(fmt.payload_of(data, ref))
        except DecodeError:
            # Intact bytes that are no session (a bug, or a foreign writer): skip, report.
            report.damages.append(fmt.Damage(file=str(path), offset=ref.offset, reason=fmt.UNDECODABLE,
                                             bytes_skipped=fmt.RECORD_HEADER_LEN + ref.length))
            continue
        if view.id in summaries:
            report.duplicates += 1  # dead weight on disk; compaction reclaims it
            continue
        summaries[view.id] = summarize(view, ref.stored_at, seg, ref.offset, ref.length)


def _truncate(path: os.PathLike[str], size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _live_bytes(snap: Snapshot) -> dict[Segment, int]:
    live: dict[Segment, int] = {}
    for s in snap.order:
        live[s.segment] = live.get(s.segment, 0) + fmt.RECORD_HEADER_LEN + s.length
    return live


def _mostly_dead(seg: Segment, live: int, threshold: float) -> bool:
    data = seg.size - seg.header_len
    return data > 0 and live < threshold * data


async def enforce_retention(store: TelemetryStorage, now: float) -> RetentionReport:
    report = RetentionReport()
    async with store._retention_lock:
        async with store._write_lock:
            if store._closed:
                return report
            order = store._snap.order
            first = max(store._snap.first_alive(now - store.retention_s), len(order) - store.max_sessions)
            if first > 0:
                # Readers holding the previous snapshot finish on it; new readers never see these.
                store._snap = Snapshot.from_ordered(order[first:])
                report.dropped = first
            live = _live_bytes(store._snap)
            active = store._active
            if active is not None and _mostly_dead(active, live.get(active, 0), store.compact_below):
                # Retire a mostly-dead active segment so it becomes reclaimable below; the next
                # append starts a new one.  (Its records are already durable.)
                active.close_writer()
                store._active = None
            idle = [s for s in store._segments if s is not store._active]
            doomed = [s for s in idle if live.get(s, 0) == 0]
            for seg in doomed:
                store._segments.remove(seg)
            to_compact = [s for s in idle if s not in doomed and _mostly_dead(s, live[s], store.compact_below)]
        if doomed:
            await asyncio.to_thread(_unlink, [s.path for s in doomed], store.fsync)
            report.segments_deleted = len(doomed)
        for seg in to_compact:
            members = [s for s in store._snap.order if s.segment is seg]
            new_seg, moved = await asyncio.to_thread(_rewrite, store, seg, members)
            async with store._write_lock:
                if store._closed:
                    new_seg.close()
                    return report
                # Only retention removes entries and appends never touch this segment, so the
                # current snapshot still holds exactly ``members`` for it.
                store._snap = Snapshot.from_ordered(list(_swap(store._snap.order, seg, moved)))
                store._segments[store._segments.index(seg)] = new_seg
            report.segments_compacted += 1
    if report.dropped or report.segments_deleted or report.segments_compacted:
        store.log.info("storage.retention", dropped=report.dropped, segments_deleted=report.segments_deleted,
                       segments_compacted=report.segments_compacted, sessions=len(store._snap.order))
    return report


def _swap(order: list[Summary], seg: Segment, moved: dict[str, Summary | None]) -> Iterator[Summary]:
    for s in order:
        if s.segment is seg:
            replacement = moved.get(s.id, s)
            if replacement is not None:
                yield replacement
        else:
            yield s


def _unlink(paths: list[Path], fsync: bool) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
    if fsync and paths:
        fmt.fsync_dir(paths[0].parent)


def _rewrite(store: TelemetryStorage, seg: Segment,
             members: list[Summary]) -> tuple[Segment, dict[str, Summary | None]]:
    """Copy the live records of ``seg`` (verbatim: same bytes, same stored_at) into a new file
    that atomically replaces it.  Runs in a worker thread."""
    header = fmt.encode_header()
    members = sorted(members, key=lambda s: s.offset)  # sequential reads, original order
    chunks: list[bytes] = [header]
    moved: dict[str, Summary | None] = {}
    kept: list[tuple[Summary, int]] = []
    offset = len(header)
    for s in members:
        data = os.pread(seg.fd, fmt.RECORD_HEADER_LEN + s.length, s.offset)
        ref = fmt.check_record(data, 0)
        if not isinstance(ref, fmt.RecordRef) or ref.length != s.length:
            store.log.warning("storage.damaged", file=str(seg.path), offset=s.offset, session_id=s.id,
                              bytes_skipped=fmt.RECORD_HEADER_LEN + s.length,
                              reason=ref if isinstance(ref, str) else fmt.BAD_LENGTH, action="dropped")
            moved[s.id] = None
            continue
        chunks.append(data)
        kept.append((s, offset))
        offset += len(data)
    fmt.atomic_write(seg.path, chunks, fsync=store.fsync)
    new_seg = Segment(seg.number, seg.path, offset, len(header))
    store._all_segments.add(new_seg)
    for s, off in kept:
        moved[s.id] = msgspec.structs.replace(s, segment=new_seg, offset=off)
    return new_seg, moved
